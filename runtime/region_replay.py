"""Recompute regions replayed from their graph: the policy decided at compile time, per node.

A region's forward runs without autograd and keeps only its inputs and, under 'selective',
the outputs of its linear/matmul nodes; backward replays the region's graph under autograd
from those (each kept node's output stands in for the node, and its input gradients come
from the matmul formulas, `_REUSE`), then differentiates the replay. No dispatch mode, no
per-op Python: the forward and the replay are plain generated graph code, and what is kept
was fixed when the region was outlined. Dropout replays the same masks (the RNG state at
the region's start is restored for the replay).

`replay_program` says when this does not apply (in-place ops, a kept op without a formula
such as fused attention or convolution, non-tensor outputs): the region then runs under
torch.utils.checkpoint, as `saved_tensors.run_region` does.
"""

from __future__ import annotations

import contextlib
import operator

import attrs
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import get_device_states, set_device_states

aten = torch.ops.aten


class _ReuseLinear(torch.autograd.Function):
    """linear(x, w, b) whose output was kept in forward: returns it, backward as linear's."""

    @staticmethod
    def forward(ctx, out, x, w, b=None):
        ctx.save_for_backward(x, w)
        ctx.bias = b is not None
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        gx = grad.matmul(w) if ctx.needs_input_grad[1] else None
        gw = flat.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[2] else None
        gb = flat.sum(0) if ctx.bias and ctx.needs_input_grad[3] else None
        return None, gx, gw, gb


class _ReuseMatmul(torch.autograd.Function):
    """a @ b (b 2-D, a at least 2-D: mm or a batched activation times a weight), kept."""

    @staticmethod
    def forward(ctx, out, a, b):
        ctx.save_for_backward(a, b)
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        ga = grad.matmul(b.t()) if ctx.needs_input_grad[1] else None
        gb = None
        if ctx.needs_input_grad[2]:
            gb = a.reshape(-1, a.shape[-1]).t().mm(grad.reshape(-1, grad.shape[-1]))
        return None, ga, gb


class _ReuseAddmm(torch.autograd.Function):
    """addmm(c, a, b, beta=, alpha=) = beta * c + alpha * a @ b, kept."""

    @staticmethod
    def forward(ctx, out, c, a, b, beta=1, alpha=1):
        ctx.save_for_backward(a, b)
        ctx.c_shape, ctx.beta, ctx.alpha = c.shape, beta, alpha
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        gc = (grad * ctx.beta).sum_to_size(ctx.c_shape) if ctx.needs_input_grad[1] else None
        ga = grad.mm(b.t()) * ctx.alpha if ctx.needs_input_grad[2] else None
        gb = a.t().mm(grad) * ctx.alpha if ctx.needs_input_grad[3] else None
        return None, gc, ga, gb, None, None


def _reuse_linear(out, x, w, b=None):
    return _ReuseLinear.apply(out, x, w, b)


def _reuse_matmul(out, a, b):
    return _ReuseMatmul.apply(out, a, b)


def _reuse_addmm(out, c, a, b, *, beta=1, alpha=1):
    return _ReuseAddmm.apply(out, c, a, b, beta, alpha)


class _ReuseAttention(torch.autograd.Function):
    """Fused attention (CPU flash kernel) whose output and log-sum-exp were kept."""

    @staticmethod
    def forward(ctx, out, logsumexp, q, k, v, attn_mask, is_causal, scale):
        ctx.save_for_backward(q, k, v, out, logsumexp, attn_mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, logsumexp, attn_mask = ctx.saved_tensors
        gq, gk, gv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.contiguous(),
            q,
            k,
            v,
            out,
            logsumexp,
            0.0,
            ctx.is_causal,
            attn_mask=_additive(attn_mask, q.dtype),
            scale=ctx.scale,
        )
        return None, None, gq, gk, gv, None, None, None


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: attend) as the additive mask the flash kernel takes."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def _attention_keeping_stats(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """scaled_dot_product_attention as the CPU flash kernel: (output, log-sum-exp)."""
    return aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=_additive(attn_mask, q.dtype), scale=scale
    )


def _reuse_attention(out, logsumexp, q, k, v, attn_mask=None, is_causal=False, scale=None):
    if attn_mask is not None and attn_mask.requires_grad:  # the flash backward has no mask grad
        return aten.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=scale)
    return _ReuseAttention.apply(out, logsumexp, q, k, v, attn_mask, is_causal, scale)


def _attention_args(node: fx.Node) -> dict | None:
    """The arguments of an SDPA node the CPU flash kernel runs exactly as SDPA does (no
    dropout, no grouped-query broadcast, a boolean mask or one of the query's dtype)."""
    from torch.fx.operator_schemas import normalize_function

    found = normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
    )
    if found is None:
        return None
    kwargs = dict(found.kwargs)
    q, mask = _val(kwargs.get("query")), kwargs.get("attn_mask")
    if q is None or q.device.type != "cpu" or q.dim() != 4 or kwargs.pop("enable_gqa", False):
        return None
    if kwargs.pop("dropout_p", 0.0) != 0.0:
        return None
    if mask is not None and (_val(mask) is None or _val(mask).dtype not in (q.dtype, torch.bool)):
        return None
    return {
        "q": kwargs["query"],
        "k": kwargs["key"],
        "v": kwargs["value"],
        "attn_mask": mask,
        "is_causal": kwargs.get("is_causal", False),
        "scale": kwargs.get("scale"),
    }


_REUSE = {
    aten.linear.default: _reuse_linear,
    aten.mm.default: _reuse_matmul,
    aten.matmul.default: _reuse_matmul,
    aten.addmm.default: _reuse_addmm,
}
"""Kept ops with a replay formula: the node's target -> its stand-in in the replay graph."""

_ATTENTION = aten.scaled_dot_product_attention.default

KEPT_WITHOUT_FORMULA = {
    _ATTENTION,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten.convolution.default,
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
}
"""Ops selective keeps without a formula of their own here (SDPA has one where the CPU
flash kernel runs it, `_attention_args`): a region with one runs under torch's
selective-checkpoint contexts instead (they keep the op's output and attention stats)."""


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def kept_by_selective(node: fx.Node) -> bool:
    """Selective keeps this node's output: a linear layer, mm/addmm, an activation times a
    2-D weight, fused attention, a convolution. Batched matmuls of two activations (an
    unfused attention core) are recomputed, as in Megatron's selective recomputation."""
    if node.op != "call_function":
        return False
    if node.target is aten.matmul.default:
        a, b = (_val(arg) for arg in node.args[:2])
        return a is not None and b is not None and b.dim() == 2 and a.dim() >= 2
    return node.target in _REUSE or node.target in KEPT_WITHOUT_FORMULA


def _random(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return node.op == "call_function" and torch.Tag.nondeterministic_seeded in tags


@attrs.frozen
class ReplayProgram:
    """A region compiled for replay under one policy."""

    forward: fx.GraphModule
    """The region's inputs -> its outputs, then the outputs of the kept nodes."""
    replay: fx.GraphModule
    """The region's inputs, then the kept outputs -> its outputs (kept nodes stand in)."""
    outputs: int
    random: bool
    """The region draws random numbers (dropout): the replay restores the RNG state."""


def replay_program(body: fx.GraphModule, policy: str) -> tuple[ReplayProgram | None, str]:
    """The region `body` as a forward and a replay graph under `policy` ('full' keeps
    nothing, 'selective' the nodes `kept_by_selective`), or None and why not."""
    nodes = [n for n in body.graph.nodes if n.op == "call_function"]
    for node in nodes:
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return None, f"{node.name} ({node.target}) writes in place"
    out_node = next(n for n in body.graph.nodes if n.op == "output")
    if any(_val(o) is None for o in out_node.args[0]):
        return None, "an output is not a tensor"
    kept = [n for n in nodes if kept_by_selective(n)] if policy == "selective" else []
    attention = {n: _attention_args(n) for n in kept if n.target is _ATTENTION}
    for node in kept:
        if node.target not in _REUSE and attention.get(node) is None:
            return None, f"{node.name} ({node.target}) has no replay formula"
    forward = fx.GraphModule(body, _forward_graph(body.graph, kept, attention))
    replay_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in body.graph.nodes:
        if node.op == "placeholder":
            env[node] = replay_graph.node_copy(node)
    stand_ins = {}
    for node in kept:
        names = ("out", "logsumexp") if node in attention else ("out",)
        stand_ins[node] = [replay_graph.placeholder(f"kept_{node.name}_{n}") for n in names]
    for node in body.graph.nodes:
        if node.op == "placeholder":
            continue
        if node in attention:
            kwargs = fx.map_arg(attention[node], lambda a: env[a])
            env[node] = replay_graph.call_function(_reuse_attention, (*stand_ins[node],), kwargs)
        elif node in stand_ins:
            args = (*stand_ins[node], *fx.map_arg(node.args, lambda a: env[a]))
            kwargs = fx.map_arg(node.kwargs, lambda a: env[a])
            env[node] = replay_graph.call_function(_REUSE[node.target], args, kwargs)
        else:
            env[node] = replay_graph.node_copy(node, lambda a: env[a])
        env[node].meta = dict(node.meta)
    replay = fx.GraphModule(body, replay_graph)
    program = ReplayProgram(forward, replay, len(out_node.args[0]), any(map(_random, nodes)))
    return program, ""


def _forward_graph(graph: fx.Graph, kept: list[fx.Node], attention: dict) -> fx.Graph:
    """A copy of `graph` that also returns the kept nodes' outputs (attention: its output
    and log-sum-exp, from the CPU flash kernel)."""
    copy = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    extra: list[fx.Node] = []
    for node in graph.nodes:
        if node.op == "output":
            copy.output(tuple(env[o] for o in node.args[0]) + tuple(extra))
        elif node in attention:
            pair = copy.call_function(
                _attention_keeping_stats, (), fx.map_arg(attention[node], lambda a: env[a])
            )
            env[node] = copy.call_function(operator.getitem, (pair, 0))
            env[node].meta = dict(node.meta)
            extra += [env[node], copy.call_function(operator.getitem, (pair, 1))]
        else:
            env[node] = copy.node_copy(node, lambda a: env[a])
            if node in kept:
                extra.append(env[node])
    return copy


class Replayed(torch.autograd.Function):
    """Run a region's forward program without autograd; backward replays it and
    differentiates the replay. `fixed`: positions of model tensors (read as they are, not
    saved: ZeRO-3 finds a unit by its Parameter objects)."""

    @staticmethod
    def forward(ctx, program, fixed, offload, *args):
        ctx.set_materialize_grads(False)
        ctx.program, ctx.offload = program, offload
        moving = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in fixed]
        ctx.moving = moving
        ctx.args = [None if i in moving else a for i, a in enumerate(args)]
        ctx.rng = None
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if program.random and not any(is_fake(t) for t in tensors):
            devices = [t.device.type for t in tensors if t.device.type != "cpu"]
            device_type = devices[0] if devices else "cuda"
            ctx.rng = (torch.get_rng_state(), device_type, *get_device_states(*tensors))
        values = program.forward(*args)
        outputs, kept = values[: program.outputs], values[program.outputs :]
        stored = [args[i] for i in moving] + list(kept)
        if offload:
            ctx.devices = [t.device for t in stored]
            stored = [t.to("cpu", non_blocking=True) for t in stored]
        ctx.save_for_backward(*stored)
        ctx.mark_non_differentiable(*(o for o in outputs if not o.dtype.is_floating_point))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        stored = list(ctx.saved_tensors)
        if ctx.offload:
            stored = [t.to(d, non_blocking=True) for t, d in zip(stored, ctx.devices)]
        args = list(ctx.args)
        for i, t in zip(ctx.moving, stored):
            args[i] = t.detach().requires_grad_(t.requires_grad)
        kept = [t.detach() for t in stored[len(ctx.moving) :]]
        wrt = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        with torch.enable_grad(), _replaying_rng(ctx.rng):
            outputs = ctx.program.replay(*args, *kept)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.grad_fn is not None]
        result = [None] * len(args)
        if pairs and wrt:
            got = torch.autograd.grad(
                [o for o, _ in pairs],
                [args[i] for i in wrt],
                [g for _, g in pairs],
                allow_unused=True,
            )
            for i, g in zip(wrt, got):
                result[i] = g
        return (None, None, None, *result)


@contextlib.contextmanager
def _replaying_rng(state):
    """The RNG state of the region's forward, for the replay; the caller's state after."""
    if state is None:
        yield
        return
    cpu, device_type, devices, device_states = state
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.set_rng_state(cpu)
        if devices:
            set_device_states(devices, device_states, device_type=device_type)
        yield
