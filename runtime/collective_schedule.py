"""Collective-mismatch detection: ranks compare their compiled collective schedules before
the first step, so a rank that compiled another model or strategy fails with a readable
error on every rank instead of hanging in a collective that nobody else joins.

The schedule is the list of collectives one training step issues, in order, as
(op, shape, dtype, group). Every rank first all-gathers a fixed-size digest of its
schedule (the same collective whatever was compiled, so it cannot hang); only when the
digests differ (and then on every rank) do the ranks exchange full schedules to name the
first collective that differs.

The engine verifies once, before any other collective: `step_schedule` (what the compile
records say one step issues) followed by `launch_entries` (each Strategy field and each
parameter's shape and dtype), so one digest covers both and a rank that compiled another
model is told the first collective that differs, or else the field or parameter.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist

from ..compiler.errors import StratoError
from . import collectives

Collective = tuple[str, tuple[int, ...], str, str]
"""(op, shape, dtype, group); launch entries have group '' (see `launch_entries`)."""


class CollectiveMismatchError(StratoError, RuntimeError):
    """Ranks compiled different collective schedules; raised on every rank."""


def zero_schedule(record: dict[str, Any]) -> list[Collective]:
    """The collectives one step of a ZeRO-compiled graph issues, from the zero pass's
    record, each with the mesh dimension it runs over."""
    n, stage = record["shard_size"], record["stage"]
    shard, replicate = record["shard_dim"], record["replicate_dim"]
    across = record["replicate_size"] > 1  # reduced shards are all-reduced across replicas
    dtype_of = {name: info["dtype"] for name, info in record["params"].items()}
    schedule: list[Collective] = [("zero_stage", (stage,), "", shard)]

    def group_dtype(names: list[str]) -> str:
        return dtype_of[names[0]] if names else ""

    def reduce(group: dict) -> None:
        dtype = group_dtype(group["params"])
        along = group.get("group", shard)  # expert weights: over `expert_replicate`
        shape = (group.get("shards", n), group["shard_numel"])
        schedule.append(("reduce_scatter", shape, dtype, along))
        if across and along == shard:
            schedule.append(("all_reduce", (group["shard_numel"],), dtype, replicate))

    def gather(group: dict) -> None:
        shape = (group.get("shards", n), group["shard_numel"])
        along = group.get("group", shard)
        schedule.append(("all_gather", shape, group_dtype(group["params"]), along))

    for unit in record["units"]:  # forward gathers
        gather(unit)
    for unit in reversed(record["units"]):  # backward: gather again, then reduce
        gather(unit)
        reduce(unit)
    for bucket in record["buckets"]:
        reduce(bucket)
    for index in record["gather_order"]:
        gather(record["buckets"][index])  # after the update, in forward order
    return schedule


def data_parallel_schedule(record: dict[str, Any]) -> list[Collective]:
    """The all-reduce per gradient bucket (its elements plus one flag per parameter)."""
    group = ",".join(record["mesh_dims"])
    return [
        ("all_reduce", (b["numel"] + len(b["params"]),), b["dtype"], b.get("group", group))
        for b in record["buckets"]
    ]


def moe_schedule(record: dict[str, Any]) -> list[Collective]:
    """The all-to-alls of every expert-parallel MoE layer (moe_dispatch's record), each
    layer's preceded by its routing settings: token counts follow from them, so ranks that
    built a layer differently would exchange mismatched sizes."""
    if not record.get("rewritten"):
        return []
    schedule: list[Collective] = [("expert_size", (record["expert_size"],), "", "expert")]
    layers = record["layers"]
    dtype = record.get("compute_dtype", "")
    tokens = [("all_to_all", (-1, layer["d_model"]), dtype, "expert") for layer in layers.values()]
    for (path, layer), moved in zip(layers.items(), tokens):  # forward: counts, out, back
        settings = {k: v for k, v in layer.items() if k not in ("module", "replaced_nodes")}
        shape = (layer["num_experts"], layer["experts_per_rank"])
        schedule.append(
            (f"moe_layer {path}", shape, json.dumps(settings, sort_keys=True), "expert")
        )
        schedule += [("all_to_all", (layer["num_experts"],), "int64", "expert"), moved, moved]
    for moved in reversed(tokens):  # backward: the gradients' two trips
        schedule += [moved, moved]
    return schedule


def pipeline_schedule(record: dict[str, Any]) -> list[Collective]:
    """The pipeline's collectives, from the cut's record (the same on every rank): the
    schedule's shape, each boundary tensor sent forward (its gradient back) per
    micro-batch, each tied weight's gradient all-reduce, the loss broadcast."""
    schedule: list[Collective] = [
        (
            "pipeline",
            (record["ranks"], record["stage_count"], record["microbatches"]),
            record["schedule"],
            "pipeline",
        )
    ]
    for info in record["stages"]:
        for received in info["receives"]:
            route = (received["from"], info["stage"], *(received["shape"] or ()))
            schedule.append(("send/recv", route, received["dtype"], "pipeline"))
    for name in sorted(record["tied"]):
        schedule.append(("all_reduce", tuple(record["tied"][name]), name, "pipeline"))
    schedule.append(("broadcast", (record["microbatches"],), "float64", "pipeline"))
    return schedule


def tensor_parallel_schedule(record: dict[str, Any]) -> list[Collective]:
    """The tensor-parallel collectives, per split module (the tensor_parallel pass's
    record; listed module by module, not in time order): ranks whose plans split other
    modules, or the same ones along other dims, get a mismatch naming the first module."""
    dim, dtype = record["mesh_dim"], f"{record['activation_bytes']}-byte activations"
    forward = "reduce_scatter" if record["sequence_parallel"] else "all_reduce"
    schedule: list[Collective] = [
        ("tensor_parallel", (record["size"], int(record["sequence_parallel"])), "", dim)
    ]
    if record.get("check_inputs"):  # every call: the same inputs on every tensor rank
        schedule.append(("all_gather (input fingerprints)", (2,), "int64", dim))
    for name, info in sorted(record["parameters"].items()):
        # The block's extent, not its offsets (those differ by rank).
        cuts = [
            [b - a for a, b in zip(step["starts"], step["stops"])]
            if step["kind"] == "box"
            else step["shape"]
            for step in info["steps"]
        ]
        schedule.append((f"split {name}", tuple(info["shape"]), json.dumps(cuts), dim))
    for module in record["vocab"]:
        schedule.append((f"all_reduce (vocab-parallel embedding {module})", (), dtype, dim))
    for module in record["column"]:  # backward: the gradient of the column inputs
        schedule.append((f"all_reduce (input gradient of {module})", (), dtype, dim))
    for module in record["row"]:
        schedule.append((f"{forward} (output of {module})", (), dtype, dim))
    for _ in range(record["vocab_cross_entropy"]):
        schedule.append(("all_reduce (vocab-parallel cross-entropy)", (3,), "float32", dim))
    for _ in range(record["gathered_outputs"]):
        schedule.append(("all_gather (split graph output)", (), dtype, dim))
    for whole in record["gradients_summed"]:
        schedule.append((f"all_reduce (gradient of {whole['value']})", (), dtype, dim))
    return schedule


def _stage_local(record: dict[str, Any]) -> bool:
    return bool(record.get("stage_local"))


def stage_schedule(records: dict[str, Any]) -> list[Collective]:
    """A pipeline rank's ZeRO / data-parallel collectives, planned over its stages'
    parameters only: the same on the ranks of one stage, not across stages, so the engine
    verifies them over the stage's ranks (the rest of the step goes in `step_schedule`)."""
    schedule: list[Collective] = []
    if "zero" in records and _stage_local(records["zero"]):
        schedule += zero_schedule(records["zero"])
    if "data_parallel" in records and _stage_local(records["data_parallel"]):
        schedule += data_parallel_schedule(records["data_parallel"])
    return schedule


def step_schedule(records: dict[str, Any], mesh: Any | None = None) -> list[Collective]:
    """The collectives one training step issues, as the compile records describe them,
    then the mesh's dimension sizes (so the digest covers every group). A pipeline rank's
    stage-local ZeRO / data-parallel part is in `stage_schedule` instead. Tensor-parallel
    collectives come first (the forward's), so a rank with another plan is told which split
    differs rather than which gradient bucket."""
    schedule: list[Collective] = []
    if "tensor_parallel" in records:
        schedule += tensor_parallel_schedule(records["tensor_parallel"])
    if "zero" in records and not _stage_local(records["zero"]):
        schedule += zero_schedule(records["zero"])
    if "data_parallel" in records and not _stage_local(records["data_parallel"]):
        schedule += data_parallel_schedule(records["data_parallel"])
    if "pipeline_cut" in records:
        schedule += pipeline_schedule(records["pipeline_cut"])
    if "moe_dispatch" in records:
        schedule += moe_schedule(records["moe_dispatch"])
    if mesh is not None:
        schedule.append(("mesh", tuple(mesh.sizes.values()), "", ",".join(mesh.dims)))
    return schedule


def launch_entries(model: Any, strategy: Any) -> list[Collective]:
    """What ranks must agree on beyond collectives, as schedule entries: every Strategy
    field, nested config fields one by one (the value in the dtype slot), and every
    parameter's name, shape and dtype."""
    fields: list[Collective] = []

    def add(path: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                add(f"{path}.{key}", value[key])
        else:
            fields.append((path, (), json.dumps(value, sort_keys=True, default=str), ""))

    add("Strategy", strategy.to_dict())
    params = [
        (f"parameter {name}", tuple(p.shape), str(p.dtype).removeprefix("torch."), "")
        for name, p in model.named_parameters()
    ]
    return fields + params


def digest(schedule: list[Collective]) -> list[int]:
    """Four 62-bit words of the schedule's SHA-256, plus its length."""
    raw = hashlib.sha256(repr(schedule).encode()).digest()
    words = [int.from_bytes(raw[i : i + 8], "little") & (2**62 - 1) for i in range(0, 32, 8)]
    return [*words, len(schedule)]


def first_difference(mine: list[Collective], theirs: list[Collective]) -> str:
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            what = "collective" if a[3] or b[3] else "entry"
            return f"{what} #{i}: {_fmt(a)} here vs {_fmt(b)} there"
    if len(mine) != len(theirs):
        i = min(len(mine), len(theirs))
        extra = mine[i] if len(mine) > i else theirs[i]
        where = "here" if len(mine) > i else "there"
        return f"collective #{i}: only {where}: {_fmt(extra)} ({len(mine)} vs {len(theirs)} collectives)"
    return "schedules are equal"


def _fmt(c: Collective) -> str:
    op, shape, dtype, group = c
    if not group:  # a launch entry
        return f"{op} = {dtype}" if not shape else f"{op} {list(shape)} {dtype}"
    return f"{op}(shape={list(shape)}, dtype={dtype or '-'}, group={group})"


def verify_collective_schedule(schedule: list[Collective], group: Any | None = None) -> None:
    """Raise CollectiveMismatchError on every rank unless all ranks have this schedule."""
    n = collectives.world_size(group)
    if n == 1:
        return
    device = collectives.device_of(group)
    mine = torch.tensor(digest(schedule), dtype=torch.int64, device=device)
    everyone = torch.zeros(n * mine.numel(), dtype=torch.int64, device=device)
    collectives.all_gather_into_tensor(everyone, mine, group=group)
    rows = everyone.view(n, -1).tolist()
    if all(row == rows[0] for row in rows):
        return
    # Every rank saw the same digests, so every rank takes this branch together.
    schedules: list[Any] = [None] * n
    dist.all_gather_object(schedules, schedule, group=collectives._pg(group))
    me = collectives.rank(group)
    lines = []
    for r, other in enumerate(schedules):
        if r != me and rows[r] != rows[me]:
            lines.append(f"  rank {r}: {first_difference(schedule, [tuple(c) for c in other])}")
    differing = [r for r in range(n) if rows[r] != rows[0]]
    raise CollectiveMismatchError(
        f"rank {me}: ranks {differing} were started with a different model or strategy than "
        "rank 0: the ranks compiled different collective schedules, so the first step would "
        "hang. Compared with this rank:\n"
        + "\n".join(lines)
        + "\nEvery rank must compile the same model with the same strategy (and world size)."
    )
