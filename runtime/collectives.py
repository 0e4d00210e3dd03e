"""The one compatibility shim for torch.distributed collectives (torch 2.11-2.13, gloo and NCCL).

Every collective Strato issues goes through here, so each call is counted: `comm_bytes()`
returns, per collective kind, the payload bytes this rank handed to the collective
(all_reduce / broadcast: the tensor; all_gather: the local input; reduce_scatter: the
full input). The engine reports the growth of these counters as stats()["comm_bytes"].

With no process group initialised (a single process) every call is a local no-op
(all_gather/reduce_scatter copy), so single-process code needs no special case.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

_lock = threading.Lock()
_bytes: Counter[str] = Counter()


def comm_bytes() -> dict[str, int]:
    """Payload bytes sent so far in this process, by collective kind."""
    with _lock:
        return dict(_bytes)


def _count(kind: str, tensor: torch.Tensor) -> None:
    with _lock:
        _bytes[kind] += tensor.numel() * tensor.element_size()


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
    _count("all_gather", input)
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
    _count("reduce_scatter", input)
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
