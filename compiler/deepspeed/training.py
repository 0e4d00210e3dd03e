"""bf16/fp16 (loss scaling), optimizer and scheduler sections, with DeepSpeed's defaults
and formulas (deepspeed/runtime/fp16/loss_scaler.py, lr_schedules.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ..errors import StrategyError
from ..training_config import SGD, AdamW, Constant, LossScaling, WarmupCosine, WarmupLinear
from .report import UNRESOLVED

if TYPE_CHECKING:
    from .convert import Converter


def _ratio(low: float, peak: float) -> float:
    """low / peak to 12 significant digits: 0.01 / 0.05 is 0.2, as a user would write it."""
    return float(f"{low / peak:.12g}")


def convert_precision(c: Converter) -> None:
    """bf16 / fp16 (or bfloat16) sections -> Strategy.precision (and loss_scaling)."""
    cfg = c.config
    bf16_key = "bf16" if "bf16" in cfg else "bfloat16"  # DeepSpeed reads either
    bf16, fp16 = cfg.get(bf16_key) or {}, cfg.get("fp16") or {}
    for key, section in ((bf16_key, bf16), ("fp16", fp16)):
        if not isinstance(section, Mapping):
            c.refuse(key, section, 'expected a JSON object like {"enabled": true}')
            return
    bf16_on = c.auto.pop(f"{bf16_key}.enabled", bf16.get("enabled", False))
    fp16_on = c.auto.pop("fp16.enabled", fp16.get("enabled", False))
    if bf16_on is True and fp16_on is True:
        c.refuse(f"{bf16_key}.enabled", True, "bf16 and fp16 cannot both be enabled")
        return
    if bf16_on is True:
        precision = "bf16"
    elif fp16_on is True:
        precision = "fp16"
    elif "auto" in (bf16_on, fp16_on):
        precision = "auto"
    else:
        precision = "fp32"
    c.fields["precision"] = precision
    notes = {
        "bf16": "precision='bf16' (matmuls in bf16, fp32 master weights)",
        "fp16": "precision='fp16' (matmuls in fp16, dynamic loss scaling, fp32 master weights)",
        "auto": "precision='auto': bf16 where this hardware computes it natively, else fp32 "
        "(the HF Trainer fills it from --bf16/--fp16; write true to force one)",
        "fp32": "precision='fp32'",
    }
    for key, section in ((bf16_key, bf16), ("fp16", fp16)):
        if "enabled" in section:
            c.honour(f"{key}.enabled", section["enabled"], notes[precision])
    for name, value in bf16.items():
        key = f"{bf16_key}.{name}"
        if name == "enabled":
            continue
        if name in ("bf16_master_weights_and_grads", "bf16_optimizer_states") and value:
            c.refuse(key, value, "Strato keeps fp32 master weights, gradients and states")
        elif name in (
            "immediate_grad_update",
            "check_grad_overflow",
            "bf16_master_weights_and_grads",
            "bf16_optimizer_states",
        ):
            c.no_effect(
                key, value, "Strato's bf16 keeps fp32 master weights and updates at the step"
            )
        else:
            c.refuse(key, value, "not a bf16 key Strato knows")
    _loss_scaling(c, fp16, active=precision == "fp16")


def _loss_scaling(c: Converter, fp16: Mapping, active: bool) -> None:
    """DeepSpeed's DynamicLossScaler: scale 2**initial_scale_power, x2 after
    loss_scale_window finite steps, /2 once `hysteresis` overflows used up, never below
    min_loss_scale; loss_scale > 0 is a fixed scale. Its defaults when a key is absent."""
    if not active and set(fp16) <= {"enabled"}:
        return
    static = fp16.get("loss_scale", 0)
    power = fp16.get("initial_scale_power", 16)
    window = fp16.get("loss_scale_window", 1000)
    hysteresis = fp16.get("hysteresis", 2)
    consecutive = fp16.get("consecutive_hysteresis", False)
    min_scale = fp16.get("min_loss_scale", 1)
    try:
        if static:
            scaling = LossScaling(
                initial_scale=float(static),
                growth_factor=1.0,
                backoff_factor=1.0,
                min_scale=min(float(min_scale), float(static)),
            )
        else:
            scaling = LossScaling(
                initial_scale=2.0**power,
                growth_interval=window,
                hysteresis=hysteresis,
                consecutive_hysteresis=consecutive,
                min_scale=float(min_scale),
            )
    except (StrategyError, TypeError, ValueError, OverflowError) as exc:
        c.refuse("fp16", dict(fp16), str(exc))
        return
    c.fields["loss_scaling"] = scaling
    fixed = "a fixed scale (overflowing steps are still skipped)"
    fields = {
        "loss_scale": f"LossScaling.initial_scale={static:g}, {fixed}"
        if static
        else "0: dynamic loss scaling",
        "initial_scale_power": f"LossScaling.initial_scale=2**{power}",
        "loss_scale_window": f"LossScaling.growth_interval={window}",
        "hysteresis": f"LossScaling.hysteresis={hysteresis}",
        "min_loss_scale": f"LossScaling.min_scale={min_scale}",
        "consecutive_hysteresis": f"LossScaling.consecutive_hysteresis={consecutive}",
    }
    inert = {
        "auto_cast": "Strato casts inside the graph (mixed_precision pass)",
        "raise_error_at_min_scale": "Strato keeps training at min_loss_scale",
        "fp16_master_weights_and_grads": "fp32 master weights, as Strato's",
        "fp16_optimizer_states": "fp32 optimizer states, as Strato's",
    }
    for name, value in fp16.items():
        key = f"fp16.{name}"
        if name == "enabled":
            continue
        if not active:
            c.no_effect(key, value, "fp16 is not enabled")
        elif name in ("fp16_master_weights_and_grads", "fp16_optimizer_states") and value:
            c.refuse(key, value, "Strato keeps fp32 master weights, gradients and states")
        elif name in fields:
            if static and name in (
                "initial_scale_power",
                "loss_scale_window",
                "hysteresis",
                "consecutive_hysteresis",
            ):
                c.no_effect(key, value, "loss_scale > 0 fixes the scale")
            else:
                c.honour(key, value, fields[name])
        elif name in inert:
            c.no_effect(key, value, inert[name])
        else:
            c.refuse(key, value, "not an fp16 key Strato knows")


def convert_optimizer(c: Converter, section: Mapping) -> None:
    kind = str(section.get("type", ""))
    params = section.get("params", {}) or {}
    extra = set(section) - {"type", "params"}
    for name in sorted(extra):
        c.refuse(f"optimizer.{name}", section[name], "an optimizer has 'type' and 'params'")
    if not isinstance(params, Mapping):
        c.refuse("optimizer.params", params, "expected a JSON object")
        return
    lower = kind.lower()
    if lower in ("adam", "adamw"):
        _adam(c, kind, params)
    elif lower == "sgd":
        _sgd(c, params)
    else:
        c.refuse(
            "optimizer.type",
            kind,
            "Strato has Adam/AdamW and SGD (strato.AdamW, strato.SGD); write one of "
            "those or leave DeepSpeed's own optimizers (Lamb, OneBitAdam, ...) out",
        )


def _param(c: Converter, params: Mapping, name: str, default: Any, resolve=None) -> Any:
    return c.get(params, name, f"optimizer.params.{name}", default, resolve)


def _adam(c: Converter, kind: str, params: Mapping) -> None:
    known = {
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "torch_adam",
        "adam_w_mode",
        "amsgrad",
        "bias_correction",
        "fused",
        "foreach",
    }
    for name in sorted(set(params) - known):
        c.refuse(f"optimizer.params.{name}", params[name], "not an Adam parameter Strato knows")
    torch_adam = bool(params.get("torch_adam", False))
    # DeepSpeed: type AdamW is always decoupled; Adam is too unless adam_w_mode is false.
    w_mode = kind.lower() == "adamw" or bool(params.get("adam_w_mode", True))
    # torch.optim.AdamW defaults to weight_decay 0.01; DeepSpeed's FusedAdam / CPUAdam to 0.
    decay_default = 0.01 if torch_adam and w_mode else 0.0
    lr = _param(c, params, "lr", 1e-3)
    betas = _param(c, params, "betas", [0.9, 0.999])
    eps = _param(c, params, "eps", 1e-8)
    decay = _param(c, params, "weight_decay", decay_default)
    if params.get("amsgrad"):
        c.refuse("optimizer.params.amsgrad", True, "AMSGrad is not supported")
    if params.get("bias_correction", True) is False:
        c.refuse(
            "optimizer.params.bias_correction",
            False,
            "Adam without bias correction is not supported",
        )
    if not w_mode and decay not in (0, 0.0, UNRESOLVED):
        c.refuse(
            "optimizer.params.adam_w_mode",
            False,
            "Adam with L2 weight decay is not supported: Strato's AdamW decays decoupled "
            "(set adam_w_mode true, or weight_decay 0)",
        )
    if UNRESOLVED in (lr, betas, eps, decay):
        return
    try:
        c.fields["optimizer"] = AdamW(lr=lr, betas=tuple(betas), eps=eps, weight_decay=decay)
    except (StrategyError, TypeError) as exc:
        c.refuse("optimizer.params", dict(params), str(exc))
        return
    c.lr = lr
    c.honour(
        "optimizer.type",
        kind,
        f"optimizer=AdamW (decoupled weight decay{', adam_w_mode' if kind.lower() == 'adam' else ''})",
    )
    for name, value in (("lr", lr), ("betas", list(betas)), ("eps", eps)):
        c.honour(f"optimizer.params.{name}", params.get(name, value), f"AdamW.{name}={value}")
    c.honour(
        "optimizer.params.weight_decay",
        params.get("weight_decay", decay),
        f"AdamW.weight_decay={decay}"
        + (
            ""
            if "weight_decay" in params
            else f" (DeepSpeed's default for {'torch' if torch_adam else 'its fused'} Adam)"
        )
        + ", not on biases and norm weights (as the HF Trainer groups them; "
        "decay_norms_and_biases=True decays every parameter)",
    )
    for name in ("torch_adam", "adam_w_mode", "fused", "foreach"):
        if name in params:
            c.no_effect(
                f"optimizer.params.{name}",
                params[name],
                "torch's AdamW (fused kernel where it exists) runs in every case",
            )
    if "amsgrad" in params:
        c.honour("optimizer.params.amsgrad", False, "AMSGrad off, as torch's AdamW")
    if "bias_correction" in params:
        c.honour("optimizer.params.bias_correction", True, "as torch's AdamW")


def _sgd(c: Converter, params: Mapping) -> None:
    known = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "foreach", "fused"}
    for name in sorted(set(params) - known):
        c.refuse(f"optimizer.params.{name}", params[name], "not an SGD parameter Strato knows")
    values = {  # torch.optim.SGD's defaults, which DeepSpeed passes through
        "lr": _param(c, params, "lr", 1e-3),
        "momentum": _param(c, params, "momentum", 0.0),
        "dampening": _param(c, params, "dampening", 0.0),
        "weight_decay": _param(c, params, "weight_decay", 0.0),
        "nesterov": _param(c, params, "nesterov", False),
    }
    if UNRESOLVED in values.values():
        return
    try:
        c.fields["optimizer"] = SGD(**values)
    except (StrategyError, TypeError) as exc:
        c.refuse("optimizer.params", dict(params), str(exc))
        return
    c.lr = values["lr"]
    c.honour("optimizer.type", "SGD", "optimizer=SGD")
    for name, value in values.items():
        c.honour(f"optimizer.params.{name}", params.get(name, value), f"SGD.{name}={value}")
    for name in ("foreach", "fused"):
        if name in params:
            c.no_effect(f"optimizer.params.{name}", params[name], "torch picks the kernel")


def convert_scheduler(c: Converter, section: Mapping) -> None:
    kind = str(section.get("type", ""))
    params = section.get("params", {}) or {}
    for name in sorted(set(section) - {"type", "params"}):
        c.refuse(f"scheduler.{name}", section[name], "a scheduler has 'type' and 'params'")
    builders = {
        "warmuplr": _warmup_lr,
        "warmupdecaylr": _warmup_lr,
        "warmupcosinelr": _warmup_cosine,
        "onecycle": _one_cycle,
    }
    builder = builders.get(kind.lower())
    if builder is None:
        c.refuse(
            "scheduler.type",
            kind,
            "Strato maps WarmupLR, WarmupDecayLR, WarmupCosineLR and OneCycle (without "
            "momentum cycling or post-cycle decay)",
        )
        return
    if c.lr is None and "optimizer" not in c.config:
        c.refuse("scheduler", kind, "a scheduler needs an 'optimizer' section here")
        return
    if c.lr is None:  # the optimizer was refused or unresolved (listed already): the
        c.lr = 1.0  # conversion fails, but the scheduler's own problems are listed too
    builder(c, kind, params)


def _sched(c: Converter, params: Mapping, name: str, default: Any, resolve=None) -> Any:
    return c.get(params, name, f"scheduler.params.{name}", default, resolve)


def _warmup_shape(c: Converter, params: Mapping) -> str:
    shape = params.get("warmup_type", "log")  # DeepSpeed's default: log
    if shape not in ("log", "linear"):
        c.honour("scheduler.params.warmup_type", shape, "unknown: 'log', as DeepSpeed does")
        return "log"
    if "warmup_type" in params:
        c.honour("scheduler.params.warmup_type", shape, f"warmup_shape={shape!r}")
    return shape


def _check_params(c: Converter, params: Mapping, known: set[str]) -> None:
    for name in sorted(set(params) - known - {"last_batch_iteration"}):
        c.refuse(f"scheduler.params.{name}", params[name], "not a parameter of this scheduler")
    if "last_batch_iteration" in params:
        c.no_effect(
            "scheduler.params.last_batch_iteration",
            params["last_batch_iteration"],
            "engine.load_checkpoint resumes the schedule",
        )


def _warmup_steps(c: Converter, params: Mapping) -> Any:
    steps = _sched(c, params, "warmup_num_steps", 1000)
    if steps is UNRESOLVED:
        return steps
    if not isinstance(steps, int) or steps < 0:
        c.refuse("scheduler.params.warmup_num_steps", steps, "must be an integer >= 0")
        return UNRESOLVED
    return max(2, steps)  # DeepSpeed: warmup_num_steps = max(2, warmup_num_steps)


def _warmup_lr(c: Converter, kind: str, params: Mapping) -> None:
    """WarmupLR: warmup_min_lr -> warmup_max_lr over warmup_num_steps, then constant;
    WarmupDecayLR: then linear decay to warmup_min_lr at total_num_steps. They set the lr
    themselves: the optimizer's lr becomes warmup_max_lr."""
    decay = kind.lower() == "warmupdecaylr"
    known = {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"}
    _check_params(c, params, known | ({"total_num_steps"} if decay else set()))
    low = _sched(c, params, "warmup_min_lr", 0.0, lambda: (0.0, "as the HF Trainer fills it"))
    peak = _sched(
        c,
        params,
        "warmup_max_lr",
        c.lr,
        lambda: (c.lr, "the optimizer's lr, as the HF Trainer fills it"),
    )
    steps = _warmup_steps(c, params)
    total = _sched(c, params, "total_num_steps", None) if decay else None
    if UNRESOLVED in (low, peak, steps, total):
        return
    if decay and total is None:
        c.refuse("scheduler.params.total_num_steps", None, "WarmupDecayLR needs total_num_steps")
        return
    if not isinstance(peak, int | float) or not peak > 0 or not 0 <= low <= peak:
        c.refuse(
            "scheduler.params.warmup_max_lr",
            peak,
            f"needs 0 <= warmup_min_lr ({low}) <= warmup_max_lr, warmup_max_lr > 0",
        )
        return
    start = _ratio(low, peak)
    shape = _warmup_shape(c, params)
    try:
        schedule = (
            WarmupLinear(
                warmup_steps=steps,
                total_steps=total,
                min_lr_ratio=start,
                warmup_start=start,
                warmup_shape=shape,
            )
            if decay
            else Constant(warmup_steps=steps, warmup_start=start, warmup_shape=shape)
        )
    except StrategyError as exc:
        c.refuse("scheduler.params", dict(params), str(exc))
        return
    _set_lr(c, peak, f"{kind} sets the lr: optimizer lr = warmup_max_lr")
    c.fields["schedule"] = schedule
    name = type(schedule).__name__
    c.honour(
        "scheduler.type",
        kind,
        f"schedule={name} (warm-up then " + ("linear decay)" if decay else "constant)"),
    )
    c.honour(
        "scheduler.params.warmup_min_lr",
        params.get("warmup_min_lr", low),
        f"{name}.warmup_start={start:g} (warmup_min_lr / warmup_max_lr)",
    )
    c.honour("scheduler.params.warmup_max_lr", params.get("warmup_max_lr", peak), f"lr={peak}")
    given_steps = params.get("warmup_num_steps", 1000)
    at_least = " (DeepSpeed warms up at least 2 steps)" if steps == 2 and given_steps != 2 else ""
    c.honour(
        "scheduler.params.warmup_num_steps",
        given_steps,
        f"{name}.warmup_steps={steps}{at_least}",
    )
    if decay:
        c.honour(
            "scheduler.params.total_num_steps",
            params["total_num_steps"],
            f"WarmupLinear.total_steps={total}, decaying to warmup_min_lr (min_lr_ratio={start:g})",
        )


def _warmup_cosine(c: Converter, kind: str, params: Mapping) -> None:
    """WarmupCosineLR: ratios of the optimizer's lr, warmup_min_ratio -> 1 over the
    warmup, then cosine down to cos_min_ratio at total_num_steps."""
    _check_params(
        c,
        params,
        {
            "total_num_steps",
            "warmup_min_ratio",
            "warmup_num_steps",
            "cos_min_ratio",
            "warmup_type",
        },
    )
    total = _sched(c, params, "total_num_steps", None)
    start = _sched(c, params, "warmup_min_ratio", 0.0)
    floor = _sched(c, params, "cos_min_ratio", 0.0001)
    steps = _warmup_steps(c, params)
    if UNRESOLVED in (total, start, floor, steps):
        return
    if total is None:
        c.refuse("scheduler.params.total_num_steps", None, "WarmupCosineLR needs total_num_steps")
        return
    shape = _warmup_shape(c, params)
    try:
        schedule = WarmupCosine(
            warmup_steps=steps,
            total_steps=total,
            min_lr_ratio=floor,
            warmup_start=start,
            warmup_shape=shape,
        )
    except StrategyError as exc:
        c.refuse("scheduler.params", dict(params), str(exc))
        return
    c.fields["schedule"] = schedule
    c.honour("scheduler.type", kind, "schedule=WarmupCosine")
    c.honour(
        "scheduler.params.total_num_steps",
        params["total_num_steps"],
        f"WarmupCosine.total_steps={total}",
    )
    c.honour(
        "scheduler.params.warmup_min_ratio",
        params.get("warmup_min_ratio", start),
        f"WarmupCosine.warmup_start={start}",
    )
    c.honour(
        "scheduler.params.cos_min_ratio",
        params.get("cos_min_ratio", floor),
        f"WarmupCosine.min_lr_ratio={floor}",
    )
    c.honour(
        "scheduler.params.warmup_num_steps",
        params.get("warmup_num_steps", 1000),
        f"WarmupCosine.warmup_steps={steps}",
    )


def _one_cycle(c: Converter, kind: str, params: Mapping) -> None:
    """OneCycle maps where it is one up-down cycle of the lr: cycle_min_lr ->
    cycle_max_lr over cycle_first_step_size, back over cycle_second_step_size, then
    constant (no momentum cycling, no stairs, no post-cycle decay)."""
    known = {
        "cycle_min_lr",
        "cycle_max_lr",
        "decay_lr_rate",
        "cycle_first_step_size",
        "cycle_second_step_size",
        "cycle_first_stair_count",
        "cycle_second_stair_count",
        "decay_step_size",
        "cycle_momentum",
        "cycle_min_mom",
        "cycle_max_mom",
        "decay_mom_rate",
    }
    _check_params(c, params, known)
    problems = []
    if params.get("cycle_momentum", True):
        problems.append(
            (
                "cycle_momentum",
                params.get("cycle_momentum", True),
                "Strato's schedules scale only the lr (DeepSpeed's default cycles "
                "Adam's beta1 too): set cycle_momentum false",
            )
        )
    if params.get("decay_lr_rate", 0):
        problems.append(
            (
                "decay_lr_rate",
                params["decay_lr_rate"],
                "post-cycle decay has no Strato schedule",
            )
        )
    for name in ("cycle_first_stair_count", "cycle_second_stair_count"):
        if params.get(name):
            problems.append((name, params[name], "staircase cycles have no Strato schedule"))
    if "cycle_min_lr" not in params or "cycle_max_lr" not in params:
        problems.append(
            (
                "cycle_min_lr",
                params.get("cycle_min_lr"),
                "OneCycle needs cycle_min_lr and cycle_max_lr",
            )
        )
    for name, value, why in problems:
        c.refuse(f"scheduler.params.{name}", value, why)
    if problems:
        return
    low, peak = params["cycle_min_lr"], params["cycle_max_lr"]
    first = params.get("cycle_first_step_size", 2000)
    second = params.get("cycle_second_step_size") or first
    try:
        schedule = WarmupLinear(
            warmup_steps=int(first),
            total_steps=int(first + second),
            min_lr_ratio=_ratio(low, peak),
            warmup_start=_ratio(low, peak),
        )
    except (StrategyError, ZeroDivisionError, TypeError) as exc:
        c.refuse("scheduler.params", dict(params), str(exc))
        return
    _set_lr(c, peak, "OneCycle sets the lr: optimizer lr = cycle_max_lr")
    c.fields["schedule"] = schedule
    c.honour("scheduler.type", kind, "schedule=WarmupLinear (one up-down cycle, then cycle_min_lr)")
    for name in sorted(set(params) & known):
        c.honour(f"scheduler.params.{name}", params[name], "see scheduler.type")


def _set_lr(c: Converter, lr: float, why: str) -> None:
    optimizer = c.fields.get("optimizer")
    if optimizer is None or optimizer.lr == lr:
        return
    given = c.config.get("optimizer", {}).get("params", {}).get("lr")
    c.fields["optimizer"] = attrs.evolve(optimizer, lr=lr)
    c.entries = [e for e in c.entries if e.key != "optimizer.params.lr"]
    if given is not None:
        c.no_effect("optimizer.params.lr", given, why)
