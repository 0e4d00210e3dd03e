"""The one compatibility shim for torch.distributed collectives (torch 2.11-2.13, gloo and NCCL).

Every collective Strato issues goes through here, so each call is counted: `comm_bytes()`
returns, per collective kind, the payload bytes this rank handed to the collective
(all_reduce / broadcast: the tensor; all_gather: the local input; reduce_scatter: the
full input); `comm_bytes_by_dim()` the same per mesh dimension. The engine reports the
growth of these counters as stats()["comm_bytes"] and stats()["comm_bytes_by_dim"].

`group` is a `runtime.mesh.MeshGroup` (what `ctx.mesh.group(dim)` returns: it names its
dimension and says on which device its collectives take tensors) or a plain
ProcessGroup / None (the default group, counted under 'world'). Every tensor must be on
the group's device (`mesh.collective_device`: CUDA for NCCL, CPU for gloo): a tensor
elsewhere raises CollectiveDeviceError naming the collective, the group and both devices.
`observe(fn)` calls fn(op, group name, devices) for every collective (tests use it).

With no process group initialised (a single process) every call is a local no-op
(all_gather/reduce_scatter copy), so single-process code needs no special case.

On gloo, all-gather and reduce-scatter run as direct algorithms built from gloo's
fastest primitives: reduce-scatter is one all_to_all plus a local sum, all-gather is one
broadcast per rank. Each rank sends the same (N-1)/N of the payload as gloo's ring
versions, in 0.4-0.7x their time (measured in bench/collectives.py, 2 ranks). Set
STRATO_GLOO_NATIVE_COLLECTIVES=1 to use gloo's own.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..compiler.errors import StratoError
from .mesh import MeshGroup, collective_device

_lock = threading.Lock()
_bytes: Counter[str] = Counter()
_bytes_by_dim: dict[str, Counter[str]] = {}
_observers: list[Callable[[str, str, list[torch.device]], None]] = []
_recent: deque[tuple[torch.Tensor, ...]] = deque(maxlen=2)
"""The tensors of the last few collectives, held so that Python never drops a tensor
before gloo's worker thread drops the work that used it: that thread would then need
the GIL to free it, and a process exiting right after a collective aborted when the
thread asked for the GIL during interpreter shutdown ("terminate called without an
active exception"). Once dynamo is imported, destroy_process_group no longer stops
those threads, so destroying the group at exit cannot prevent this."""


class CollectiveDeviceError(StratoError, RuntimeError):
    """A collective got a tensor on another device than its group's (NCCL needs CUDA
    tensors, gloo CPU ones)."""


def comm_bytes() -> dict[str, int]:
    """Payload bytes sent so far in this process, by collective kind."""
    with _lock:
        return dict(_bytes)


def comm_bytes_by_dim() -> dict[str, dict[str, int]]:
    """Payload bytes sent so far in this process, by mesh dimension, then collective kind
    ('world' for collectives over the default group that name no dimension)."""
    with _lock:
        return {dim: dict(kinds) for dim, kinds in _bytes_by_dim.items()}


@contextlib.contextmanager
def observe(callback: Callable[[str, str, list[torch.device]], None]):
    """Within the block, call `callback(op, group name, devices of its tensors)` for every
    collective that communicates."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


def _count(kind: str, group: Any | None, tensor: torch.Tensor, *more: torch.Tensor) -> None:
    """Check a collective's tensors are on its group's device, count its payload (also
    under its mesh dimension) and hold its tensors (see `_recent`)."""
    name = group_name(group)
    expected = device_of(group)
    devices = [t.device for t in (tensor, *more)]
    wrong = next((d for d in devices if d != expected), None)
    if wrong is not None:
        raise CollectiveDeviceError(
            f"{kind} over mesh group {name!r} got a tensor on {wrong}; this group's "
            f"collectives take tensors on {expected} (NCCL: CUDA, gloo: CPU). Create "
            "communication buffers on the group's device (MeshGroup.device)."
        )
    for observer in list(_observers):
        observer(kind, name, devices)
    nbytes = tensor.numel() * tensor.element_size()
    with _lock:
        _bytes[kind] += nbytes
        _bytes_by_dim.setdefault(name, Counter())[kind] += nbytes
        _recent.append((tensor, *more))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _pg(group: Any | None) -> Any | None:
    """The torch ProcessGroup behind a MeshGroup (or the group itself)."""
    return group.process_group if isinstance(group, MeshGroup) else group


def group_name(group: Any | None) -> str:
    return group.name if isinstance(group, MeshGroup) else "world"


def device_of(group: Any | None = None) -> torch.device:
    """Where `group`'s collectives take their tensors."""
    return group.device if isinstance(group, MeshGroup) else collective_device(group)


def world_size(group: Any | None = None) -> int:
    if isinstance(group, MeshGroup):
        return group.size
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: Any | None = None) -> int:
    if isinstance(group, MeshGroup):
        return group.rank
    return dist.get_rank(group) if is_distributed() else 0


def global_rank(group: Any | None, group_rank: int) -> int:
    """The global rank of `group`'s rank `group_rank`."""
    if isinstance(group, MeshGroup):
        return group.ranks[group_rank]
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


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
    return dist.get_backend(_pg(group)) == "gloo"


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
    _count("all_reduce", group, tensor)
    return dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=_pg(group), async_op=async_op)


def broadcast(tensor: torch.Tensor, src: int = 0, group: Any | None = None, async_op: bool = False):
    """In-place broadcast from global rank `src`."""
    if world_size(group) == 1:
        return _Done() if async_op else None
    _count("broadcast", group, tensor)
    return dist.broadcast(tensor, src=src, group=_pg(group), async_op=async_op)


def all_gather_into_tensor(
    output: torch.Tensor, input: torch.Tensor, group: Any | None = None, async_op: bool = False
):
    """Gather equal-sized `input`s of every rank, concatenated along dim 0, into `output`.

    Falls back to list all_gather where the backend lacks the single-tensor form."""
    n = world_size(group)
    if n == 1:
        output.copy_(input.reshape(output.shape))
        return _Done() if async_op else None
    _count("all_gather", group, input, output)
    if _direct(group) and output.is_contiguous():
        # One broadcast per rank into its slot of `output`; global ranks for `src`.
        slots = output.view(n, -1)
        me = rank(group)
        slots[me].copy_(input.reshape(-1))
        rows = [slots[r] for r in range(n)]  # the views gloo's works hold, held here too
        with _lock:
            _recent[-1] = (*_recent[-1], *rows)
        works = [
            dist.broadcast(rows[r], src=global_rank(group, r), group=_pg(group), async_op=True)
            for r in range(n)
        ]
        return _finished(_Then(works), async_op)
    # torch 2.13 names it all_gather_single (all_gather_into_tensor warns); 2.11-2.12 lack it.
    single = getattr(dist, "all_gather_single", None) or getattr(
        dist, "all_gather_into_tensor", None
    )
    if single is not None:
        try:
            return single(output, input, group=_pg(group), async_op=async_op)
        except (RuntimeError, NotImplementedError):
            pass
    chunks = list(output.chunk(n))
    work = dist.all_gather(chunks, input, group=_pg(group))
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
    _count("reduce_scatter", group, input, output)
    if _direct(group) and op == dist.ReduceOp.SUM and output.is_contiguous():
        # Chunk r of every rank lands on rank r, which sums what it received.
        received, flat = torch.empty_like(input.reshape(-1)), input.reshape(-1)
        with _lock:
            _recent[-1] = (*_recent[-1], received, flat)
        work = dist.all_to_all_single(received, flat, group=_pg(group), async_op=True)

        def sum_received() -> None:
            torch.sum(received.view(n, -1), dim=0, out=output.view(-1))

        return _finished(_Then([work], sum_received), async_op)
    single = getattr(dist, "reduce_scatter_single", None) or getattr(
        dist, "reduce_scatter_tensor", None
    )
    if single is not None:
        try:
            return single(output, input, op=op, group=_pg(group), async_op=async_op)
        except (RuntimeError, NotImplementedError):
            pass
    chunks = list(input.chunk(n))
    try:
        dist.reduce_scatter(output, chunks, op=op, group=_pg(group))
    except (RuntimeError, NotImplementedError):
        full = input.clone()
        dist.all_reduce(full, op=op, group=_pg(group))
        output.copy_(full.chunk(n)[rank(group)].reshape(output.shape))
    return _Done() if async_op else None


def all_to_all_single(
    input: torch.Tensor,
    output_split_sizes: list[int],
    input_split_sizes: list[int],
    group: Any | None = None,
    kind: str = "all_to_all",
) -> torch.Tensor:
    """Rows input[sum(in[:r]) : sum(in[:r+1])] go to group rank r; returns what every rank
    sent here, `output_split_sizes[r]` rows from rank r, in rank order (variable sizes:
    MoE dispatch). Counted under `kind` (the payload: this rank's whole input)."""
    rows = sum(output_split_sizes)
    output = input.new_empty((rows, *input.shape[1:]))
    if world_size(group) == 1:
        output.copy_(input)
        return output
    input = input.contiguous()
    _count(kind, group, input, output)
    dist.all_to_all_single(
        output,
        input,
        output_split_sizes=list(output_split_sizes),
        input_split_sizes=list(input_split_sizes),
        group=_pg(group),
    )
    return output


class AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: backward sends each row's gradient back the way
    it came (the splits swapped), counted like the forward."""

    @staticmethod
    def forward(ctx, input, output_split_sizes, input_split_sizes, group, kind="all_to_all"):
        ctx.splits = (list(output_split_sizes), list(input_split_sizes))
        ctx.group, ctx.kind = group, kind
        return all_to_all_single(input, output_split_sizes, input_split_sizes, group, kind)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = all_to_all_single(grad, in_splits, out_splits, ctx.group, ctx.kind)
        return back, None, None, None, None


def barrier(group: Any | None = None) -> None:
    if world_size(group) > 1:
        dist.barrier(group=_pg(group))


def monitored_barrier(timeout_s: float, group: Any | None = None) -> None:
    """A barrier that fails after `timeout_s` instead of hanging, naming the ranks that did
    not arrive (gloo's monitored_barrier; other backends fall back to a plain barrier)."""
    if world_size(group) == 1:
        return
    if dist.get_backend(group) != "gloo":
        dist.barrier(group=group)
        return
    import datetime

    dist.monitored_barrier(
        group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True
    )


def isend(tensor: torch.Tensor, dst: int, group: Any | None = None, tag: int = 0):
    """Start sending `tensor` to group rank `dst` (pipeline stages); returns the work.
    Counted as 'send' (the payload)."""
    _count("send", group, tensor)
    return dist.isend(tensor.contiguous(), dst=global_rank(group, dst), group=_pg(group), tag=tag)


def recv(tensor: torch.Tensor, src: int, group: Any | None = None, tag: int = 0) -> torch.Tensor:
    """Receive into `tensor` from group rank `src`, waiting until it has arrived."""
    _count("recv", group, tensor)
    dist.irecv(tensor, src=global_rank(group, src), group=_pg(group), tag=tag).wait()
    return tensor


def growth_by_dim(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """What `comm_bytes_by_dim()` grew by between two readings (dimensions that grew)."""
    out = {}
    for dim, kinds in after.items():
        grew = {k: v - before.get(dim, {}).get(k, 0) for k, v in kinds.items()}
        grew = {k: v for k, v in grew.items() if v}
        if grew:
            out[dim] = grew
    return out
