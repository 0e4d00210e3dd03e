"""The ZeRO custom ops the zero pass puts in the graph: `strato::zero_gather` and
`strato::zero_release` (stage 3), and `strato::zero_await_bucket` (every stage).

`zero_gather(shards, unit, shapes)` turns the local shards of one unit's parameters into
the full parameters (an all-gather). Its backward hands the full gradients back to the
unit, which reduce-scatters them straight into the shards' gradients (asynchronously,
so communication overlaps the rest of backward). `zero_release(shards, unit)` marks the
end of the unit's use in forward, so its full parameters can be freed.
`zero_forward_begin` / `zero_forward_end` bracket the forward: in between, autograd saves a
gathered parameter as a handle and backward gathers it again. Which unit a shard
belongs to is attached to the shard Parameter by the runtime (runtime/zero.py); the ops
themselves hold no state. Fake impls let the compiler propagate shapes without a runtime.

`zero_await_bucket(params, bucket)` stands before the first forward use of a bucket's
parameters: the all-gather that brings them up to date after an update is left in flight
when the step returns, and lands here, so it overlaps the forward up to this point.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.fx
from torch import Tensor

UNIT_ATTR = "_strato_zero_unit"
"""Name of the attribute that binds a shard Parameter to its runtime unit."""
BUCKET_ATTR = "_strato_zero_buckets"
"""Name of the attribute that binds a bucketed Parameter to the runtime's buckets."""


class GatherUnit(Protocol):
    """What the runtime provides for one stage-3 unit (see runtime/zero.py)."""

    def gather_for_forward(self, shards: list[Tensor]) -> list[Tensor]: ...

    def begin_forward(self) -> None: ...

    def end_forward(self) -> None: ...

    def release_after_forward(self) -> None: ...

    def reduce_gradients(self, grads: list[Tensor | None]) -> None: ...


def encode_shapes(shapes: list[torch.Size | tuple[int, ...]]) -> list[int]:
    """Shapes as one int list: [ndim, *dims] per parameter (a schema-friendly form)."""
    out: list[int] = []
    for shape in shapes:
        out += [len(shape), *shape]
    return out


def decode_shapes(encoded: list[int]) -> list[tuple[int, ...]]:
    shapes, i = [], 0
    while i < len(encoded):
        ndim = encoded[i]
        shapes.append(tuple(encoded[i + 1 : i + 1 + ndim]))
        i += 1 + ndim
    return shapes


def unit_of(shards: list[Tensor], required: bool = True) -> GatherUnit | None:
    for shard in shards:
        unit = getattr(shard, UNIT_ATTR, None)
        if unit is not None:
            return unit
    if not required:  # shape propagation with fake tensors: no runtime involved
        return None
    raise RuntimeError(
        "strato::zero_gather ran on tensors that no ZeRO runtime owns. A stage-3 graph "
        "must run through the engine that sharded its parameters (strato.compile with "
        "Strategy(zero=3) and an optimizer), not on its own."
    )


@torch.library.custom_op("strato::zero_gather", mutates_args=())
def zero_gather(shards: list[Tensor], unit: int, shapes: list[int]) -> list[Tensor]:
    """All-gather the full parameters of stage-3 unit `unit` from this rank's shards."""
    return list(unit_of(shards).gather_for_forward(shards))


@zero_gather.register_fake
def _zero_gather_fake(shards: list[Tensor], unit: int, shapes: list[int]) -> list[Tensor]:
    return [shards[0].new_empty(shape) for shape in decode_shapes(shapes)]


def _gather_setup_context(ctx, inputs, output) -> None:
    shards, _, _ = inputs
    ctx.unit = unit_of(shards, required=False)
    ctx.num_shards = len(shards)


def _gather_backward(ctx, grads):
    # The unit reduce-scatters into the shards' .grad itself (asynchronously), so autograd
    # gets no gradient to accumulate here.
    if ctx.unit is None:
        raise RuntimeError("strato::zero_gather: backward without a ZeRO runtime unit.")
    ctx.unit.reduce_gradients(list(grads))
    return [None] * ctx.num_shards, None, None


zero_gather.register_autograd(_gather_backward, setup_context=_gather_setup_context)


@torch.library.custom_op("strato::zero_release", mutates_args=())
def zero_release(shards: list[Tensor], unit: int) -> None:
    """Forward is done with unit `unit`: its full parameters may be freed."""
    unit_of(shards).release_after_forward()


@zero_release.register_fake
def _zero_release_fake(shards: list[Tensor], unit: int) -> None:
    return None


@torch.library.custom_op("strato::zero_forward_begin", mutates_args=())
def zero_forward_begin(shards: list[Tensor]) -> None:
    """Start of a stage-3 forward: from here on autograd saves a gathered parameter as a
    handle, and backward gathers it again, instead of keeping the full tensor alive."""
    unit_of(shards).begin_forward()


@zero_forward_begin.register_fake
def _zero_forward_begin_fake(shards: list[Tensor]) -> None:
    return None


@torch.library.custom_op("strato::zero_forward_end", mutates_args=())
def zero_forward_end(shards: list[Tensor]) -> None:
    """End of a stage-3 forward: stop turning saved parameters into handles."""
    unit_of(shards).end_forward()


@zero_forward_end.register_fake
def _zero_forward_end_fake(shards: list[Tensor]) -> None:
    return None


@torch.library.custom_op("strato::zero_await_bucket", mutates_args=())
def zero_await_bucket(params: list[Tensor], bucket: int) -> None:
    """Land bucket `bucket`'s parameter all-gather, if one is in flight, before its first use.
    Without a runtime (shape propagation, a graph run on its own) nothing is in flight."""
    buckets = getattr(params[0], BUCKET_ATTR, None) if params else None
    if buckets is not None:
        buckets.await_bucket(bucket)


@zero_await_bucket.register_fake
def _zero_await_bucket_fake(params: list[Tensor], bucket: int) -> None:
    return None


# Dead-code elimination must keep these even though nothing uses their results.
for _op in ("zero_release", "zero_forward_begin", "zero_forward_end", "zero_await_bucket"):
    torch.fx.node.has_side_effect(getattr(torch.ops.strato, _op).default)
