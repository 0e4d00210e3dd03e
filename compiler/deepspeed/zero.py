"""The zero_optimization section: stage, offload, bucket sizes (DeepSpeed counts elements;
Strato MiB and layers), and the knobs that have no effect here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..zero_config import NVMe
from .report import UNRESOLVED

if TYPE_CHECKING:
    from .convert import Converter


def hidden_size(model: Any) -> int | None:
    """The model's hidden size, as the HF Trainer reads it (config.hidden_size or max of
    config.hidden_sizes), also from d_model / n_embd and from our GPT's `cfg`."""
    config = getattr(model, "config", None) or getattr(model, "cfg", None)
    for name in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    sizes = getattr(config, "hidden_sizes", None)
    return max(sizes) if sizes else None


def convert_zero(c: Converter, section: Mapping) -> None:
    stage = section.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        c.refuse("zero_optimization.stage", stage, "expected 0, 1, 2 or 3")
        return
    c.fields["zero"] = stage
    c.honour("zero_optimization.stage", stage, f"zero={stage}")
    hidden = hidden_size(c.model)
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
    _offload(c, section, stage)
    # Sizes in elements (DeepSpeed) -> Strato's units.
    if "reduce_bucket_size" in section:
        handled.add("reduce_bucket_size")
        size = c.get(
            section,
            "reduce_bucket_size",
            "zero_optimization.reduce_bucket_size",
            None,
            by_hidden(1, 2),
        )
        if size is UNRESOLVED and hidden is None:
            c.unresolved[-1] += f" ({need})"
        elif size is not UNRESOLVED and stage:
            mb = int(size) * 4 / 2**20
            c.fields["zero_bucket_mb"] = mb
            c.honour(
                "zero_optimization.reduce_bucket_size",
                section["reduce_bucket_size"],
                f"zero_bucket_mb={mb:g} ({int(size):,} fp32 elements)",
            )
        elif size is not UNRESOLVED:
            c.no_effect(
                "zero_optimization.reduce_bucket_size",
                size,
                "stage 0 all-reduces ~25 MiB buckets",
            )
    for ds_name in ("stage3_prefetch_bucket_size", "prefetch_bucket_size"):
        if ds_name in section:
            handled.add(ds_name)
            size = c.get(section, ds_name, f"zero_optimization.{ds_name}", None, by_hidden(0.9, 2))
            if size is UNRESOLVED and hidden is None:
                c.unresolved[-1] += f" ({need})"
            elif size is not UNRESOLVED:
                _prefetch(c, f"zero_optimization.{ds_name}", section[ds_name], int(size), stage)
    for ds_name in ("stage3_param_persistence_threshold", "param_persistence_threshold"):
        if ds_name in section:
            handled.add(ds_name)
            size = c.get(section, ds_name, f"zero_optimization.{ds_name}", None, by_hidden(10, 1))
            if size is UNRESOLVED and hidden is None:
                c.unresolved[-1] += f" ({need})"
            elif size is not UNRESOLVED and stage == 3:
                c.fields["zero_small_param_threshold"] = int(size)
                c.honour(
                    f"zero_optimization.{ds_name}",
                    section[ds_name],
                    f"zero_small_param_threshold={int(size)}",
                )
            elif size is not UNRESOLVED:
                c.no_effect(f"zero_optimization.{ds_name}", size, "stage 3 only")
    for name, value in section.items():
        if name in handled:
            continue
        _zero_knob(c, name, value, stage)


def _prefetch(c: Converter, key: str, given: Any, elements: int, stage: int) -> None:
    """DeepSpeed prefetches `elements` parameters ahead; Strato gathers whole layers
    (zero_prefetch of them): as many layers as fit, at least one when elements > 0."""
    if stage != 3:
        c.no_effect(key, given, "stage 3 only")
        return
    if elements <= 0:
        c.fields["zero_prefetch"] = 0
        c.honour(key, given, "zero_prefetch=0 (gather only when needed)")
        return
    if c.model is None:
        c.honour(key, given, "zero_prefetch=1 kept: pass model= to convert elements into layers")
        return
    from ...passes.zero import unit_name

    sizes: dict[str, int] = {}
    for name, param in c.model.named_parameters():
        if param.requires_grad:
            unit = unit_name(name)
            sizes[unit] = sizes.get(unit, 0) + param.numel()
    numbered = [n for u, n in sizes.items() if any(c.isdigit() for c in u)] or list(sizes.values())
    layer = max(numbered) if numbered else 1
    layers = max(1, elements // layer)
    c.fields["zero_prefetch"] = layers
    c.honour(key, given, f"zero_prefetch={layers} (layers of up to {layer:,} parameters)")


def _offload(c: Converter, section: Mapping, stage: int) -> None:
    """offload_optimizer / offload_param {device: none|cpu|nvme, nvme_path} -> offload.
    Strato offloads the optimizer state (and at stage 3 the parameter shards with it)."""
    targets = {}
    for name in ("offload_optimizer", "offload_param"):
        sub = section.get(name)
        if sub is None:
            continue
        if not isinstance(sub, Mapping):
            c.refuse(f"zero_optimization.{name}", sub, 'expected {"device": "cpu"|"nvme"|"none"}')
            continue
        device = str(sub.get("device", "none")).lower()
        for knob, value in sub.items():
            key = f"zero_optimization.{name}.{knob}"
            if knob in ("device", "nvme_path"):
                continue
            if knob == "ratio" and value != 1:
                c.refuse(key, value, "partial offload is not supported")
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
                c.no_effect(key, value, "Strato's offload has no such tuning")
            else:
                c.refuse(key, value, f"not an {name} key Strato knows")
        if device == "none":
            c.no_effect(f"zero_optimization.{name}.device", "none", "no offload")
            continue
        if device == "cpu":
            targets[name] = "cpu"
        elif device == "nvme":
            path = sub.get("nvme_path")
            if not path:
                c.refuse(
                    f"zero_optimization.{name}.nvme_path", path, "nvme offload needs nvme_path"
                )
                continue
            targets[name] = NVMe(str(path))
        else:
            c.refuse(f"zero_optimization.{name}.device", device, "expected none, cpu or nvme")
    if section.get("cpu_offload"):  # DeepSpeed's deprecated spelling of offload_optimizer cpu
        targets.setdefault("offload_optimizer", "cpu")
        c.honour("zero_optimization.cpu_offload", True, "as offload_optimizer device cpu")
    elif "cpu_offload" in section:
        c.no_effect("zero_optimization.cpu_offload", False, "no offload")
    if not targets:
        return
    optimizer, param = targets.get("offload_optimizer"), targets.get("offload_param")
    if stage == 0:
        c.refuse(
            "zero_optimization.offload_optimizer",
            str(optimizer or param),
            "offloading needs ZeRO stage 1, 2 or 3",
        )
        return
    if param is not None and optimizer is None:
        c.refuse(
            "zero_optimization.offload_param",
            str(param),
            "Strato offloads parameter shards only with the optimizer state: add "
            "offload_optimizer with the same device",
        )
        return
    if param is not None and param != optimizer:
        c.refuse(
            "zero_optimization.offload_param",
            str(param),
            f"Strato offloads both to one place; offload_optimizer says {optimizer}",
        )
        return
    c.fields["offload"] = optimizer
    where = optimizer if optimizer == "cpu" else f"NVMe({optimizer.path!r})"
    if "offload_optimizer" in section:
        shards = " (at stage 3 the parameter shards go there too)" if stage == 3 else ""
        c.honour(
            "zero_optimization.offload_optimizer",
            dict(section["offload_optimizer"]),
            f"offload={where!s}{shards}",
        )
    if param is not None:
        if stage == 3:
            c.honour(
                "zero_optimization.offload_param",
                dict(section["offload_param"]),
                f"offload={where!s}",
            )
        else:
            c.no_effect(
                "zero_optimization.offload_param",
                dict(section["offload_param"]),
                "parameters are only offloaded at stage 3 (as in DeepSpeed)",
            )


def _zero_knob(c: Converter, name: str, value: Any, stage: int) -> None:
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
            c.refuse(key, value, f"{what} is not supported")
        else:
            c.no_effect(key, value, f"{what} off")
    elif name in no_effect:
        c.no_effect(key, value, no_effect[name])
    else:
        c.refuse(key, value, "not a zero_optimization key Strato knows")
