"""Layout maps: where each of the model's own tensors lives on this rank, after every pass
that moved it.

A pass that changes where a tensor lives (ZeRO flat shards today; pipeline cuts, tensor and
expert shards later) registers, per model state-dict name, one *step* from the tensor as the
previous passes left it to the part this rank owns:

    {"kind": "box",  "starts": [..], "stops": [..]}   a block of an N-d tensor (tensor/expert shards)
    {"kind": "flat", "lo": lo, "hi": hi}              elements [lo, hi) of it flattened (ZeRO)
    {"kind": "view", "shape": [..]}                    the same elements in another shape (a fused
                                                      qkv weight seen as [3, C, in] to cut each part)

Steps compose in registration order (ZeRO's flat shard of a tensor-parallel column block is
`[box, flat]`), and they are all the data: the forward map (model tensor -> this rank's
piece, `TensorLayout.to_local`), the reverse map (piece -> its place in the model tensor,
`TensorLayout.to_global_`) and the global flat intervals a piece covers (`intervals`,
what checkpoints store and resharding intersects) are computed from them. Checkpoints,
`engine.full_state_dict()`, `strato.consolidate` and resharding read these maps and
nothing else. Tied weights are one tensor under their first state-dict name.

The maps live in `ctx.records["layout"]["tensors"][name]`; tensors no pass registered
are whole on every rank (rank 0 writes them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import attrs
import torch

from .context import CompileContext


@attrs.frozen
class TensorLayout:
    """One model tensor under the current strategy, as seen from this rank."""

    shape: tuple[int, ...]
    """The tensor's global shape (as in the user's model)."""
    dtype: str
    """Its dtype name ('float32')."""
    steps: tuple[dict[str, Any], ...] = ()
    """From the global tensor to the piece this rank owns (see the module docstring);
    () means the whole tensor."""
    holds_full: bool = True
    """True when the model's own tensor on this rank holds the whole tensor (data parallel,
    ZeRO-1/2 parameters); False when it holds only the owned piece (ZeRO-3 shards)."""
    writes: bool = True
    """Whether this rank saves its piece (False on the other replicas of the same piece)."""
    by: tuple[str, ...] = ()
    """The passes that registered steps, in order."""
    held: int | None = None
    """How many of `steps` the model's own tensor has applied: 0 holds the whole tensor,
    len(steps) the owned piece, in between an intermediate piece (an expert-parallel box
    that ZeRO-1/2 then cuts flat); None: as `holds_full` says."""

    def held_steps(self) -> int:
        if self.held is not None:
            return self.held
        return 0 if self.holds_full else len(self.steps)

    def held_shape(self) -> tuple[int, ...]:
        """Shape of what the model's own tensor holds on this rank."""
        return TensorLayout(self.shape, self.dtype, self.steps[: self.held_steps()]).local_shape()

    def owned_from_held(self, held: torch.Tensor) -> torch.Tensor:
        """The owned piece, from the model's own tensor on this rank (`held_steps` applied;
        the owned piece itself may be padded: ZeRO-3 shards)."""
        k = self.held_steps()
        if k and k == len(self.steps):
            n = math.prod(self.local_shape())
            return held.reshape(-1)[:n].view(self.local_shape())
        return apply_steps(held, self.steps[k:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_shape(self) -> tuple[int, ...]:
        """Shape of the owned piece: the box for box steps, 1-D after a flat step."""
        shape = self.shape
        for step in self.steps:
            if step["kind"] == "box":
                shape = tuple(b - a for a, b in zip(step["starts"], step["stops"]))
            elif step["kind"] == "view":
                shape = tuple(step["shape"])
            else:
                shape = (step["hi"] - step["lo"],)
        return tuple(shape)

    def to_local(self, full: torch.Tensor) -> torch.Tensor:
        """Forward map: the owned piece of the global tensor `full` (a view where possible)."""
        return apply_steps(full, self.steps)

    def to_global_(self, full: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Reverse map: write the owned piece `local` into its place in `full`; returns full."""
        flat = full.view(-1)
        offset = 0
        source = local.reshape(-1)
        for lo, hi in self.intervals():
            flat[lo:hi].copy_(source[offset : offset + hi - lo])
            offset += hi - lo
        return full

    def intervals(self) -> list[tuple[int, int]]:
        """The owned piece as sorted, disjoint [lo, hi) ranges of the global tensor's flat
        (row-major) elements; the piece's flattened elements are these ranges in order."""
        return intervals(self.shape, self.steps)


def apply_steps(tensor: torch.Tensor, steps: tuple[dict[str, Any], ...]) -> torch.Tensor:
    for step in steps:
        if step["kind"] == "box":
            tensor = tensor[tuple(slice(a, b) for a, b in zip(step["starts"], step["stops"]))]
        elif step["kind"] == "flat":
            tensor = tensor.reshape(-1)[step["lo"] : step["hi"]]
        elif step["kind"] == "view":
            tensor = tensor.reshape(step["shape"])
        else:
            raise ValueError(
                f"unknown layout step kind {step['kind']!r} (expected box, flat or view)"
            )
    return tensor


def intervals(shape: tuple[int, ...], steps: tuple[dict[str, Any], ...]) -> list[tuple[int, int]]:
    """Global flat ranges of the piece `steps` cut from a tensor of `shape`."""
    numel = math.prod(shape)
    if not steps:
        return [(0, numel)] if numel else []
    if all(step["kind"] == "flat" for step in steps):  # ZeRO: nested ranges, no index math
        lo, hi = 0, numel
        for step in steps:
            lo, hi = lo + step["lo"], min(hi, lo + step["hi"])
        return [(lo, hi)] if hi > lo else []
    # Boxes: follow the global index of every owned element, then merge consecutive runs.
    index = apply_steps(torch.arange(numel, dtype=torch.int64).view(shape), steps).reshape(-1)
    if index.numel() == 0:
        return []
    breaks = torch.nonzero(index[1:] - index[:-1] != 1).flatten() + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), index.numel()]
    return [(int(index[a]), int(index[b - 1]) + 1) for a, b in zip(starts, ends)]


def flat_shard(numel: int, shard_rank: int, shard_count: int) -> tuple[int, int]:
    """[lo, hi) of a flattened tensor's `numel` elements that shard `shard_rank` of
    `shard_count` owns: padded to a multiple of the count, cut evenly (may be empty)."""
    size = -(-numel // shard_count)
    lo = min(numel, shard_rank * size)
    return lo, min(numel, lo + size)


# ---------------------------------------------------------------------- registration


def register_step(
    ctx: CompileContext,
    pass_name: str,
    name: str,
    tensor: torch.Tensor,
    step: dict[str, Any],
    holds_full: bool,
    writes: bool,
) -> None:
    """Record that `pass_name` moved model tensor `name` (its first state-dict name): this
    rank owns `step` of it from now on (after any earlier pass's steps)."""
    tensors = ctx.records.setdefault("layout", {}).setdefault("tensors", {})
    entry = tensors.setdefault(
        name,
        {
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "steps": [],
            "holds_full": True,
            "holds": 0,
            "writes": True,
            "by": [],
        },
    )
    entry["steps"].append(dict(step))
    entry["holds_full"] = entry["holds_full"] and holds_full
    if not holds_full:  # the model's tensor now holds the piece after this step
        entry["holds"] = len(entry["steps"])
    entry["writes"] = entry["writes"] and writes
    entry["by"].append(pass_name)


def register_flat_shards(
    ctx: CompileContext,
    pass_name: str,
    tensors: dict[str, tuple[torch.Tensor, bool]],
    shard_rank: int,
    shard_count: int,
    writes: bool = True,
) -> None:
    """ZeRO-style sharding: each tensor (name -> (tensor, model keeps it whole)) is flattened,
    padded to a multiple of `shard_count` and cut evenly; this rank owns shard `shard_rank`
    and writes it (the shards are disjoint) unless `writes` is False (a replica of the
    same shard under hybrid sharding: the first replica writes it)."""
    for name, (tensor, holds_full) in tensors.items():
        entry = ctx.records.get("layout", {}).get("tensors", {}).get(name)
        local = TensorLayout(
            tuple(tensor.shape), "", tuple(entry["steps"]) if entry else ()
        ).local_shape()
        lo, hi = flat_shard(math.prod(local), shard_rank, shard_count)
        register_step(
            ctx,
            pass_name,
            name,
            tensor,
            {"kind": "flat", "lo": lo, "hi": hi},
            holds_full,
            writes=writes,
        )


# ---------------------------------------------------------------------- reading


def state_names(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_parameter) for every entry of `model.state_dict()`, in its order,
    tied tensors under each of their names, without calling state_dict (its hooks)."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None:
                yield dot + name, p, True
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                yield dot + name, b, False


def model_layout(
    records: dict[str, Any], model: torch.nn.Module, rank: int
) -> tuple[dict[str, TensorLayout], dict[str, str]]:
    """(layouts by first name, alias -> first name) of every tensor in the model's state
    dict: registered steps where a pass moved the tensor, else whole (rank 0 writes)."""
    registered = records.get("layout", {}).get("tensors", {})
    layouts: dict[str, TensorLayout] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    seen_names: set[str] = set()
    for name, tensor, _ in state_names(model):
        if name in seen_names:  # the same module reached by two paths
            continue
        seen_names.add(name)
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
            continue
        first[id(tensor)] = name
        entry = registered.get(name)
        if entry is None:
            layouts[name] = TensorLayout(
                tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), writes=rank == 0
            )
        else:
            layouts[name] = TensorLayout(
                tuple(entry["shape"]),
                entry["dtype"],
                tuple(entry["steps"]),
                bool(entry["holds_full"]),
                bool(entry["writes"]),
                tuple(entry["by"]),
                entry.get("holds"),
            )
    return layouts, aliases


def describe(layout: TensorLayout) -> str:
    """A short human description: 'whole', 'flat [lo, hi) by zero3'..."""
    if not layout.steps:
        return "whole"
    parts = []
    for step, by in zip(layout.steps, layout.by):
        if step["kind"] == "flat":
            parts.append(f"flat [{step['lo']}, {step['hi']}) by {by}")
        elif step["kind"] == "view":
            continue  # a reshape: the box after it says what is owned
        else:
            box = ", ".join(f"{a}:{b}" for a, b in zip(step["starts"], step["stops"]))
            parts.append(f"box [{box}] by {by}")
    return " then ".join(parts)
