"""Gradient buckets released strictly in order as their gradients arrive during backward.

Every rank must issue the same collectives in the same order, whatever order autograd
finishes gradients in: a bucket is released only once it and every bucket before it are
complete. Shared by data parallelism (all-reduce) and ZeRO (reduce-scatter).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch.utils.weak import WeakTensorKeyDictionary


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
