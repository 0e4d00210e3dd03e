"""The gradient reducer shared by data parallelism and ZeRO, and the shard arithmetic.

Every rank must issue the same collectives in the same order, whatever order autograd
finishes gradients in: a bucket is released only once it and every bucket before it are
complete. `GradientReducer` launches each released bucket's collective (an all-reduce
for data parallelism, a reduce-scatter for ZeRO) from a post-accumulate-grad hook while
backward continues, on the accumulation boundary only, and hands the launched
collectives back at the end of backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from . import collectives


def shard_numel(numel: int, shards: int) -> int:
    """Elements of one shard of a flat tensor of `numel` elements cut into `shards` equal
    parts (the last ones zero-padded)."""
    return -(-numel // shards)


def owned_range(numel: int, shards: int, index: int) -> tuple[int, int]:
    """[lo, hi) of the flat elements shard `index` holds (empty past the end)."""
    s = shard_numel(numel, shards)
    lo = min(numel, index * s)
    return lo, min(numel, lo + s)


class BucketReadiness:
    """Which parameters of each bucket have their gradient this backward."""

    def __init__(self, buckets: Sequence[Sequence[torch.Tensor]]) -> None:
        self.sizes = [len(bucket) for bucket in buckets]
        self.bucket_of = {id(p): i for i, bucket in enumerate(buckets) for p in bucket}
        self.reset()

    def reset(self) -> None:
        """Start a new backward: nothing ready, nothing released."""
        self.ready: list[set[int]] = [set() for _ in self.sizes]
        self.next_bucket = 0

    def mark_ready(self, param: torch.Tensor) -> list[int]:
        """Record `param`'s gradient; return the buckets that can now be released, in order."""
        self.ready[self.bucket_of[id(param)]].add(id(param))
        released = []
        while (
            self.next_bucket < len(self.sizes)
            and len(self.ready[self.next_bucket]) == self.sizes[self.next_bucket]
        ):
            released.append(self.next_bucket)
            self.next_bucket += 1
        return released

    def release_rest(self) -> list[int]:
        """The buckets not yet released (some gradient never arrived), in order."""
        rest = list(range(self.next_bucket, len(self.sizes)))
        self.next_bucket = len(self.sizes)
        return rest


class GradientReducer:
    """Launches `launch(index)` for each bucket as soon as backward has completed it and
    every bucket before it, on boundary micro-steps only; `finish` launches the buckets
    no hook completed and returns everything launched, in bucket order."""

    def __init__(
        self, buckets: Sequence[Sequence[torch.Tensor]], launch: Callable[[int], Any]
    ) -> None:
        self.readiness = BucketReadiness(buckets)
        self.launch = launch
        self.reduce_now = False
        self.in_flight: list[Any] = []
        attach_grad_ready_hooks((p for bucket in buckets for p in bucket), self._on_grad_ready)

    def prepare_micro_step(self, is_boundary: bool) -> None:
        """Before a backward: reduce during it only on the boundary micro-step."""
        self.reduce_now = is_boundary
        self.readiness.reset()
        self.in_flight = []

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        if not self.reduce_now:
            return
        for index in self.readiness.mark_ready(param):
            self.in_flight.append(self.launch(index))

    def finish(self) -> list[Any]:
        """After the boundary backward: launch the rest, return every launched collective."""
        for index in self.readiness.release_rest():
            self.in_flight.append(self.launch(index))
        launched, self.in_flight = self.in_flight, []
        self.reduce_now = False
        return launched


def broadcast_model(
    model: torch.nn.Module, group: Any | None = None, skip: frozenset[str] = frozenset()
) -> None:
    """Start every rank of `group` from the parameters and buffers of its first rank, as
    DDP does; parameters named in `skip` (expert shards, which differ along the group) are
    left as they are."""
    src = collectives.global_rank(group, 0) if group is not None else 0
    params = [p for name, p in model.named_parameters() if name not in skip]
    with torch.no_grad():
        for tensor in [*params, *model.buffers()]:
            collectives.broadcast(tensor.data, src=src, group=group)


# The hook each parameter carries for the engine built last on it: compiling the same
# model again (a notebook re-run, a second strategy) replaces it instead of adding a
# second one, which would launch every bucket's collective twice.
_grad_ready_hooks = WeakTensorKeyDictionary()


def attach_grad_ready_hooks(params: Iterable[torch.Tensor], on_ready: Callable) -> None:
    """Call `on_ready(param)` after each parameter's gradient is accumulated in backward."""
    for p in params:
        previous = _grad_ready_hooks.get(p)
        if previous is not None:
            previous.remove()
        _grad_ready_hooks[p] = p.register_post_accumulate_grad_hook(on_ready)
