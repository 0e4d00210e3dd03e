"""DeepSpeed configs as Strategies, with DeepSpeed's semantics (its config-json page and
deepspeed/runtime/{config,zero/config,fp16/loss_scaler,lr_schedules}.py).

`convert_deepspeed(config)` returns the Strategy and a `DeepSpeedReport` of what became of
every key: honoured (mapped to a Strategy field), no effect in Strato (logging, knobs
Strato handles its own way), or not mapped yet (activation_checkpointing, pipeline). Keys
Strato cannot honour, and "auto" values nothing resolves, raise one StrategyError listing
them all. Keys a config leaves out take DeepSpeed's defaults where they change the math
(optimizer hyper-parameters, loss scaling, warmup); performance knobs left out keep Strato's.

"auto" values are resolved as the Hugging Face Trainer fills them: the train batch from the
micro batch, accumulation and world size; bucket sizes from the model's hidden size;
warmup_min_lr 0 and warmup_max_lr the optimizer's lr; bf16/fp16 "enabled" becomes
precision='auto'. The rest (learning rate, batch sizes, step counts...) come from the
Trainer's arguments, which Strato does not have: pass them as `auto={"dotted.key": value}`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import StrategyError
from .training_config import (
    SGD,
    AdamW,
    Constant,
    LossScaling,
    WarmupCosine,
    WarmupLinear,
)
from .zero_config import NVMe

HONOURED, NO_EFFECT, NOT_MAPPED = "honoured", "no effect", "not mapped yet"

_UNRESOLVED = object()
"""Stands in for an "auto" nothing resolved (the conversion goes on to list every problem)."""

# What the Hugging Face Trainer fills each "auto" from (TrainingArguments fields).
_HF_ARGUMENT = {
    "train_micro_batch_size_per_gpu": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "max_grad_norm",
    "optimizer.params.lr": "learning_rate",
    "optimizer.params.betas": "[adam_beta1, adam_beta2]",
    "optimizer.params.eps": "adam_epsilon",
    "optimizer.params.weight_decay": "weight_decay",
    "scheduler.params.warmup_num_steps": "warmup_steps",
    "scheduler.params.total_num_steps": "max_steps (the number of optimizer steps)",
}

# Top-level keys that have no effect in Strato, and why.
_NO_EFFECT = {
    "steps_per_print": "Strato prints nothing by itself; read engine.stats() when you want",
    "wall_clock_breakdown": "no DeepSpeed timers; engine.stats() has tokens/s",
    "dump_state": "no DeepSpeed state dump; print(strategy.to_yaml()) shows the settings",
    "memory_breakdown": "engine.explain() and engine.stats()['model_state_bytes'] report memory",
    "flops_profiler": "monitoring: log engine.stats() yourself",
    "tensorboard": "monitoring: log engine.stats() yourself",
    "wandb": "monitoring: log engine.stats() yourself",
    "csv_monitor": "monitoring: log engine.stats() yourself",
    "comet": "monitoring: log engine.stats() yourself",
    "zero_allow_untested_optimizer": "Strato's optimizers run under every ZeRO stage",
    "zero_force_ds_cpu_optimizer": "offloaded updates run torch's optimizer where the states are",
    "prescale_gradients": "gradients are averaged over ranks in fp32 (equal up to rounding)",
    "gradient_predivide_factor": "gradients are averaged over ranks in fp32 (equal up to rounding)",
    "dataloader_drop_last": "Strato builds no data loader",
    "aio": "NVMe offload uses memory-mapped files, not DeepSpeed's async I/O",
    "checkpoint": "engine.save_checkpoint writes its own safetensors format",
    "timers": "no DeepSpeed timers",
    "compile": "Strato always compiles the model into its graph",
    "nebula": "engine.save_checkpoint writes its own safetensors format",
    "disable_allgather": "no effect on Strato's collectives",
    "autotuning": "DeepSpeed's launcher-time autotuner",
}

# Sections whose features Strato lacks: refused when enabled, no effect when disabled.
_REFUSED_WHEN_ENABLED = {
    "amp": "NVIDIA Apex AMP: use the bf16 or fp16 section (Strategy.precision)",
    "elasticity": "elastic batch sizes are not supported",
    "curriculum_learning": "curriculum learning is not supported",
    "data_efficiency": "data-efficiency sampling/routing is not supported",
    "compression_training": "compression training is not supported",
    "sparse_attention": "sparse attention is not supported",
    "eigenvalue": "eigenvalue computation is not supported",
    "progressive_layer_drop": "progressive layer drop is not supported",
    "quantize_training": "quantized training is not supported",
    "hybrid_engine": "the RLHF hybrid engine is not supported",
    "weight_quantization": "weight quantization while training is not supported",
}

_NOT_MAPPED_SECTIONS = {
    "activation_checkpointing": "Strato has no activation checkpointing yet: activations are kept",
    "pipeline": "Strato has no pipeline parallelism yet: the model runs whole on each rank",
}

_CONVERTED = frozenset(
    {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "optimizer",
        "scheduler",
        "fp16",
        "bf16",
        "bfloat16",
        "zero_optimization",
    }
)
"""Top-level keys with their own converter below."""

_CHECKED = frozenset(
    {
        "communication_data_type",
        "data_types",
        "sparse_gradients",
        "sequence_parallel_size",
        "tensor_parallel",
    }
)
"""Top-level keys with no effect at their default value and refused otherwise."""

DEEPSPEED_KEYS = frozenset(
    {*_CONVERTED, *_CHECKED, *_NO_EFFECT, *_REFUSED_WHEN_ENABLED, *_NOT_MAPPED_SECTIONS}
    - {"optimizer", "scheduler", "compile", "checkpoint"}
)
"""Top-level keys only a DeepSpeed config has (optimizer, scheduler... are also Strato's)."""


def looks_like_deepspeed(data: Mapping[str, Any]) -> bool:
    """A DeepSpeed config: a DeepSpeed-only key, or {"optimizer": {"type": ...}}."""
    if any(key in DEEPSPEED_KEYS for key in data):
        return True
    return any(
        isinstance(data.get(key), Mapping) and "type" in data[key] and "kind" not in data[key]
        for key in ("optimizer", "scheduler")
    )


# ---------------------------------------------------------------------- report


@attrs.frozen
class ReportEntry:
    """What became of one key."""

    key: str
    """Dotted key in the DeepSpeed config ('zero_optimization.stage')."""
    value: Any
    status: str
    """'honoured', 'no effect' or 'not mapped yet'."""
    note: str
    """The Strato field it set (and how "auto" was resolved), or why it has no effect."""


@attrs.frozen
class DeepSpeedReport:
    """What became of every key of a DeepSpeed config; `print()` it to review the mapping."""

    source: str
    world_size: int
    """The data-parallel world size the batch sizes were resolved with."""
    world_size_from: str
    entries: tuple[ReportEntry, ...]

    def select(self, status: str) -> list[ReportEntry]:
        return [e for e in self.entries if e.status == status]

    def __str__(self) -> str:
        lines = [
            f"DeepSpeed config {self.source} (world size {self.world_size}, {self.world_size_from})"
        ]
        for status in (HONOURED, NO_EFFECT, NOT_MAPPED):
            entries = self.select(status)
            if not entries:
                continue
            lines.append(f"{status}:")
            width = max(len(f"{e.key} = {_short(e.value)}") for e in entries)
            for e in entries:
                lines.append(f"  {f'{e.key} = {_short(e.value)}':<{width}}  {e.note}")
        return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, Mapping) else "{...}"
    return text if len(text) <= 40 else text[:37] + "..."


def warn_about_report(report: DeepSpeedReport) -> None:
    """One warning naming the keys that have no effect or are not mapped yet."""
    quiet = report.select(NO_EFFECT) + report.select(NOT_MAPPED)
    if quiet:
        names = ", ".join(e.key for e in quiet)
        warnings.warn(
            f"DeepSpeed config {report.source}: {len(quiet)} key(s) have no effect in Strato or "
            f"are not mapped yet: {names}. print(strato.convert_deepspeed(config)[1]) shows "
            "what became of every key and why.",
            stacklevel=3,
        )


# ---------------------------------------------------------------------- conversion


def convert_deepspeed(
    source: str | Path | Mapping[str, Any],
    *,
    model: Any = None,
    world_size: int | None = None,
    auto: Mapping[str, Any] | None = None,
):
    """(Strategy, DeepSpeedReport) for a DeepSpeed config: a JSON file path or a dict.

    `world_size`: the data-parallel size the batch sizes are written for (default: the
    process group's, else $WORLD_SIZE, else 1; compile checks it again). `model` resolves
    hidden-size "auto" values and converts stage3_prefetch_bucket_size into layers.
    `auto`: values for the other "auto" entries, by dotted key."""
    config, name = _read(source)
    converter = _Converter(config, name, model, world_size, dict(auto or {}))
    return converter.run()


def _read(source) -> tuple[Mapping[str, Any], str]:
    if isinstance(source, Mapping):
        return source, "<dict>"
    path = Path(source)
    if not path.is_file():
        raise StrategyError(f"DeepSpeed config {str(path)!r} does not exist.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StrategyError(f"DeepSpeed config {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise StrategyError(f"DeepSpeed config {str(path)!r} must hold a JSON object.")
    return data, str(path)


def _world(world_size: int | None) -> tuple[int, str]:
    if world_size is not None:
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise StrategyError(
                f"from_deepspeed: world_size must be an integer >= 1, got {world_size!r}."
            )
        return world_size, "from world_size="
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), "from the process group"
    if os.environ.get("WORLD_SIZE", "").isdigit():
        return int(os.environ["WORLD_SIZE"]), "from $WORLD_SIZE"
    return 1, "assumed: no world_size=, no process group, no $WORLD_SIZE"


def _hidden_size(model: Any) -> int | None:
    """The model's hidden size, as the HF Trainer reads it (config.hidden_size or max of
    config.hidden_sizes), also from d_model / n_embd and from our GPT's `cfg`."""
    config = getattr(model, "config", None) or getattr(model, "cfg", None)
    for name in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    sizes = getattr(config, "hidden_sizes", None)
    return max(sizes) if sizes else None


def _ratio(value: float, peak: float) -> float:
    return float(value) / float(peak)


class _Converter:
    def __init__(self, config, source, model, world_size, auto) -> None:
        self.config, self.source, self.model, self.auto = config, source, model, auto
        self.world, self.world_from = _world(world_size)
        self.entries: list[ReportEntry] = []
        self.refused: list[str] = []
        self.unresolved: list[str] = []
        self.fields: dict[str, Any] = {}
        self.lr: Any = None
        self.resolved: dict[str, str] = {}
        """How each "auto" was resolved, by dotted key (shown in its report entry)."""

    # -------------------------------------------------------------- bookkeeping
    def honour(self, key: str, value: Any, note: str) -> None:
        if key in self.resolved:
            note = f"{self.resolved[key]}; {note}"
        self.entries.append(ReportEntry(key, value, HONOURED, note))

    def no_effect(self, key: str, value: Any, why: str) -> None:
        self.entries.append(ReportEntry(key, value, NO_EFFECT, why))

    def refuse(self, key: str, value: Any, why: str) -> None:
        self.refused.append(f"{key} = {_short(value)}: {why}")

    def get(self, section: Mapping, name: str, key: str, default: Any, resolve=None) -> Any:
        """section[name] (default when absent), with "auto" resolved: from `auto=`, else by
        `resolve()` -> (value, how) or None, else listed as unresolved."""
        value = section.get(name, default)
        if value != "auto":
            return value
        if key in self.auto:
            value = self.auto.pop(key)
            self.resolved[key] = f'"auto" -> {value!r} (from auto=)'
            return value
        resolved = resolve() if resolve is not None else None
        if resolved is not None:
            self.resolved[key] = f'"auto" -> {resolved[0]!r} ({resolved[1]})'
            return resolved[0]
        hint = _HF_ARGUMENT.get(key)
        origin = f" (the HF Trainer fills it from TrainingArguments.{hint})" if hint else ""
        self.unresolved.append(
            f'{key} is "auto"{origin}: write the value in the config or pass '
            f"auto={{{key!r}: <value>}}"
        )
        return _UNRESOLVED

    def run(self):
        from .strategy import Strategy

        handlers = {
            "optimizer": self._optimizer,
            "scheduler": self._scheduler,
            "zero_optimization": self._zero,
        }
        self._batch_sizes()
        self._clipping()
        self._precision()
        for key in ("optimizer", "scheduler", "zero_optimization"):
            value = self.config.get(key)
            if value is not None:
                if not isinstance(value, Mapping):
                    self.refuse(key, value, "expected a JSON object")
                else:
                    handlers[key](value)
        for key, value in self.config.items():
            self._top_level(key, value)
        for key in self.auto:
            self.refuse(f"auto[{key!r}]", self.auto[key], 'matches no "auto" value in the config')
        if self.refused or self.unresolved:
            problems = [*self.refused, *self.unresolved]
            raise StrategyError(
                f"DeepSpeed config {self.source}: {len(problems)} key(s) Strato cannot honour:\n  "
                + "\n  ".join(problems)
            )
        if self.fields.get("zero") and "optimizer" not in self.fields:
            raise StrategyError(
                f"DeepSpeed config {self.source}: zero_optimization.stage "
                f"{self.fields['zero']} needs an optimizer, and the config has no 'optimizer' "
                "section (DeepSpeed then takes the client's): add one, e.g. "
                '"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}.'
            )
        try:
            strategy = Strategy(**self.fields)
        except StrategyError as exc:
            raise StrategyError(f"DeepSpeed config {self.source}: {exc}") from exc
        report = DeepSpeedReport(self.source, self.world, self.world_from, tuple(self.entries))
        return strategy, report

    def _top_level(self, key: str, value: Any) -> None:
        if key in _CONVERTED:
            return
        if key == "communication_data_type":
            if value in (None, "fp32", "float32"):
                self.no_effect(key, value, "gradients are communicated in fp32")
            else:
                self.refuse(key, value, "Strato communicates gradients in fp32 only")
        elif key == "data_types":
            dtype = value.get("grad_accum_dtype") if isinstance(value, Mapping) else value
            if dtype in (None, "fp32", "float32"):
                self.no_effect(key, value, "gradients accumulate in fp32")
            else:
                self.refuse(key, value, "Strato accumulates gradients in fp32 only")
        elif key == "sparse_gradients":
            if value:
                self.refuse(key, value, "sparse (embedding) gradients are not supported")
            else:
                self.no_effect(key, value, "dense gradients, as Strato's")
        elif key == "sequence_parallel_size":
            if value in (None, 1):
                self.no_effect(key, value, "no sequence parallelism")
            else:
                self.refuse(key, value, "sequence parallelism is not supported")
        elif key == "tensor_parallel":
            size = (
                value.get("autotp_size", value.get("tp_size", 1))
                if isinstance(value, Mapping)
                else 1
            )
            if size in (None, 0, 1):
                self.no_effect(key, value, "no tensor parallelism")
            else:
                self.refuse(key, value, "tensor parallelism is not supported")
        elif key in _NO_EFFECT:
            self.no_effect(key, value, _NO_EFFECT[key])
        elif key in _REFUSED_WHEN_ENABLED:
            enabled = value.get("enabled", False) if isinstance(value, Mapping) else bool(value)
            if enabled:
                self.refuse(key, value, _REFUSED_WHEN_ENABLED[key])
            else:
                self.no_effect(key, value, "disabled")
        elif key in _NOT_MAPPED_SECTIONS:
            self.entries.append(ReportEntry(key, value, NOT_MAPPED, _NOT_MAPPED_SECTIONS[key]))
        else:
            self.refuse(key, value, "not a DeepSpeed key Strato knows")

    # -------------------------------------------------------------- batch sizes
    def _batch_sizes(self) -> None:
        """DeepSpeed's _set_batch_related_parameters: fill the missing one of train batch,
        micro batch and accumulation from the others and the world size, then check."""
        cfg, world = self.config, self.world
        total = cfg.get("train_batch_size")
        total_given = total is not None and total != "auto"
        if total == "auto":  # the HF Trainer writes micro x accumulation x world
            total = None
        micro = self.get(
            cfg, "train_micro_batch_size_per_gpu", "train_micro_batch_size_per_gpu", None
        )
        accumulation = self.get(
            cfg, "gradient_accumulation_steps", "gradient_accumulation_steps", None
        )
        if _UNRESOLVED in (micro, accumulation):
            return
        for key, value in (
            ("train_batch_size", total),
            ("train_micro_batch_size_per_gpu", micro),
            ("gradient_accumulation_steps", accumulation),
        ):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                self.refuse(key, value, "must be an integer >= 1")
                return
        if total is not None and micro is not None and accumulation is not None:
            pass
        elif total is not None and micro is not None:
            accumulation = total // micro // world
        elif total is not None and accumulation is not None:
            micro = total // world // accumulation
        elif micro is not None and accumulation is not None:
            total = micro * accumulation * world
        elif total is not None:
            accumulation, micro = 1, total // world
        elif micro is not None:
            accumulation, total = 1, micro * world
        elif accumulation is not None:
            self.refuse(
                "gradient_accumulation_steps",
                accumulation,
                "DeepSpeed needs train_batch_size or train_micro_batch_size_per_gpu with it",
            )
            return
        else:
            self.fields["grad_accumulation"] = 1
            return
        if micro < 1 or accumulation < 1 or total != micro * accumulation * world:
            self.refuse(
                "train_batch_size",
                cfg.get("train_batch_size"),
                f"train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
                f"gradient_accumulation_steps {accumulation} x world size {world} "
                f"({self.world_from}) = {micro * accumulation * world}",
            )
            return
        self.fields.update(grad_accumulation=accumulation, micro_batch_size=micro)
        if total_given:
            self.fields["train_batch_size"] = total
        world_note = f"world size {world}, {self.world_from}"
        self.honour(
            "train_batch_size",
            cfg.get("train_batch_size", total),
            f"train_batch_size={total if total_given else None}"
            + ("" if total_given else f" (= {total} at {world_note}; checked at compile)"),
        )
        self.honour(
            "train_micro_batch_size_per_gpu",
            cfg.get("train_micro_batch_size_per_gpu", micro),
            f"micro_batch_size={micro}",
        )
        self.honour(
            "gradient_accumulation_steps",
            cfg.get("gradient_accumulation_steps", accumulation),
            f"grad_accumulation={accumulation}",
        )

    def _clipping(self) -> None:
        if "gradient_clipping" not in self.config:
            return
        value = self.get(self.config, "gradient_clipping", "gradient_clipping", 0.0)
        if value is _UNRESOLVED:
            return
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            self.refuse("gradient_clipping", value, "must be a number >= 0")
            return
        self.fields["grad_clip"] = float(value) if value > 0 else None
        note = f"grad_clip={self.fields['grad_clip']}" + ("" if value > 0 else " (0: no clipping)")
        self.honour("gradient_clipping", self.config["gradient_clipping"], note)

    # -------------------------------------------------------------- precision
    def _precision(self) -> None:
        cfg = self.config
        bf16_key = "bf16" if "bf16" in cfg else "bfloat16"  # DeepSpeed reads either
        bf16, fp16 = cfg.get(bf16_key) or {}, cfg.get("fp16") or {}
        for key, section in ((bf16_key, bf16), ("fp16", fp16)):
            if not isinstance(section, Mapping):
                self.refuse(key, section, 'expected a JSON object like {"enabled": true}')
                return
        bf16_on = self.auto.pop(f"{bf16_key}.enabled", bf16.get("enabled", False))
        fp16_on = self.auto.pop("fp16.enabled", fp16.get("enabled", False))
        if bf16_on is True and fp16_on is True:
            self.refuse(f"{bf16_key}.enabled", True, "bf16 and fp16 cannot both be enabled")
            return
        if bf16_on is True:
            precision = "bf16"
        elif fp16_on is True:
            precision = "fp16"
        elif "auto" in (bf16_on, fp16_on):
            precision = "auto"
        else:
            precision = "fp32"
        self.fields["precision"] = precision
        notes = {
            "bf16": "precision='bf16' (matmuls in bf16, fp32 master weights)",
            "fp16": "precision='fp16' (matmuls in fp16, dynamic loss scaling, fp32 master weights)",
            "auto": "precision='auto': bf16 where this hardware computes it natively, else fp32 "
            "(the HF Trainer fills it from --bf16/--fp16; write true to force one)",
            "fp32": "precision='fp32'",
        }
        for key, section in ((bf16_key, bf16), ("fp16", fp16)):
            if "enabled" in section:
                self.honour(f"{key}.enabled", section["enabled"], notes[precision])
        for name, value in bf16.items():
            key = f"{bf16_key}.{name}"
            if name == "enabled":
                continue
            if name in ("bf16_master_weights_and_grads", "bf16_optimizer_states") and value:
                self.refuse(key, value, "Strato keeps fp32 master weights, gradients and states")
            elif name in (
                "immediate_grad_update",
                "check_grad_overflow",
                "bf16_master_weights_and_grads",
                "bf16_optimizer_states",
            ):
                self.no_effect(
                    key, value, "Strato's bf16 keeps fp32 master weights and updates at the step"
                )
            else:
                self.refuse(key, value, "not a bf16 key Strato knows")
        self._loss_scaling(fp16, active=precision == "fp16")

    def _loss_scaling(self, fp16: Mapping, active: bool) -> None:
        """DeepSpeed's DynamicLossScaler: scale 2**initial_scale_power, x2 after
        loss_scale_window finite steps, /2 once `hysteresis` overflows used up, never below
        min_loss_scale; loss_scale > 0 is a fixed scale. Its defaults when a key is absent."""
        if not active and set(fp16) <= {"enabled"}:
            return
        static = fp16.get("loss_scale", 0)
        power = fp16.get("initial_scale_power", 16)
        window = fp16.get("loss_scale_window", 1000)
        hysteresis = fp16.get("hysteresis", 2)
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
                    min_scale=float(min_scale),
                )
        except (StrategyError, TypeError, ValueError, OverflowError) as exc:
            self.refuse("fp16", dict(fp16), str(exc))
            return
        self.fields["loss_scaling"] = scaling
        fixed = "a fixed scale (overflowing steps are still skipped)"
        fields = {
            "loss_scale": f"LossScaling.initial_scale={static:g}, {fixed}"
            if static
            else "0: dynamic loss scaling",
            "initial_scale_power": f"LossScaling.initial_scale=2**{power}",
            "loss_scale_window": f"LossScaling.growth_interval={window}",
            "hysteresis": f"LossScaling.hysteresis={hysteresis} (Strato re-arms it after each "
            "backoff, DeepSpeed after a growth)",
            "min_loss_scale": f"LossScaling.min_scale={min_scale}",
            "consecutive_hysteresis": "false: overflows count until the scale changes",
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
                self.no_effect(key, value, "fp16 is not enabled")
            elif name == "consecutive_hysteresis" and value:
                self.refuse(
                    key,
                    value,
                    "Strato counts overflows until the scale changes (DeepSpeed's default, false)",
                )
            elif name in ("fp16_master_weights_and_grads", "fp16_optimizer_states") and value:
                self.refuse(key, value, "Strato keeps fp32 master weights, gradients and states")
            elif name in fields:
                if static and name in ("initial_scale_power", "loss_scale_window", "hysteresis"):
                    self.no_effect(key, value, "loss_scale > 0 fixes the scale")
                else:
                    self.honour(key, value, fields[name])
            elif name in inert:
                self.no_effect(key, value, inert[name])
            else:
                self.refuse(key, value, "not an fp16 key Strato knows")

    # -------------------------------------------------------------- optimizer
    def _optimizer(self, section: Mapping) -> None:
        kind = str(section.get("type", ""))
        params = section.get("params", {}) or {}
        extra = set(section) - {"type", "params"}
        for name in sorted(extra):
            self.refuse(f"optimizer.{name}", section[name], "an optimizer has 'type' and 'params'")
        if not isinstance(params, Mapping):
            self.refuse("optimizer.params", params, "expected a JSON object")
            return
        lower = kind.lower()
        if lower in ("adam", "adamw"):
            self._adam(kind, params)
        elif lower == "sgd":
            self._sgd(params)
        else:
            self.refuse(
                "optimizer.type",
                kind,
                "Strato has Adam/AdamW and SGD (strato.AdamW, strato.SGD); write one of "
                "those or leave DeepSpeed's own optimizers (Lamb, OneBitAdam, ...) out",
            )

    def _param(self, params: Mapping, name: str, default: Any, resolve=None) -> Any:
        return self.get(params, name, f"optimizer.params.{name}", default, resolve)

    def _adam(self, kind: str, params: Mapping) -> None:
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
            self.refuse(
                f"optimizer.params.{name}", params[name], "not an Adam parameter Strato knows"
            )
        torch_adam = bool(params.get("torch_adam", False))
        # DeepSpeed: type AdamW is always decoupled; Adam is too unless adam_w_mode is false.
        w_mode = kind.lower() == "adamw" or bool(params.get("adam_w_mode", True))
        # torch.optim.AdamW defaults to weight_decay 0.01; DeepSpeed's FusedAdam / CPUAdam to 0.
        decay_default = 0.01 if torch_adam and w_mode else 0.0
        lr = self._param(params, "lr", 1e-3)
        betas = self._param(params, "betas", [0.9, 0.999])
        eps = self._param(params, "eps", 1e-8)
        decay = self._param(params, "weight_decay", decay_default)
        if params.get("amsgrad"):
            self.refuse("optimizer.params.amsgrad", True, "AMSGrad is not supported")
        if params.get("bias_correction", True) is False:
            self.refuse(
                "optimizer.params.bias_correction",
                False,
                "Adam without bias correction is not supported",
            )
        if not w_mode and decay not in (0, 0.0, _UNRESOLVED):
            self.refuse(
                "optimizer.params.adam_w_mode",
                False,
                "Adam with L2 weight decay is not supported: Strato's AdamW decays decoupled "
                "(set adam_w_mode true, or weight_decay 0)",
            )
        if _UNRESOLVED in (lr, betas, eps, decay):
            return
        try:
            self.fields["optimizer"] = AdamW(lr=lr, betas=tuple(betas), eps=eps, weight_decay=decay)
        except (StrategyError, TypeError) as exc:
            self.refuse("optimizer.params", dict(params), str(exc))
            return
        self.lr = lr
        self.honour(
            "optimizer.type",
            kind,
            f"optimizer=AdamW (decoupled weight decay{', adam_w_mode' if kind.lower() == 'adam' else ''})",
        )
        for name, value in (("lr", lr), ("betas", list(betas)), ("eps", eps)):
            self.honour(
                f"optimizer.params.{name}", params.get(name, value), f"AdamW.{name}={value}"
            )
        self.honour(
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
                self.no_effect(
                    f"optimizer.params.{name}",
                    params[name],
                    "torch's AdamW (fused kernel where it exists) runs in every case",
                )
        if "amsgrad" in params:
            self.honour("optimizer.params.amsgrad", False, "AMSGrad off, as torch's AdamW")
        if "bias_correction" in params:
            self.honour("optimizer.params.bias_correction", True, "as torch's AdamW")

    def _sgd(self, params: Mapping) -> None:
        known = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "foreach", "fused"}
        for name in sorted(set(params) - known):
            self.refuse(
                f"optimizer.params.{name}", params[name], "not an SGD parameter Strato knows"
            )
        values = {  # torch.optim.SGD's defaults, which DeepSpeed passes through
            "lr": self._param(params, "lr", 1e-3),
            "momentum": self._param(params, "momentum", 0.0),
            "dampening": self._param(params, "dampening", 0.0),
            "weight_decay": self._param(params, "weight_decay", 0.0),
            "nesterov": self._param(params, "nesterov", False),
        }
        if _UNRESOLVED in values.values():
            return
        try:
            self.fields["optimizer"] = SGD(**values)
        except (StrategyError, TypeError) as exc:
            self.refuse("optimizer.params", dict(params), str(exc))
            return
        self.lr = values["lr"]
        self.honour("optimizer.type", "SGD", "optimizer=SGD")
        for name, value in values.items():
            self.honour(f"optimizer.params.{name}", params.get(name, value), f"SGD.{name}={value}")
        for name in ("foreach", "fused"):
            if name in params:
                self.no_effect(f"optimizer.params.{name}", params[name], "torch picks the kernel")

    # -------------------------------------------------------------- scheduler
    def _scheduler(self, section: Mapping) -> None:
        kind = str(section.get("type", ""))
        params = section.get("params", {}) or {}
        for name in sorted(set(section) - {"type", "params"}):
            self.refuse(f"scheduler.{name}", section[name], "a scheduler has 'type' and 'params'")
        builders = {
            "warmuplr": self._warmup_lr,
            "warmupdecaylr": self._warmup_lr,
            "warmupcosinelr": self._warmup_cosine,
            "onecycle": self._one_cycle,
        }
        builder = builders.get(kind.lower())
        if builder is None:
            self.refuse(
                "scheduler.type",
                kind,
                "Strato maps WarmupLR, WarmupDecayLR, WarmupCosineLR and OneCycle (without "
                "momentum cycling or post-cycle decay)",
            )
            return
        if self.lr is None and "optimizer" not in self.config:
            self.refuse("scheduler", kind, "a scheduler needs an 'optimizer' section here")
            return
        if self.lr is None:  # the optimizer was refused or unresolved: listed already
            return
        builder(kind, params)

    def _sched(self, params: Mapping, name: str, default: Any, resolve=None) -> Any:
        return self.get(params, name, f"scheduler.params.{name}", default, resolve)

    def _warmup_shape(self, params: Mapping) -> str:
        shape = params.get("warmup_type", "log")  # DeepSpeed's default: log
        if shape not in ("log", "linear"):
            self.honour("scheduler.params.warmup_type", shape, "unknown: 'log', as DeepSpeed does")
            return "log"
        if "warmup_type" in params:
            self.honour("scheduler.params.warmup_type", shape, f"warmup_shape={shape!r}")
        return shape

    def _check_params(self, params: Mapping, known: set[str]) -> None:
        for name in sorted(set(params) - known - {"last_batch_iteration"}):
            self.refuse(
                f"scheduler.params.{name}", params[name], "not a parameter of this scheduler"
            )
        if "last_batch_iteration" in params:
            self.no_effect(
                "scheduler.params.last_batch_iteration",
                params["last_batch_iteration"],
                "engine.load_checkpoint resumes the schedule",
            )

    def _warmup_steps(self, params: Mapping) -> Any:
        steps = self._sched(params, "warmup_num_steps", 1000)
        if steps is _UNRESOLVED:
            return steps
        if not isinstance(steps, int) or steps < 0:
            self.refuse("scheduler.params.warmup_num_steps", steps, "must be an integer >= 0")
            return _UNRESOLVED
        return max(2, steps)  # DeepSpeed: warmup_num_steps = max(2, warmup_num_steps)

    def _warmup_lr(self, kind: str, params: Mapping) -> None:
        """WarmupLR: warmup_min_lr -> warmup_max_lr over warmup_num_steps, then constant;
        WarmupDecayLR: then linear decay to warmup_min_lr at total_num_steps. They set the lr
        themselves: the optimizer's lr becomes warmup_max_lr."""
        decay = kind.lower() == "warmupdecaylr"
        known = {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"}
        self._check_params(params, known | ({"total_num_steps"} if decay else set()))
        low = self._sched(params, "warmup_min_lr", 0.0, lambda: (0.0, "as the HF Trainer fills it"))
        peak = self._sched(
            params,
            "warmup_max_lr",
            self.lr,
            lambda: (self.lr, "the optimizer's lr, as the HF Trainer fills it"),
        )
        steps = self._warmup_steps(params)
        total = self._sched(params, "total_num_steps", None) if decay else None
        if _UNRESOLVED in (low, peak, steps, total):
            return
        if decay and total is None:
            self.refuse(
                "scheduler.params.total_num_steps", None, "WarmupDecayLR needs total_num_steps"
            )
            return
        if not isinstance(peak, int | float) or not peak > 0 or not 0 <= low <= peak:
            self.refuse(
                "scheduler.params.warmup_max_lr",
                peak,
                f"needs 0 <= warmup_min_lr ({low}) <= warmup_max_lr, warmup_max_lr > 0",
            )
            return
        start = _ratio(low, peak)
        shape = self._warmup_shape(params)
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
            self.refuse("scheduler.params", dict(params), str(exc))
            return
        self._set_lr(peak, f"{kind} sets the lr: optimizer lr = warmup_max_lr")
        self.fields["schedule"] = schedule
        name = type(schedule).__name__
        self.honour(
            "scheduler.type",
            kind,
            f"schedule={name} (warm-up then " + ("linear decay)" if decay else "constant)"),
        )
        self.honour(
            "scheduler.params.warmup_min_lr",
            params.get("warmup_min_lr", low),
            f"{name}.warmup_start={start:g} (warmup_min_lr / warmup_max_lr)",
        )
        self.honour(
            "scheduler.params.warmup_max_lr", params.get("warmup_max_lr", peak), f"lr={peak}"
        )
        given_steps = params.get("warmup_num_steps", 1000)
        at_least = (
            " (DeepSpeed warms up at least 2 steps)" if steps == 2 and given_steps != 2 else ""
        )
        self.honour(
            "scheduler.params.warmup_num_steps",
            given_steps,
            f"{name}.warmup_steps={steps}{at_least}",
        )
        if decay:
            self.honour(
                "scheduler.params.total_num_steps",
                params["total_num_steps"],
                f"WarmupLinear.total_steps={total}, decaying to warmup_min_lr (min_lr_ratio={start:g})",
            )

    def _warmup_cosine(self, kind: str, params: Mapping) -> None:
        """WarmupCosineLR: ratios of the optimizer's lr, warmup_min_ratio -> 1 over the
        warmup, then cosine down to cos_min_ratio at total_num_steps."""
        self._check_params(
            params,
            {
                "total_num_steps",
                "warmup_min_ratio",
                "warmup_num_steps",
                "cos_min_ratio",
                "warmup_type",
            },
        )
        total = self._sched(params, "total_num_steps", None)
        start = self._sched(params, "warmup_min_ratio", 0.0)
        floor = self._sched(params, "cos_min_ratio", 0.0001)
        steps = self._warmup_steps(params)
        if _UNRESOLVED in (total, start, floor, steps):
            return
        if total is None:
            self.refuse(
                "scheduler.params.total_num_steps", None, "WarmupCosineLR needs total_num_steps"
            )
            return
        shape = self._warmup_shape(params)
        try:
            schedule = WarmupCosine(
                warmup_steps=steps,
                total_steps=total,
                min_lr_ratio=floor,
                warmup_start=start,
                warmup_shape=shape,
            )
        except StrategyError as exc:
            self.refuse("scheduler.params", dict(params), str(exc))
            return
        self.fields["schedule"] = schedule
        self.honour("scheduler.type", kind, "schedule=WarmupCosine")
        self.honour(
            "scheduler.params.total_num_steps",
            params["total_num_steps"],
            f"WarmupCosine.total_steps={total}",
        )
        self.honour(
            "scheduler.params.warmup_min_ratio",
            params.get("warmup_min_ratio", start),
            f"WarmupCosine.warmup_start={start}",
        )
        self.honour(
            "scheduler.params.cos_min_ratio",
            params.get("cos_min_ratio", floor),
            f"WarmupCosine.min_lr_ratio={floor}",
        )
        self.honour(
            "scheduler.params.warmup_num_steps",
            params.get("warmup_num_steps", 1000),
            f"WarmupCosine.warmup_steps={steps}",
        )

    def _one_cycle(self, kind: str, params: Mapping) -> None:
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
        self._check_params(params, known)
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
            self.refuse(f"scheduler.params.{name}", value, why)
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
            self.refuse("scheduler.params", dict(params), str(exc))
            return
        self._set_lr(peak, "OneCycle sets the lr: optimizer lr = cycle_max_lr")
        self.fields["schedule"] = schedule
        self.honour(
            "scheduler.type", kind, "schedule=WarmupLinear (one up-down cycle, then cycle_min_lr)"
        )
        for name in sorted(set(params) & known):
            self.honour(f"scheduler.params.{name}", params[name], "see scheduler.type")

    def _set_lr(self, lr: float, why: str) -> None:
        optimizer = self.fields.get("optimizer")
        if optimizer is None or optimizer.lr == lr:
            return
        given = self.config.get("optimizer", {}).get("params", {}).get("lr")
        self.fields["optimizer"] = attrs.evolve(optimizer, lr=lr)
        self.entries = [e for e in self.entries if e.key != "optimizer.params.lr"]
        if given is not None:
            self.no_effect("optimizer.params.lr", given, why)

    # -------------------------------------------------------------- ZeRO
    def _zero(self, section: Mapping) -> None:
        stage = section.get("stage", 0)
        if stage not in (0, 1, 2, 3):
            self.refuse("zero_optimization.stage", stage, "expected 0, 1, 2 or 3")
            return
        self.fields["zero"] = stage
        self.honour("zero_optimization.stage", stage, f"zero={stage}")
        hidden = _hidden_size(self.model)
        need = "pass model= (the HF Trainer uses the model's hidden size)"

        def by_hidden(factor: float, power: int):
            """HF Trainer's fill: factor x hidden_size**power elements."""

            def resolve():
                if hidden is None:
                    return None
                how = f"{factor:g} x hidden_size{'^2' if power == 2 else ''}, hidden_size {hidden}"
                return int(factor * hidden**power), how

            return resolve

        handled = {"stage", "offload_optimizer", "offload_param", "cpu_offload"}
        self._offload(section, stage)
        # Sizes in elements (DeepSpeed) -> Strato's units.
        if "reduce_bucket_size" in section:
            handled.add("reduce_bucket_size")
            size = self.get(
                section,
                "reduce_bucket_size",
                "zero_optimization.reduce_bucket_size",
                None,
                by_hidden(1, 2),
            )
            if size is _UNRESOLVED and hidden is None:
                self.unresolved[-1] += f" ({need})"
            elif size is not _UNRESOLVED and stage:
                mb = int(size) * 4 / 2**20
                self.fields["zero_bucket_mb"] = mb
                self.honour(
                    "zero_optimization.reduce_bucket_size",
                    section["reduce_bucket_size"],
                    f"zero_bucket_mb={mb:g} ({int(size):,} fp32 elements)",
                )
            elif size is not _UNRESOLVED:
                self.no_effect(
                    "zero_optimization.reduce_bucket_size",
                    size,
                    "stage 0 all-reduces ~25 MiB buckets",
                )
        for ds_name in ("stage3_prefetch_bucket_size", "prefetch_bucket_size"):
            if ds_name in section:
                handled.add(ds_name)
                size = self.get(
                    section, ds_name, f"zero_optimization.{ds_name}", None, by_hidden(0.9, 2)
                )
                if size is _UNRESOLVED and hidden is None:
                    self.unresolved[-1] += f" ({need})"
                elif size is not _UNRESOLVED:
                    self._prefetch(
                        f"zero_optimization.{ds_name}", section[ds_name], int(size), stage
                    )
        for ds_name in ("stage3_param_persistence_threshold", "param_persistence_threshold"):
            if ds_name in section:
                handled.add(ds_name)
                size = self.get(
                    section, ds_name, f"zero_optimization.{ds_name}", None, by_hidden(10, 1)
                )
                if size is _UNRESOLVED and hidden is None:
                    self.unresolved[-1] += f" ({need})"
                elif size is not _UNRESOLVED and stage == 3:
                    self.fields["zero_small_param_threshold"] = int(size)
                    self.honour(
                        f"zero_optimization.{ds_name}",
                        section[ds_name],
                        f"zero_small_param_threshold={int(size)}",
                    )
                elif size is not _UNRESOLVED:
                    self.no_effect(f"zero_optimization.{ds_name}", size, "stage 3 only")
        for name, value in section.items():
            if name in handled:
                continue
            self._zero_knob(name, value, stage)

    def _prefetch(self, key: str, given: Any, elements: int, stage: int) -> None:
        """DeepSpeed prefetches `elements` parameters ahead; Strato gathers whole layers
        (zero_prefetch of them): as many layers as fit, at least one when elements > 0."""
        if stage != 3:
            self.no_effect(key, given, "stage 3 only")
            return
        if elements <= 0:
            self.fields["zero_prefetch"] = 0
            self.honour(key, given, "zero_prefetch=0 (gather only when needed)")
            return
        if self.model is None:
            self.honour(
                key, given, "zero_prefetch=1 kept: pass model= to convert elements into layers"
            )
            return
        from ..passes.zero import unit_name

        sizes: dict[str, int] = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                unit = unit_name(name)
                sizes[unit] = sizes.get(unit, 0) + param.numel()
        numbered = [n for u, n in sizes.items() if any(c.isdigit() for c in u)] or list(
            sizes.values()
        )
        layer = max(numbered) if numbered else 1
        layers = max(1, elements // layer)
        self.fields["zero_prefetch"] = layers
        self.honour(key, given, f"zero_prefetch={layers} (layers of up to {layer:,} parameters)")

    def _offload(self, section: Mapping, stage: int) -> None:
        """offload_optimizer / offload_param {device: none|cpu|nvme, nvme_path} -> offload.
        Strato offloads the optimizer state (and at stage 3 the parameter shards with it)."""
        targets = {}
        for name in ("offload_optimizer", "offload_param"):
            sub = section.get(name)
            if sub is None:
                continue
            if not isinstance(sub, Mapping):
                self.refuse(
                    f"zero_optimization.{name}", sub, 'expected {"device": "cpu"|"nvme"|"none"}'
                )
                continue
            device = str(sub.get("device", "none")).lower()
            for knob, value in sub.items():
                key = f"zero_optimization.{name}.{knob}"
                if knob in ("device", "nvme_path"):
                    continue
                if knob == "ratio" and value != 1:
                    self.refuse(key, value, "partial offload is not supported")
                elif knob in (
                    "pin_memory",
                    "buffer_count",
                    "buffer_size",
                    "max_in_cpu",
                    "fast_init",
                    "pipeline_read",
                    "pipeline_write",
                    "pipeline",
                    "ratio",
                ):
                    self.no_effect(key, value, "Strato's offload has no such tuning")
                else:
                    self.refuse(key, value, f"not an {name} key Strato knows")
            if device == "none":
                self.no_effect(f"zero_optimization.{name}.device", "none", "no offload")
                continue
            if device == "cpu":
                targets[name] = "cpu"
            elif device == "nvme":
                path = sub.get("nvme_path")
                if not path:
                    self.refuse(
                        f"zero_optimization.{name}.nvme_path", path, "nvme offload needs nvme_path"
                    )
                    continue
                targets[name] = NVMe(str(path))
            else:
                self.refuse(
                    f"zero_optimization.{name}.device", device, "expected none, cpu or nvme"
                )
        if section.get("cpu_offload"):  # DeepSpeed's deprecated spelling of offload_optimizer cpu
            targets.setdefault("offload_optimizer", "cpu")
            self.honour("zero_optimization.cpu_offload", True, "as offload_optimizer device cpu")
        elif "cpu_offload" in section:
            self.no_effect("zero_optimization.cpu_offload", False, "no offload")
        if not targets:
            return
        optimizer, param = targets.get("offload_optimizer"), targets.get("offload_param")
        if stage == 0:
            self.refuse(
                "zero_optimization.offload_optimizer",
                str(optimizer or param),
                "offloading needs ZeRO stage 1, 2 or 3",
            )
            return
        if param is not None and optimizer is None:
            self.refuse(
                "zero_optimization.offload_param",
                str(param),
                "Strato offloads parameter shards only with the optimizer state: add "
                "offload_optimizer with the same device",
            )
            return
        if param is not None and param != optimizer:
            self.refuse(
                "zero_optimization.offload_param",
                str(param),
                f"Strato offloads both to one place; offload_optimizer says {optimizer}",
            )
            return
        self.fields["offload"] = optimizer
        where = optimizer if optimizer == "cpu" else f"NVMe({optimizer.path!r})"
        if "offload_optimizer" in section:
            shards = " (at stage 3 the parameter shards go there too)" if stage == 3 else ""
            self.honour(
                "zero_optimization.offload_optimizer",
                dict(section["offload_optimizer"]),
                f"offload={where!s}{shards}",
            )
        if param is not None:
            if stage == 3:
                self.honour(
                    "zero_optimization.offload_param",
                    dict(section["offload_param"]),
                    f"offload={where!s}",
                )
            else:
                self.no_effect(
                    "zero_optimization.offload_param",
                    dict(section["offload_param"]),
                    "parameters are only offloaded at stage 3 (as in DeepSpeed)",
                )

    def _zero_knob(self, name: str, value: Any, stage: int) -> None:
        key = f"zero_optimization.{name}"
        refused_when_set = {
            "zero_hpz_partition_size": (
                lambda v: v not in (None, 0, 1),
                "hierarchical partitioning (ZeRO++ hpZ)",
            ),
            "zero_quantized_weights": (bool, "quantized weight communication (ZeRO++ qwZ)"),
            "zero_quantized_nontrainable_weights": (bool, "quantized weights (ZeRO++)"),
            "zero_quantized_gradients": (bool, "quantized gradient communication (ZeRO++ qgZ)"),
            "mics_shard_size": (lambda v: v not in (None, -1, 0), "MiCS sharding"),
        }
        no_effect = {
            "contiguous_gradients": "Strato's buckets are contiguous",
            "reduce_scatter": "stages 1-3 reduce-scatter; stage 0 all-reduces",
            "allgather_partitions": "parameters are all-gathered per bucket after the update",
            "allgather_bucket_size": "updated parameters are all-gathered in the reduce buckets",
            "overlap_comm": "Strato always overlaps communication with compute",
            "load_from_fp32_weights": "checkpoints hold fp32 weights",
            "elastic_checkpoint": "checkpoints are loaded on the world size they were saved on",
            "sub_group_size": "the optimizer steps per parameter shard",
            "stage3_max_live_parameters": "each layer is released after its last use",
            "max_live_parameters": "each layer is released after its last use",
            "stage3_max_reuse_distance": "each layer is released after its last use",
            "max_reuse_distance": "each layer is released after its last use",
            "stage3_model_persistence_threshold": "see zero_small_param_threshold",
            "model_persistence_threshold": "see zero_small_param_threshold",
            "stage3_gather_16bit_weights_on_model_save": "Strato saves fp32 weights; no 16-bit copy is gathered at save",
            "gather_16bit_weights_on_model_save": "Strato saves fp32 weights; no 16-bit copy is gathered at save",
            "stage3_gather_fp16_weights_on_model_save": "Strato saves fp32 weights; no 16-bit copy is gathered at save",
            "ignore_unused_parameters": "unused parameters keep a None gradient, as in eager",
            "legacy_stage1": "one stage-1 implementation",
            "round_robin_gradients": "gradients are reduced in bucket order",
            "memory_efficient_linear": "linear layers are graph ops",
            "use_multi_rank_bucket_allreduce": "buckets are reduced in order on every rank",
            "mics_hierarchical_params_gather": "MiCS is not used",
            "cpu_offload_params": "see offload_param",
            "cpu_offload_use_pin_memory": "Strato's offload has no such tuning",
            "stage3_use_all_reduce_for_fetch_params": "parameters are all-gathered",
            "use_all_reduce_for_fetch_params": "parameters are all-gathered",
            "module_granularity_threshold": "layers are the gather units",
            "log_trace_cache_warnings": "no trace cache",
            "pipeline_loading_checkpoint": "no pipeline",
            "override_module_apply": "no module hooks",
            "zeropp_loco_param": "ZeRO++ is not used",
        }
        if name in refused_when_set:
            test, what = refused_when_set[name]
            if test(value):
                self.refuse(key, value, f"{what} is not supported")
            else:
                self.no_effect(key, value, f"{what} off")
        elif name in no_effect:
            self.no_effect(key, value, no_effect[name])
        else:
            self.refuse(key, value, "not a zero_optimization key Strato knows")
