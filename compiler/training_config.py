"""Training settings a Strategy holds: optimizers, learning-rate schedules, loss scaling.

Frozen attrs classes with a docstring under each field, like Strategy itself; in YAML a
union field picks its class by a 'kind' key (`optimizer: {kind: AdamW, lr: 3e-4}`).
The runtime turns these into torch optimizers (runtime/optim.py); the schedules carry
their own math (`factor(step)`), since a schedule is nothing but that function.
"""

from __future__ import annotations

import math

import attrs
import torch

from .errors import StrategyError


def _positive(name: str):
    def check(instance, attribute, value) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise StrategyError(
                f"{type(instance).__name__}.{attribute.name}: must be a number > 0, got {value!r}."
            )

    return check


def _non_negative(instance, attribute, value) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise StrategyError(
            f"{type(instance).__name__}.{attribute.name}: must be a number >= 0, got {value!r}."
        )


def _flag(instance, attribute, value) -> None:
    if not isinstance(value, bool):
        raise StrategyError(
            f"{type(instance).__name__}.{attribute.name}: must be True or False, got {value!r}."
        )


def _fraction(instance, attribute, value) -> None:
    if not isinstance(value, int | float) or not 0 <= value <= 1:
        raise StrategyError(
            f"{type(instance).__name__}.{attribute.name}: must be in [0, 1], got {value!r}."
        )


def _betas(instance, attribute, value) -> None:
    if len(value) != 2 or not all(0 <= b < 1 for b in value):
        raise StrategyError(
            f"{type(instance).__name__}.{attribute.name}: expected two numbers in [0, 1), got {value!r}."
        )


def _optional_layer_decay(instance, attribute, value) -> None:
    if value is not None and not (isinstance(value, int | float) and 0 < value <= 1):
        raise StrategyError(
            f"{type(instance).__name__}.{attribute.name}: must be None or in (0, 1], got {value!r}."
        )


def _use_fused(fused: bool | None, foreach: bool | None, param_groups: list[dict]) -> bool:
    """torch's fused kernel unless the user chose otherwise: it exists for floating-point
    CPU and CUDA tensors and is several times faster than the per-tensor loop torch
    picks on CPU (bench/zero.py: 3 ms vs 20 ms for 5.3M parameters, one thread)."""
    if fused is not None:
        return fused
    if foreach:
        return False
    params = [p for group in param_groups for p in group["params"]]
    return bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )


def _patterns(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


# ---------------------------------------------------------------------- optimizers


@attrs.frozen(kw_only=True)
class AdamW:
    """torch.optim.AdamW, with parameter groups built from the model."""

    lr: float = attrs.field(default=1e-3, validator=_positive("lr"))
    """Peak learning rate; the schedule multiplies it by a factor each step."""

    betas: tuple[float, float] = attrs.field(
        default=(0.9, 0.999), converter=tuple, validator=_betas
    )
    """Decay rates of the first and second moment estimates."""

    eps: float = attrs.field(default=1e-8, validator=_positive("eps"))
    """Added to the denominator for numerical stability."""

    weight_decay: float = attrs.field(default=0.01, validator=_non_negative)
    """Decoupled weight decay, applied to every parameter not excluded below."""

    decay_norms_and_biases: bool = False
    """Also decay biases and the weights of normalization layers (LayerNorm, RMSNorm,
    BatchNorm, GroupNorm). Off by default, as in most transformer recipes."""

    no_decay: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    """Extra parameter-name patterns (fnmatch, e.g. '*pos_emb*') that get no weight decay."""

    layer_decay: float | None = attrs.field(default=None, validator=_optional_layer_decay)
    """Layer-wise LR decay: parameters of numbered layer i of L get lr * layer_decay**(L + 1 - i);
    parameters before the first numbered layer (embeddings) count as layer 0, those after
    the last as layer L + 1 (full lr). None turns it off."""

    foreach: bool | None = None
    """torch's multi-tensor implementation: None lets torch choose."""

    fused: bool | None = None
    """torch's fused kernel: None uses it where it exists (floating-point CPU and CUDA
    parameters) unless `foreach` is True; it matches the loop within float rounding."""

    def build(self, param_groups: list[dict]) -> torch.optim.Optimizer:
        """The torch optimizer over `param_groups` (dicts with 'params' and 'weight_decay')."""
        fused = _use_fused(self.fused, self.foreach, param_groups)
        return torch.optim.AdamW(
            param_groups,
            lr=self.lr,
            betas=self.betas,
            eps=self.eps,
            weight_decay=self.weight_decay,
            foreach=None if fused else self.foreach,
            fused=fused or None,
        )

    def state_bytes(self, param: torch.Tensor) -> int:
        """Optimizer-state bytes for one parameter: exp_avg, exp_avg_sq and a step counter."""
        return 2 * param.numel() * param.element_size() + 4


@attrs.frozen(kw_only=True)
class SGD:
    """torch.optim.SGD (with momentum), with parameter groups built from the model."""

    lr: float = attrs.field(default=1e-2, validator=_positive("lr"))
    """Peak learning rate; the schedule multiplies it by a factor each step."""

    momentum: float = attrs.field(default=0.9, validator=_fraction)
    """Momentum factor; 0 keeps no optimizer state."""

    dampening: float = attrs.field(default=0.0, validator=_fraction)
    """Dampening for momentum."""

    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0 and dampening 0)."""

    weight_decay: float = attrs.field(default=0.0, validator=_non_negative)
    """L2 penalty added to the gradient, for parameters not excluded below."""

    decay_norms_and_biases: bool = False
    """Also decay biases and normalization-layer weights."""

    no_decay: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    """Extra parameter-name patterns (fnmatch) that get no weight decay."""

    layer_decay: float | None = attrs.field(default=None, validator=_optional_layer_decay)
    """Layer-wise LR decay, as for AdamW.layer_decay."""

    foreach: bool | None = None
    """torch's multi-tensor implementation: None lets torch choose."""

    fused: bool | None = None
    """torch's fused kernel: None uses it where it exists, as for AdamW.fused."""

    def __attrs_post_init__(self) -> None:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise StrategyError("SGD.nesterov: needs momentum > 0 and dampening 0.")

    def build(self, param_groups: list[dict]) -> torch.optim.Optimizer:
        fused = _use_fused(self.fused, self.foreach, param_groups)
        return torch.optim.SGD(
            param_groups,
            lr=self.lr,
            momentum=self.momentum,
            dampening=self.dampening,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
            foreach=None if fused else self.foreach,
            fused=fused or None,
        )

    def state_bytes(self, param: torch.Tensor) -> int:
        """The momentum buffer, if any."""
        return param.numel() * param.element_size() if self.momentum > 0 else 0


OptimizerConfig = AdamW | SGD


# ---------------------------------------------------------------------- schedules


WARMUP_SHAPES = ("linear", "log")


def _check_steps(schedule) -> None:
    name = type(schedule).__name__
    if schedule.total_steps is None:
        raise StrategyError(
            f"{name}.total_steps: required (no default): the optimizer step at which the decay "
            "reaches min_lr_ratio. Set it to the number of optimizer steps you will train; a "
            "total_steps shorter than the run would hold the lr at its floor for the rest of it."
        )
    for field in ("warmup_steps", "total_steps"):
        value = getattr(schedule, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise StrategyError(f"{name}.{field}: must be an integer >= 0, got {value!r}.")
    if schedule.total_steps <= schedule.warmup_steps:
        raise StrategyError(
            f"{name}.total_steps: must be greater than warmup_steps "
            f"({schedule.total_steps} <= {schedule.warmup_steps})."
        )


def _check_warmup(schedule) -> None:
    name = type(schedule).__name__
    start = schedule.warmup_start
    if start is not None and (
        not isinstance(start, int | float) or isinstance(start, bool) or not 0 <= start <= 1
    ):
        raise StrategyError(f"{name}.warmup_start: must be None or in [0, 1], got {start!r}.")
    if schedule.warmup_shape not in WARMUP_SHAPES:
        raise StrategyError(
            f"{name}.warmup_shape: expected 'linear' or 'log', got {schedule.warmup_shape!r}."
        )
    if schedule.warmup_shape == "log" and start is not None and schedule.warmup_steps == 1:
        raise StrategyError(
            f"{name}.warmup_steps: a 'log' warmup from warmup_start needs 0 or >= 2 steps, got 1."
        )


def _warmup(schedule, step: int) -> float | None:
    """The warmup factor while warming up (step < warmup_steps), else None.

    warmup_start None: (step+1)/warmup_steps, so the first step is not at lr 0. A number s:
    s + (1 - s) * g, g = step/warmup_steps ('linear') or log(step+1)/log(warmup_steps)
    ('log'), DeepSpeed's warmup_type."""
    steps = schedule.warmup_steps
    if step >= steps:
        return None
    start = schedule.warmup_start
    if start is None:
        if schedule.warmup_shape == "log":
            return math.log(step + 2) / math.log(steps + 1)
        return (step + 1) / steps
    if schedule.warmup_shape == "log":
        return start + (1 - start) * math.log(step + 1) / math.log(steps)
    return start + (1 - start) * step / steps


def _decayed(schedule, step: int, shape) -> float:
    """Warmup, then min_lr_ratio + (1 - min_lr_ratio) * shape(progress), progress 0 -> 1
    from the end of warmup to total_steps (and 1 after)."""
    warm = _warmup(schedule, step)
    if warm is not None:
        return warm
    span = schedule.total_steps - schedule.warmup_steps
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * shape(progress)


@attrs.frozen(kw_only=True)
class Constant:
    """The optimizer's lr at every step, after an optional warmup (warm-up then constant:
    DeepSpeed's WarmupLR, Hugging Face's constant_with_warmup)."""

    warmup_steps: int = attrs.field(default=0, validator=_non_negative)
    """Optimizer steps of warmup to lr."""

    warmup_start: float | None = None
    """Factor of lr at step 0, rising to 1 at warmup_steps; None starts at 1/warmup_steps
    (so no step runs at lr 0). DeepSpeed's warmup_min_lr / warmup_max_lr."""

    warmup_shape: str = "linear"
    """'linear', or 'log' (log(step+1)/log(warmup_steps), DeepSpeed's default warmup_type)."""

    def __attrs_post_init__(self) -> None:
        _check_warmup(self)

    def factor(self, step: int) -> float:
        """LR multiplier for optimizer step `step` (0-based)."""
        warm = _warmup(self, step)
        return 1.0 if warm is None else warm


@attrs.frozen(kw_only=True)
class WarmupLinear:
    """Warmup, then linear decay to min_lr_ratio * lr at total_steps (DeepSpeed's
    WarmupDecayLR)."""

    warmup_steps: int = 0
    """Optimizer steps of warmup."""

    total_steps: int | None = None
    """Required: the step at which the decay reaches its floor (and stays there)."""

    min_lr_ratio: float = attrs.field(default=0.0, validator=_fraction)
    """Floor of the decay, as a fraction of lr."""

    warmup_start: float | None = None
    """Factor of lr at step 0 of the warmup (None: 1/warmup_steps), as for Constant."""

    warmup_shape: str = "linear"
    """'linear' or 'log' warmup, as for Constant."""

    def __attrs_post_init__(self) -> None:
        _check_steps(self)
        _check_warmup(self)

    def factor(self, step: int) -> float:
        return _decayed(self, step, lambda progress: 1 - progress)


@attrs.frozen(kw_only=True)
class WarmupCosine:
    """Warmup, then cosine decay to min_lr_ratio * lr at total_steps (DeepSpeed's
    WarmupCosineLR)."""

    warmup_steps: int = 0
    """Optimizer steps of warmup."""

    total_steps: int | None = None
    """Required: the step at which the cosine reaches its floor (and stays there)."""

    min_lr_ratio: float = attrs.field(default=0.0, validator=_fraction)
    """Floor of the decay, as a fraction of lr."""

    warmup_start: float | None = None
    """Factor of lr at step 0 of the warmup (None: 1/warmup_steps), as for Constant."""

    warmup_shape: str = "linear"
    """'linear' or 'log' warmup, as for Constant."""

    def __attrs_post_init__(self) -> None:
        _check_steps(self)
        _check_warmup(self)

    def factor(self, step: int) -> float:
        return _decayed(self, step, lambda progress: 0.5 * (1 + math.cos(math.pi * progress)))


@attrs.frozen(kw_only=True)
class Polynomial:
    """Warmup, then (1 - progress)**power decay to min_lr_ratio * lr at total_steps."""

    warmup_steps: int = 0
    """Optimizer steps of warmup."""

    total_steps: int | None = None
    """Required: the step at which the decay reaches its floor (and stays there)."""

    power: float = attrs.field(default=1.0, validator=_positive("power"))
    """Exponent of the decay; 1 is linear."""

    min_lr_ratio: float = attrs.field(default=0.0, validator=_fraction)
    """Floor of the decay, as a fraction of lr."""

    warmup_start: float | None = None
    """Factor of lr at step 0 of the warmup (None: 1/warmup_steps), as for Constant."""

    warmup_shape: str = "linear"
    """'linear' or 'log' warmup, as for Constant."""

    def __attrs_post_init__(self) -> None:
        _check_steps(self)
        _check_warmup(self)

    def factor(self, step: int) -> float:
        return _decayed(self, step, lambda progress: (1 - progress) ** self.power)


ScheduleConfig = Constant | WarmupLinear | WarmupCosine | Polynomial

KIND_SYNONYMS = {
    # DeepSpeed's scheduler and optimizer types
    "warmuplr": "Constant",
    "warmupdecaylr": "WarmupLinear",
    "warmupcosinelr": "WarmupCosine",
    "adam": "AdamW",
    # Hugging Face Trainer's lr_scheduler_type and torch.optim.lr_scheduler names
    "constant_with_warmup": "Constant",
    "constantlr": "Constant",
    "warmup": "Constant",
    "linear": "WarmupLinear",
    "linearlr": "WarmupLinear",
    "cosine": "WarmupCosine",
    "cosineannealinglr": "WarmupCosine",
    "polynomiallr": "Polynomial",
    "polynomial_decay": "Polynomial",
}
"""Names other libraries give the optimizers and schedules Strato has, lower-cased, mapped to
the Strato kind with the same meaning. A did-you-mean must never point a warm-up-then-constant
schedule at a decaying one (which would take the lr to 0 at a total_steps the user never set)."""


def _normalized(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def suggest_kind(kind: str, kinds) -> str:
    """' Did you mean X?' for an unknown `kind`: a synonym from KIND_SYNONYMS (same meaning)
    first, else the closest spelling."""
    import difflib

    by_name = {_normalized(k): k for k in kinds}
    synonyms = {_normalized(k): v for k, v in KIND_SYNONYMS.items()}
    synonym = synonyms.get(_normalized(kind))
    if synonym is not None and _normalized(synonym) in by_name:
        return f" Did you mean {synonym!r} (the same thing in Strato)?"
    if _normalized(kind) in ("onecycle", "onecyclelr", "cycliclr"):
        return (
            " Strato has no cyclic schedule (WarmupLinear with warmup_start is one up-down cycle)."
        )
    close = difflib.get_close_matches(_normalized(kind), list(by_name), n=1, cutoff=0.6)
    return f" Did you mean {by_name[close[0]]!r}?" if close else ""


# ---------------------------------------------------------------------- loss scaling


@attrs.frozen(kw_only=True)
class LossScaling:
    """Dynamic loss scaling for fp16 (ignored for fp32 and bf16)."""

    initial_scale: float = attrs.field(default=2.0**16, validator=_positive("initial_scale"))
    """The loss is multiplied by this before backward, until overflows lower it."""

    growth_factor: float = attrs.field(default=2.0, validator=_positive("growth_factor"))
    """Scale multiplier after `growth_interval` steps without inf/NaN gradients."""

    backoff_factor: float = attrs.field(default=0.5, validator=_fraction)
    """Scale multiplier after an overflow (once hysteresis is used up)."""

    growth_interval: int = attrs.field(default=2000, validator=_positive("growth_interval"))
    """Consecutive finite steps before the scale grows."""

    hysteresis: int = attrs.field(default=1, validator=_positive("hysteresis"))
    """Overflows tolerated before the scale backs off (each one still skips its step), as
    DeepSpeed's `hysteresis`: once used up, every overflow backs off until the count refills
    when the scale grows (or at every finite step, with `consecutive_hysteresis`). 1 backs
    off at every overflow."""

    consecutive_hysteresis: bool = attrs.field(default=False, validator=_flag)
    """Refill `hysteresis` after every finite step, so only overflows in a row count
    (DeepSpeed's `consecutive_hysteresis`); False: they count until the scale grows."""

    min_scale: float = attrs.field(default=1.0, validator=_positive("min_scale"))
    """The scale never backs off below this."""
