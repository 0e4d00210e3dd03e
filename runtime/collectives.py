"""The one compatibility shim for torch.distributed collectives (torch 2.11-2.13, gloo and NCCL).

Every collective Strato issues goes through here, so each call is counted: `comm_bytes()`
returns, per collective kind, the payload bytes this rank handed to the collective
(all_reduce / broadcast: the tensor; all_gather: the local input; reduce_scatter: the
full input). The engine reports the growth of these counters as stats()["comm_bytes"].

With no process group initialised (a single process) every call is a local no-op
(all_gather/reduce_scatter copy), so single-process code needs no special case.

On gloo, all-gather and reduce-scatter run as direct algorithms built from gloo's
fastest primitives: reduce-scatter is one all_to_all plus a local sum, all-gather is one
broadcast per rank. Each rank sends the same (N-1)/N of the payload as gloo's ring
versions, in 0.4-0.7x their time (measured in bench/collectives.py, 2 ranks). Set
STRATO_GLOO_NATIVE_COLLECTIVES=1 to use gloo's own.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

_lock = threading.Lock()
_bytes: Counter[str] = Counter()
_recent: deque[tuple[torch.Tensor, ...]] = deque(maxlen=2)
"""The tensors of the last few collectives, held so that Python never drops a tensor
before gloo's worker thread drops the work that used it: that thread would then need
the GIL to free it, and a process exiting right after a collective aborted when the
thread asked for the GIL during interpreter shutdown ("terminate called without an
active exception"). Once dynamo is imported, destroy_process_group no longer stops
those threads, so destroying the group at exit cannot prevent this."""


def comm_bytes() -> dict[str, int]:
    """Payload bytes sent so far in this process, by collective kind."""
    with _lock:
        return dict(_bytes)


def _count(kind: str, tensor: torch.Tensor, *more: torch.Tensor) -> None:
    """Count a collective's payload and hold its tensors (see `_recent`)."""
    with _lock:
        _bytes[kind] += tensor.numel() * tensor.element_size()
        _recent.append((tensor, *more))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any | None = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: Any | None = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


class _Done:
    """A finished work handle, for calls that ran synchronously or locally."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class _Then:
    """Work handles that finish with a local step (a sum, a copy) once they complete."""

    def __init__(self, works: Sequence[Any], finish: Callable[[], None] | None = None) -> None:
        self._works, self._finish = list(works), finish

    def wait(self) -> bool:
        for work in self._works:
            work.wait()
        self._works = []
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()
        return True

    def is_completed(self) -> bool:
        return not self._works and self._finish is None


def _direct(group: Any | None) -> bool:
    """Whether to use the direct all_to_all / broadcast algorithms (gloo; see the top)."""
    if os.environ.get("STRATO_GLOO_NATIVE_COLLECTIVES", "0") not in ("", "0"):
        return False
    return dist.get_backend(group) == "gloo"


def _finished(work: _Then, async_op: bool):
    if async_op:
        return work
    work.wait()
    return None


def all_reduce(
    tensor: torch.Tensor,
    op: Any = None,
    group: Any | None = None,
    async_op: bool = False,
):
    """In-place all-reduce (default SUM); returns a work handle when async_op."""
    if world_size(group) == 1:
        return _Done() if async_op else None
    _count("all_reduce", tensor)
    return dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group, async_op=async_op)


def broadcast(tensor: torch.Tensor, src: int = 0, group: Any | None = None, async_op: bool = False):
    """In-place broadcast from global rank `src`."""
    if world_size(group) == 1:
        return _Done() if async_op else None
    _count("broadcast", tensor)
    return dist.broadcast(tensor, src=src, group=group, async_op=async_op)


def all_gather_into_tensor(
    output: torch.Tensor, input: torch.Tensor, group: Any | None = None, async_op: bool = False
):
    """Gather equal-sized `input`s of every rank, concatenated along dim 0, into `output`.

    Falls back to list all_gather where the backend lacks the single-tensor form."""
    n = world_size(group)
    if n == 1:
        output.copy_(input.reshape(output.shape))
        return _Done() if async_op else None
    _count("all_gather", input, output)
    if _direct(group) and output.is_contiguous():
        # One broadcast per rank into its slot of `output`; global ranks for `src`.
        slots = output.view(n, -1)
        me = rank(group)
        slots[me].copy_(input.reshape(-1))
        rows = [slots[r] for r in range(n)]  # the views gloo's works hold, held here too
        with _lock:
            _recent[-1] = (*_recent[-1], *rows)
        works = [
            dist.broadcast(
                rows[r],
                src=dist.get_global_rank(group, r) if group else r,
                group=group,
                async_op=True,
            )
            for r in range(n)
        ]
        return _finished(_Then(works), async_op)
    # torch 2.13 names it all_gather_single (all_gather_into_tensor warns); 2.11-2.12 lack it.
    single = getattr(dist, "all_gather_single", None) or getattr(
        dist, "all_gather_into_tensor", None
    )
    if single is not None:
        try:
            return single(output, input, group=group, async_op=async_op)
        except (RuntimeError, NotImplementedError):
            pass
    chunks = list(output.chunk(n))
    work = dist.all_gather(chunks, input, group=group)
    return _Done() if async_op else work


def reduce_scatter_tensor(
    output: torch.Tensor,
    input: torch.Tensor,
    op: Any = None,
    group: Any | None = None,
    async_op: bool = False,
):
    """Reduce `input` (dim 0 split into world-size equal chunks) over ranks; this rank
    receives its chunk in `output`. Falls back to list reduce_scatter, then to
    all_reduce + copy where the backend has neither."""
    n = world_size(group)
    op = op or dist.ReduceOp.SUM
    if n == 1:
        output.copy_(input.reshape(output.shape))
        return _Done() if async_op else None
    _count("reduce_scatter", input, output)
    if _direct(group) and op == dist.ReduceOp.SUM and output.is_contiguous():
        # Chunk r of every rank lands on rank r, which sums what it received.
        received, flat = torch.empty_like(input.reshape(-1)), input.reshape(-1)
        with _lock:
            _recent[-1] = (*_recent[-1], received, flat)
        work = dist.all_to_all_single(received, flat, group=group, async_op=True)

        def sum_received() -> None:
            torch.sum(received.view(n, -1), dim=0, out=output.view(-1))

        return _finished(_Then([work], sum_received), async_op)
    single = getattr(dist, "reduce_scatter_single", None) or getattr(
        dist, "reduce_scatter_tensor", None
    )
    if single is not None:
        try:
            return single(output, input, op=op, group=group, async_op=async_op)
        except (RuntimeError, NotImplementedError):
            pass
    chunks = list(input.chunk(n))
    try:
        dist.reduce_scatter(output, chunks, op=op, group=group)
    except (RuntimeError, NotImplementedError):
        full = input.clone()
        dist.all_reduce(full, op=op, group=group)
        output.copy_(full.chunk(n)[rank(group)].reshape(output.shape))
    return _Done() if async_op else None


def barrier(group: Any | None = None) -> None:
    if world_size(group) > 1:
        dist.barrier(group=group)
