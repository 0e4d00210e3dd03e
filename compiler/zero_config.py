"""ZeRO settings a Strategy holds: the stage, where optimizer state is offloaded, and the
knobs of the zero passes (prefetch depth, bucket size, small-parameter threshold)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from .errors import StrategyError


def _check_path(instance, attribute, value) -> None:
    if not str(value):
        raise StrategyError("NVMe.path: give the folder for the memory-mapped state files.")


@attrs.frozen
class NVMe:
    """Offload to memory-mapped files in a folder (an NVMe drive, ideally)."""

    path: str = attrs.field(converter=str, validator=_check_path)
    """Folder for the files; each rank writes its own subfolder, removed when it exits."""


def convert_offload(value: Any) -> Any:
    """None, 'cpu', NVMe(path), or their YAML forms ('nvme:/dir', {kind: NVMe, path: ...})."""
    if isinstance(value, dict):
        data = {k: v for k, v in value.items() if k != "kind"}
        if str(value.get("kind", "NVMe")).lower() != "nvme" or set(data) != {"path"}:
            raise StrategyError(
                f"Strategy.offload: expected {{kind: NVMe, path: <folder>}}, got {value!r}."
            )
        return NVMe(**data)
    if isinstance(value, Path):
        return NVMe(str(value))
    if isinstance(value, str) and value.lower().startswith("nvme:"):
        return NVMe(value.split(":", 1)[1])
    return value


def check_offload(instance, attribute, value) -> None:
    if value is not None and value != "cpu" and not isinstance(value, NVMe):
        raise StrategyError(
            f"Strategy.offload: expected None, 'cpu' or strato.NVMe('/folder'), got {value!r}."
        )
    if value is not None and getattr(instance, "zero", 0) == 0:
        raise StrategyError(
            "Strategy.offload: offloading needs ZeRO sharding; set Strategy.zero to 1, 2 or 3."
        )


def check_zero(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value not in (0, 1, 2, 3):
        raise StrategyError(f"Strategy.zero: expected a ZeRO stage 0, 1, 2 or 3, got {value!r}.")
    if value and getattr(instance, "optimizer", None) is None:
        raise StrategyError(
            f"Strategy.zero: stage {value} shards training state, so it needs an optimizer "
            "(Strategy(optimizer=strato.AdamW(...)))."
        )


def check_non_negative_int(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StrategyError(f"Strategy.{attribute.name}: must be an integer >= 0, got {value!r}.")


def check_positive_number(instance, attribute, value) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise StrategyError(f"Strategy.{attribute.name}: must be a number > 0, got {value!r}.")


def explain_zero(record: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """Per-rank bytes after sharding and bytes sent per collective per step (ring
    algorithms), from the zero pass's record; read by the cost model."""
    import torch

    n, stage = record["world_size"], record["stage"]
    params = record["params"]
    itemsize = 4  # fp32 master parameters and gradients
    gathered = {name for unit in record["units"] for name in unit["params"]}
    param_elems = sum(
        info["shard_numel"] if name in gathered else info["numel"] for name, info in params.items()
    )
    groups = record["units"] + (record["buckets"] if stage >= 2 else [])
    grad_elems = sum(g["shard_numel"] for g in groups)
    if stage == 1:
        grad_elems = sum(info["numel"] for info in params.values())
    opt_bytes = 0
    if optimizer is not None and hasattr(optimizer, "state_bytes"):
        opt_bytes = sum(
            optimizer.state_bytes(torch.empty(info["shard_numel"], device="meta"))
            for info in params.values()
        )
    unit_s = sum(u["shard_numel"] for u in record["units"])
    bucket_s = sum(b["shard_numel"] for b in record["buckets"])
    comm = {
        "all_gather": itemsize * (n - 1) * (bucket_s + 2 * unit_s),
        "reduce_scatter": itemsize * (n - 1) * (bucket_s + unit_s),
    }
    offload = record.get("offload")
    notes = [
        f"ZeRO stage {stage} over {n} ranks: {len(record['buckets'])} buckets, "
        f"{len(record['units'])} gathered units; comm/step counts ring bytes sent per rank"
    ]
    if offload:
        notes.append(f"optimizer state offloaded to {offload.get('path') or offload['kind']}")
    return {
        "parameter_bytes": itemsize * param_elems,
        "gradient_bytes": itemsize * grad_elems,
        "optimizer_state_bytes": opt_bytes,
        "comm_bytes_per_step": comm,
        "notes": notes,
    }
