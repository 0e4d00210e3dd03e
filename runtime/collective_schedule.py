"""Collective-mismatch detection: ranks compare their compiled collective schedules before
the first step, so a rank that compiled another model or strategy fails with a readable
error on every rank instead of hanging in a collective that nobody else joins.

The schedule is the list of collectives one training step issues, in order, as
(op, shape, dtype, group). Every rank first all-gathers a fixed-size digest of its
schedule (the same collective whatever was compiled, so it cannot hang); only when the
digests differ (and then on every rank) do the ranks exchange full schedules to name the
first collective that differs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from . import collectives

Collective = tuple[str, tuple[int, ...], str, str]
"""(op, shape, dtype, group)."""


class CollectiveMismatchError(RuntimeError):
    """Ranks compiled different collective schedules; raised on every rank."""


def zero_schedule(record: dict[str, Any], group_name: str = "world") -> list[Collective]:
    """The collectives one step of a ZeRO-compiled graph issues, from the zero pass's record."""
    n, stage = record["world_size"], record["stage"]
    dtype_of = {name: info["dtype"] for name, info in record["params"].items()}
    schedule: list[Collective] = [("zero_stage", (stage,), "", group_name)]

    def group_dtype(names: list[str]) -> str:
        return dtype_of[names[0]] if names else ""

    for unit in record["units"]:  # forward gathers
        schedule.append(
            ("all_gather", (n, unit["shard_numel"]), group_dtype(unit["params"]), group_name)
        )
    for unit in reversed(record["units"]):  # backward: gather again, then reduce-scatter
        dtype = group_dtype(unit["params"])
        schedule.append(("all_gather", (n, unit["shard_numel"]), dtype, group_name))
        schedule.append(("reduce_scatter", (n, unit["shard_numel"]), dtype, group_name))
    for bucket in record["buckets"]:
        schedule.append(
            (
                "reduce_scatter",
                (n, bucket["shard_numel"]),
                group_dtype(bucket["params"]),
                group_name,
            )
        )
    for index in record.get("gather_order", range(len(record["buckets"]))):
        bucket = record["buckets"][index]  # after the update, in forward order
        schedule.append(
            ("all_gather", (n, bucket["shard_numel"]), group_dtype(bucket["params"]), group_name)
        )
    return schedule


def digest(schedule: list[Collective]) -> list[int]:
    """Four 62-bit words of the schedule's SHA-256, plus its length."""
    raw = hashlib.sha256(repr(schedule).encode()).digest()
    words = [int.from_bytes(raw[i : i + 8], "little") & (2**62 - 1) for i in range(0, 32, 8)]
    return [*words, len(schedule)]


def first_difference(mine: list[Collective], theirs: list[Collective]) -> str:
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            return f"collective #{i}: {_fmt(a)} here vs {_fmt(b)} there"
    if len(mine) != len(theirs):
        i = min(len(mine), len(theirs))
        extra = mine[i] if len(mine) > i else theirs[i]
        where = "here" if len(mine) > i else "there"
        return f"collective #{i}: only {where}: {_fmt(extra)} ({len(mine)} vs {len(theirs)} collectives)"
    return "schedules are equal"


def _fmt(c: Collective) -> str:
    op, shape, dtype, group = c
    return f"{op}(shape={list(shape)}, dtype={dtype or '-'}, group={group})"


def verify_collective_schedule(schedule: list[Collective], group: Any | None = None) -> None:
    """Raise CollectiveMismatchError on every rank unless all ranks have this schedule."""
    n = collectives.world_size(group)
    if n == 1:
        return
    mine = torch.tensor(digest(schedule), dtype=torch.int64)
    everyone = torch.zeros(n * mine.numel(), dtype=torch.int64)
    collectives.all_gather_into_tensor(everyone, mine, group=group)
    rows = everyone.view(n, -1).tolist()
    if all(row == rows[0] for row in rows):
        return
    # Every rank saw the same digests, so every rank takes this branch together.
    schedules: list[Any] = [None] * n
    dist.all_gather_object(schedules, schedule, group=group)
    me = collectives.rank(group)
    lines = []
    for r, other in enumerate(schedules):
        if r != me and rows[r] != rows[me]:
            lines.append(f"  rank {r}: {first_difference(schedule, [tuple(c) for c in other])}")
    raise CollectiveMismatchError(
        f"rank {me}: the ranks compiled different collective schedules, so the first step "
        "would hang. Compared with this rank:\n"
        + "\n".join(lines)
        + "\nEvery rank must compile the same model with the same strategy (and world size)."
    )
