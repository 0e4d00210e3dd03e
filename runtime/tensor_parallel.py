"""Tensor parallelism at run time: the autograd collectives the `tensor_parallel` pass puts
in the graph, and the parameter shards it leaves on the model.

Megatron's four conjugate functions, over the mesh's `tensor` group (named in the graph by
a string key, resolved here):

    tp_copy      forward identity,   backward all-reduce   (before column-parallel linears)
    tp_reduce    forward all-reduce, backward identity     (after row-parallel linears)
    tp_gather    forward all-gather along a dim, backward its own slice (split values
                 leaving the graph, e.g. vocab-split logits)

plus the vocab-parallel embedding and cross-entropy built from them. Every function runs
on fake tensors too (no communication: the compiler propagates shapes through them), and
over a group of one rank it is the identity. All communication goes through
runtime/collectives.py, so it is counted under the `tensor` dimension.

A sharded parameter keeps the model's own Parameter object; its data becomes this rank's
block, and the parameter remembers its whole shape (`whole_parameters` restores that shape,
uninitialised, while a graph is captured again).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake

from . import collectives
from .mesh import MeshGroup

GLOBAL_ATTR = "_strato_tp_whole"
"""Attribute of a sharded Parameter: (whole shape, layout steps) it was cut with."""

_groups: dict[str, MeshGroup] = {}


def register_group(group: MeshGroup) -> str:
    """The key graphs name `group` by (its dimension and ranks), registered for this process."""
    key = f"{group.name}:{','.join(map(str, group.ranks))}"
    _groups[key] = group
    return key


def group_of(key: str) -> MeshGroup:
    try:
        return _groups[key]
    except KeyError:
        raise RuntimeError(
            f"tensor parallel: the graph names group {key!r}, which this process never "
            "registered; run graphs compiled with Strategy(tensor_parallel=...) in the process "
            "that compiled them."
        ) from None


def _communicates(x: torch.Tensor, key: str) -> bool:
    return not is_fake(x) and group_of(key).size > 1


def _all_reduce(x: torch.Tensor, key: str) -> torch.Tensor:
    out = x.contiguous().clone()
    if _communicates(x, key):
        group = group_of(key)
        collectives.all_reduce(out.to(group.device), group=group)
    return out


def _all_gather(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    group = group_of(key)
    if group.size == 1:
        return x.clone()
    if is_fake(x):
        return torch.cat([x] * group.size, dim=dim)
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((group.size * moved.shape[0], *moved.shape[1:]))
    collectives.all_gather_into_tensor(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


def _own_slice(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    group = group_of(key)
    return x.chunk(group.size, dim=dim)[group.rank].contiguous()


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key):
        ctx.key = key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.key), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, key):
        return _all_reduce(x, key)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, key):
        ctx.dim, ctx.key = dim, key
        return _all_gather(x, dim, key)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice(grad, ctx.dim, ctx.key), None, None


def _reduce_scatter(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    group = group_of(key)
    if group.size == 1:
        return x.clone()
    if x.shape[dim] % group.size:
        from ..compiler.errors import InputError

        raise InputError(
            f"sequence parallelism: activations of {x.shape[dim]} rows along dim {dim} do not "
            f"split over {group.size} tensor-parallel ranks; make the batch a multiple of "
            f"{group.size}, or use TensorParallel(sequence_parallel=False)."
        )
    if is_fake(x):
        return x.chunk(group.size, dim=dim)[0].clone()
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // group.size, *moved.shape[1:]))
    collectives.reduce_scatter_tensor(out, moved, group=group)
    return out.movedim(0, dim).contiguous()


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, key):
        ctx.dim, ctx.key = dim, key
        return _reduce_scatter(x, dim, key)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.key), None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, key):
        ctx.dim, ctx.key = dim, key
        return _all_gather(x, dim, key)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.key), None, None


def tp_reduce_scatter(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Sequence parallelism, after a row-parallel linear: sum the partial results and keep
    this rank's rows along `dim` (reduce-scatter); backward all-gathers the gradient."""
    return _ReduceScatter.apply(x, dim, group)


def tp_all_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Sequence parallelism, before a column-parallel linear: all-gather the rows along
    `dim`; backward reduce-scatters the gradient (each rank's rows of the summed gradient)."""
    return _AllGather.apply(x, dim, group)


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, key):
        ctx.dim, ctx.key = dim, key
        return _own_slice(x, dim, key)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.key), None, None


def tp_split(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """This rank's rows along `dim` of a whole value (entering sequence parallelism);
    backward all-gathers the gradient."""
    return _Split.apply(x, dim, group)


def tp_copy(x: torch.Tensor, group: str) -> torch.Tensor:
    """Identity in forward; all-reduce of the gradient in backward (column-parallel input)."""
    return _Copy.apply(x, group)


def tp_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """All-reduce (sum) of the partial results in forward; identity in backward."""
    return _Reduce.apply(x, group)


def tp_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """All-gather of the split dimension `dim` in forward; this rank's slice in backward."""
    return _Gather.apply(x, dim, group)


def vocab_parallel_embedding(
    weight: torch.Tensor,
    ids: torch.Tensor,
    start: int,
    padding_idx: int,
    group: str,
    scatter_dim: int = -1,
) -> torch.Tensor:
    """Embedding over a block of rows [start, start + rows): ids outside it give zeros, and
    the all-reduce over the tensor group sums in the row of the rank that holds each id
    (with sequence parallelism, `scatter_dim` >= 0: a reduce-scatter along that dim)."""
    local = ids - start
    outside = (local < 0) | (local >= weight.shape[0])
    out = torch.ops.aten.embedding.default(weight, local.masked_fill(outside, 0), padding_idx)
    out = out.masked_fill(outside.unsqueeze(-1), 0.0)
    if scatter_dim >= 0:
        return tp_reduce_scatter(out, scatter_dim, group)
    return tp_reduce(out, group)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    start: int,
    reduction: int,
    ignore_index: int,
    group: str,
) -> torch.Tensor:
    """Cross-entropy of logits [N, V] split over the vocabulary (this rank holds classes
    [start, start + V/size)), as Megatron computes it: the global max, the sum of exps and
    the target's logit are all-reduced, never the logits. `reduction` is aten's enum
    (0 none, 1 mean, 2 sum); targets equal to `ignore_index` count nowhere."""
    with torch.no_grad():
        row_max = logits.max(dim=-1, keepdim=True).values.float()
        if _communicates(logits, group):
            moved = row_max.to(group_of(group).device)
            collectives.all_reduce(moved, op=dist.ReduceOp.MAX, group=group_of(group))
            row_max = moved.to(logits.device)
    shifted = logits.float() - row_max
    sum_exp = tp_reduce(shifted.exp().sum(dim=-1), group)
    local = target - start
    outside = (local < 0) | (local >= logits.shape[-1])
    picked = shifted.gather(-1, local.masked_fill(outside, 0).unsqueeze(-1)).squeeze(-1)
    target_logit = tp_reduce(picked.masked_fill(outside, 0.0), group)
    kept = target != ignore_index
    loss = (sum_exp.log() - target_logit).masked_fill(~kept, 0.0)
    if reduction == 0:
        return loss
    if reduction == 2:
        return loss.sum()
    return loss.sum() / kept.sum()


# ---------------------------------------------------------------------- parameter shards


def shard_parameter(param: torch.nn.Parameter, steps: list[dict[str, Any]]) -> bool:
    """Leave `param` holding only its block (layout `steps` from the whole tensor); False
    when it already holds exactly that block (a second graph of the same model)."""
    from ..compiler.layout import apply_steps

    held = getattr(param, GLOBAL_ATTR, None)
    if held is not None:
        if held[1] != steps:
            raise RuntimeError(
                "tensor parallel: a parameter already split one way is asked to split "
                "another way by a later graph; compile the model once per strategy."
            )
        return False
    whole = tuple(param.shape)
    with torch.no_grad():
        param.data = apply_steps(param.data, tuple(steps)).contiguous().clone()
    setattr(param, GLOBAL_ATTR, (whole, [dict(s) for s in steps]))
    return True


@contextlib.contextmanager
def whole_parameters(model: torch.nn.Module) -> Iterator[None]:
    """While capturing a model whose parameters are tensor-parallel blocks: each holds an
    uninitialised tensor of its whole shape (capture reads shapes only), then its block again."""
    held = []
    for p in model.parameters():
        whole = getattr(p, GLOBAL_ATTR, None)
        if whole is not None:
            held.append((p, p.data))
            p.data = torch.empty(whole[0], dtype=p.dtype, device=p.device)
    try:
        yield
    finally:
        for p, data in held:
            p.data = data


def tp_whole_stand_in(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """A zero-strided tensor of the whole shape of `x`, a graph input that arrives split
    along `dim` (a KV cache of this rank's heads): what export's input guards, which check
    the shapes the graph was captured with, are shown instead of it."""
    shape = list(x.shape)
    shape[dim] *= group_of(group).size
    return x.new_zeros(()).expand(shape)


def tp_dropout(x: torch.Tensor, p: float, train: bool, dim: int, group: str) -> torch.Tensor:
    """Dropout of a value split along `dim` (local heads, sequence shards): the keep-mask is
    drawn for the whole value, as one process would draw it, and each rank keeps its slice.
    So the masks equal a single process's, and every rank of the group consumes the same
    random numbers: dropout on replicated values after it draws identical masks."""
    if not train or p == 0.0 or is_fake(x) or group_of(group).size == 1:
        return torch.ops.aten.dropout.default(x, p, train)
    shape = list(x.shape)
    shape[dim] *= group_of(group).size
    keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * _own_slice(keep, dim, group).div_(1 - p)


def sync_rng(group: str) -> None:
    """Give every rank of the tensor group the first rank's default CPU (and current CUDA)
    generator state, so dropout on replicated values draws the same masks everywhere."""
    members = group_of(group)
    if members.size == 1:
        return
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    for i, state in enumerate(states):
        buffer = state.to(members.device)
        collectives.broadcast(buffer, src=members.ranks[0], group=members)
        if i == 0:
            torch.set_rng_state(buffer.cpu())
        else:
            torch.cuda.set_rng_state(buffer.cpu())
