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

The ranks of a tensor group compute parts of the same layers, so they must be fed the same
batch (a sampler split over the whole world would give each its own, and the all-reduces
would silently sum parts of different batches): `check_same_inputs` compares a fingerprint
of every call's inputs across the group and raises on every rank when they differ.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
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


# ---------------------------------------------------------------------- same inputs

FINGERPRINT_WORDS = 2
"""int64s each rank contributes per checked call: a digest of the inputs' names, dtypes,
shapes and plain values, and one of their bits."""

_checked_scopes = 0
"""> 0 while a caller that checked its whole input (train_step, generate) runs graphs."""


@contextlib.contextmanager
def inputs_checked() -> Iterator[None]:
    """Graph calls inside skip `check_call_inputs`: the caller checked what feeds them."""
    global _checked_scopes
    _checked_scopes += 1
    try:
        yield
    finally:
        _checked_scopes -= 1


def _described(inputs: dict[str, Any]) -> list[tuple[str, str, torch.Tensor | None]]:
    """(name, what it is, tensor or None) of each leaf of each named input (nested ones
    named like 'past_key_values[0][1]')."""
    out = []
    for key, value in inputs.items():
        leaves, _ = pytree.tree_flatten_with_path(value)
        for path, leaf in leaves:
            name = key + pytree.keystr(path)
            if isinstance(leaf, torch.Tensor):
                dtype = str(leaf.dtype).removeprefix("torch.")
                out.append((name, f"{dtype} {tuple(leaf.shape)} on {leaf.device.type}", leaf))
            elif leaf is None or isinstance(
                leaf, (bool, int, float, str, torch.dtype, torch.device)
            ):
                out.append((name, repr(leaf), None))
            else:  # only the type: a default repr holds an address, which differs by process
                out.append((name, type(leaf).__name__, None))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """[sum, position-weighted sum] of the tensor's bits read as int32 words (bytes where
    the size is no multiple of 4), in wrapping integer arithmetic: exact for every dtype,
    the same whatever order the reduction takes, and changed by any flipped or moved word."""
    raw = t.detach().contiguous().reshape(-1)
    raw = raw.view(torch.uint8)
    words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw.int()
    weights = torch.arange(1, words.numel() + 1, dtype=torch.int32, device=words.device)
    return torch.stack([words.sum(dtype=torch.int64), (words * weights).sum(dtype=torch.int64)])


def _fingerprint(described: list, device: torch.device) -> torch.Tensor:
    meta = 0
    bits = torch.zeros((), dtype=torch.int64, device=device)
    for i, (name, what, tensor) in enumerate(described):
        meta = zlib.crc32(f"{i}:{name}:{what};".encode(), meta)
        if tensor is not None:  # odd factors per position: swapped inputs change the sum
            odd = torch.tensor([80_007 * i + 1, 131_199 * i + 3], device=tensor.device)
            bits = bits + (_bits(tensor) * odd).sum().to(device)
    return torch.stack([torch.tensor(meta, dtype=torch.int64, device=device), bits])


def _summary(described: list) -> dict[str, str]:
    return {
        name: what if tensor is None else f"{what}, bits {_bits(tensor).tolist()}"
        for name, what, tensor in described
    }


def check_same_inputs(record: dict | None, inputs: dict, where: str, hint: str = "") -> None:
    """Raise InputError on every rank of the tensor group unless every rank passed the same
    named `inputs` (tensors bit for bit, flags by value) to `where`: one all-gather of
    FINGERPRINT_WORDS int64s per rank. `record` is the tensor_parallel pass's record (None,
    a group of one, or TensorParallel(check_inputs=False): nothing to check)."""
    if record is None or not record.get("check_inputs") or _checked_scopes:
        return
    group = group_of(record["group"])
    if group.size == 1:
        return
    described = _described(inputs)
    mine = _fingerprint(described, group.device)
    everyone = torch.zeros(group.size * FINGERPRINT_WORDS, dtype=torch.int64, device=group.device)
    collectives.all_gather_into_tensor(everyone, mine, group=group)
    rows = everyone.view(group.size, FINGERPRINT_WORDS).tolist()
    if all(row == rows[0] for row in rows):
        return
    # Every rank saw the same fingerprints, so every rank takes this branch together.
    summaries: list[Any] = [None] * group.size
    dist.all_gather_object(summaries, _summary(described), group=collectives._pg(group))
    from ..compiler.errors import InputError

    names = list(dict.fromkeys(n for s in summaries for n in s))
    name = next((n for n in names if len({s.get(n) for s in summaries}) > 1), "their order")
    per_rank = "; ".join(
        f"rank {r}: {s.get(name, 'not given')}" for r, s in zip(group.ranks, summaries)
    )
    raise InputError(
        f"tensor parallel: rank {group.ranks[group.rank]}: {where} got different inputs on the "
        f"ranks of its tensor group {list(group.ranks)}: {name!r} differs ({per_rank}). "
        + (
            hint
            or "Each rank of a tensor group computes part of every layer for the same batch, "
            "so feed all of them the same one: shard the data by data-parallel rank, not by "
            "rank (engine.data_parallel_rank of engine.data_parallel_size, e.g. "
            "DistributedSampler(data, num_replicas=engine.data_parallel_size, "
            "rank=engine.data_parallel_rank))."
        )
    )


def call_inputs(args: tuple, kwargs: dict, prefix: str = "") -> dict[str, Any]:
    """A call's inputs by name: 'argument 0'... for positional ones, keywords by keyword."""
    named = {f"{prefix}argument {i}": a for i, a in enumerate(args)}
    return {**named, **{f"{prefix}{k}": v for k, v in kwargs.items()}}


def check_call_inputs(compiled: Any, call: Any) -> None:
    """`check_same_inputs` for one call of a CompiledModel (a runtime/calls.py BoundCall,
    its arguments named as the model's forward names them)."""
    record = compiled.context.records.get("tensor_parallel")
    if record is None or _checked_scopes:
        return
    mode = "training" if compiled.training else "eval"
    where = f"a call of the compiled {type(compiled.model).__name__} ({mode})"
    inputs = dict(zip(call.signature.names, call.args))
    check_same_inputs(record, {**inputs, **call.kwargs}, where)


def check_step_inputs(engine: Any, micro_batches: list) -> None:
    """`check_same_inputs` for one train_step: all its micro-batches in one all-gather."""
    inputs: dict[str, Any] = {}
    for k, micro_batch in enumerate(micro_batches):
        prefix = f"micro-batch {k}: " if len(micro_batches) > 1 else ""
        inputs.update(call_inputs(micro_batch.args, micro_batch.kwargs, prefix))
        if micro_batch.target is not None:
            inputs[f"{prefix}target"] = micro_batch.target
    check_same_inputs(engine.context.records.get("tensor_parallel"), inputs, "train_step")


def check_generate_request(
    graph: Any, prompt, mask, max_new_tokens, temperature, top_k, top_p, eos, generator
) -> None:
    """`check_same_inputs` for one generate call (its step graphs' calls are not checked):
    the prompt, mask and options, and when sampling the random state it draws from (ranks
    seeded differently would pick different tokens from the same logits)."""
    context = getattr(graph, "context", None)  # an artifact's graphs have no tensor group
    record = context.records.get("tensor_parallel") if context is not None else None
    if record is None:
        return
    inputs = {
        "input_ids": prompt,
        "attention_mask": mask,
        "max_new_tokens": max_new_tokens,
        "temperature": float(temperature),
        "top_k": top_k,
        "top_p": top_p,
        "eos_token_id": list(eos),
    }
    if temperature > 0:
        if generator is not None:
            state = generator.get_state()
        elif prompt.device.type == "cuda":
            state = torch.cuda.get_rng_state(prompt.device)
        else:
            state = torch.get_rng_state()
        inputs["the sampling random state"] = state
    check_same_inputs(
        record,
        inputs,
        "generate",
        "Every rank of a tensor group decodes the same sequences: give each the same prompts, "
        "and when sampling the same seed (generate(..., seed=n)) or generator state.",
    )
