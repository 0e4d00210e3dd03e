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
    algorithms), overall and per mesh dimension, from the zero pass's record; read by
    the cost model."""
    import torch

    n, replicas, stage = record["shard_size"], record["replicate_size"], record["stage"]
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
    by_dim = {
        record["shard_dim"]: {
            "all_gather": itemsize * (n - 1) * (bucket_s + 2 * unit_s),
            "reduce_scatter": itemsize * (n - 1) * (bucket_s + unit_s),
        }
    }
    if replicas > 1:  # every reduced shard is all-reduced across the replicas
        by_dim[record["replicate_dim"]] = {
            "all_reduce": round(itemsize * 2 * (replicas - 1) / replicas * (bucket_s + unit_s))
        }
    comm: dict[str, int] = {}
    for kinds in by_dim.values():
        for kind, nbytes in kinds.items():
            comm[kind] = comm.get(kind, 0) + nbytes
    offload = record.get("offload")
    notes = [
        f"ZeRO stage {stage} over {n} shards x {replicas} replicas: "
        f"{len(record['buckets'])} buckets, {len(record['units'])} gathered units; "
        "comm/step counts ring bytes sent per rank"
    ]
    if offload:
        notes.append(f"optimizer state offloaded to {offload.get('path') or offload['kind']}")
    return {
        "parameter_bytes": itemsize * param_elems,
        "gradient_bytes": itemsize * grad_elems,
        "optimizer_state_bytes": opt_bytes,
        "comm_bytes_per_step": comm,
        "comm_bytes_per_dim": by_dim,
        "notes": notes,
    }


def explain_data_parallel(record: dict[str, Any]) -> dict[str, Any]:
    """Ring bytes one rank sends per step for the data-parallel gradient all-reduces
    (each bucket's elements plus one flag per parameter, in the bucket's dtype)."""
    import torch

    world = record["size"]
    payload = sum(
        (b["numel"] + len(b["params"])) * getattr(torch, b["dtype"]).itemsize
        for b in record["buckets"]
    )
    sent = round(2 * (world - 1) / world * payload) if world > 1 else 0
    return {
        "comm_bytes_per_step": {"all_reduce": sent} if sent else {},
        "comm_bytes_per_dim": {",".join(record["mesh_dims"]): {"all_reduce": sent}} if sent else {},
        "notes": [
            f"data parallel over {world} ranks: {len(record['buckets'])} gradient buckets "
            "all-reduced during backward"
        ],
    }
