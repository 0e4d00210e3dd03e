"""convert_deepspeed: the config walk, batch sizes, clipping and top-level keys; the
sections live in training.py (precision, optimizer, scheduler) and zero.py."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import StrategyError
from .recompute import convert_activation_checkpointing
from .report import HONOURED, NO_EFFECT, NOT_MAPPED, UNRESOLVED, DeepSpeedReport, ReportEntry, short
from .training import convert_optimizer, convert_precision, convert_scheduler
from .zero import convert_zero

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
        "activation_checkpointing",
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
    converter = Converter(config, name, model, world_size, dict(auto or {}))
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


class Converter:
    """One conversion: the config, what it resolved, and the report entries so far."""

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
        self.refused.append(f"{key} = {short(value)}: {why}")

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
        return UNRESOLVED

    def run(self):
        from ..strategy import Strategy

        handlers = {
            "optimizer": convert_optimizer,
            "scheduler": convert_scheduler,
            "zero_optimization": convert_zero,
            "activation_checkpointing": convert_activation_checkpointing,
        }
        self._batch_sizes()
        self._clipping()
        convert_precision(self)
        for key in handlers:
            value = self.config.get(key)
            if key == "zero_optimization" and isinstance(value, bool):
                value = {"stage": int(value)}  # DeepSpeed's legacy spelling: true is stage 1
            if value is not None:
                if not isinstance(value, Mapping):
                    self.refuse(key, value, "expected a JSON object")
                else:
                    handlers[key](self, value)
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
        if UNRESOLVED in (micro, accumulation):
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
        derived = " (not in the config: filled in as DeepSpeed does)"
        for key, note in (
            (
                "train_batch_size",
                f"train_batch_size={total}"
                if total_given
                else f"train_batch_size=None: {total} at {world_note}; checked at compile",
            ),
            ("train_micro_batch_size_per_gpu", f"micro_batch_size={micro}"),
            ("gradient_accumulation_steps", f"grad_accumulation={accumulation}"),
        ):
            self.honour(key, cfg.get(key), note + ("" if key in cfg else derived))

    def _clipping(self) -> None:
        if "gradient_clipping" not in self.config:
            return
        value = self.get(self.config, "gradient_clipping", "gradient_clipping", 0.0)
        if value is UNRESOLVED:
            return
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            self.refuse("gradient_clipping", value, "must be a number >= 0")
            return
        self.fields["grad_clip"] = float(value) if value > 0 else None
        note = f"grad_clip={self.fields['grad_clip']}" + ("" if value > 0 else " (0: no clipping)")
        self.honour("gradient_clipping", self.config["gradient_clipping"], note)
