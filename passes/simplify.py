"""Inference-graph cleanup: drop export's runtime asserts, no-op casts and slices, inline
grad-mode regions, merge duplicates, attend to grouped keys/values without copying them.

Export leaves `_assert_tensor_metadata` checks and `to(dtype)` calls that do nothing,
wraps code under `torch.no_grad()` (Hugging Face's rotary embeddings) in
`wrap_with_set_grad_enabled` submodules, and models recompute identical values (masks,
rotary tables) in every layer. In an inference graph, which never records autograd, a
grad-mode region is just its ops, and the rest is pure interpreter overhead, which
dominates small-batch decoding on a CPU. Inlining also lets such graphs be exported.
Grouped-query attention (Llama, Mistral, Qwen2: fewer key/value heads than query heads)
repeats each key/value head with expand + reshape before `scaled_dot_product_attention`,
a copy of the whole KV cache per layer and token; the pass hands the grouped tensors to
the op with `enable_gqa=True` instead (the same values, 2.7-3x faster at one token on this
CPU). Training graphs are left as they are.
"""

from __future__ import annotations

import operator
import sys

import torch
import torch.fx as fx

from ..compiler.context import CompileContext
from ..compiler.pass_manager import graph_pass

aten = torch.ops.aten

WHOLE_DIM = sys.maxsize
"""The end export writes for a slice to the end of a dim (`x[:, 3:]`, `x[:]`)."""
RUNTIME_ASSERTS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
}


def _is_noop_cast(node: fx.Node) -> bool:
    if node.target is not aten.to.dtype or not isinstance(node.args[0], fx.Node):
        return False
    source = node.args[0].meta.get("val")
    dtype = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    extra = {k: v for k, v in node.kwargs.items() if k != "dtype"}
    return isinstance(source, torch.Tensor) and source.dtype == dtype and not any(extra.values())


def _is_noop_slice(node: fx.Node) -> bool:
    """`aten.slice(x, dim, 0, <end of dim>, 1)`: a view of all of x."""
    if node.target is not aten.slice.Tensor or not isinstance(node.args[0], fx.Node):
        return False
    start, end, step = (list(node.args[2:5]) + [None, None, None])[:3]
    start = node.kwargs.get("start", start)
    end = node.kwargs.get("end", end)
    step = node.kwargs.get("step", step)
    return start in (None, 0) and end in (None, WHOLE_DIM) and step in (None, 1)


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _cse_key(node: fx.Node):
    """A hashable key for a pure, deterministic ATen call; None when it must not merge."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
        return None

    def freeze(value):
        if isinstance(value, list | tuple):
            return tuple(freeze(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, freeze(v)) for k, v in value.items()))
        return value

    key = (target, freeze(node.args), freeze(node.kwargs))
    try:
        hash(key)
    except TypeError:
        return None
    return key


@graph_pass(name="simplify_inference", requires="shapes")
def simplify_inference(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """In eval graphs: remove runtime asserts and no-op casts, merge identical pure calls."""
    if ctx.training:
        ctx.record("simplify_inference", skipped="training graph")
        return gm
    graph = gm.graph
    asserts = casts = slices = merged = grouped = 0
    # Dropping views and merging are only safe when nothing writes in place to a value
    # two users would share.
    functional = not any(_mutates(n) for n in graph.nodes)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in RUNTIME_ASSERTS and not node.users:
            graph.erase_node(node)
            asserts += 1
        elif _is_noop_cast(node) or (functional and _is_noop_slice(node)):
            slices += node.target is aten.slice.Tensor
            casts += node.target is not aten.slice.Tensor
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    inlined = _inline_grad_mode_regions(gm)
    if functional:
        grouped = _attend_grouped(graph)
        seen: dict = {}
        for node in list(graph.nodes):
            key = _cse_key(node)
            if key is None:
                continue
            if key in seen:
                node.replace_all_uses_with(seen[key])
                graph.erase_node(node)
                merged += 1
            else:
                seen[key] = node
    if inlined:
        gm.delete_all_unused_submodules()
    ctx.record(
        "simplify_inference",
        asserts=asserts,
        noop_casts=casts,
        noop_slices=slices,
        inlined_grad_mode_regions=inlined,
        merged=merged,
        grouped_attention=grouped,
    )
    return gm


def _repeated_heads(node) -> tuple[fx.Node, int] | None:
    """(kv [B, kv_heads, L, D], repeats) when `node` is transformers' `repeat_kv` of kv:
    reshape(expand(unsqueeze(kv, 2), [B, kv_heads, n, L, D]), [B, kv_heads * n, L, D]),
    which puts query head h on key/value head h // n, as `enable_gqa=True` does."""
    if not isinstance(node, fx.Node) or node.target not in (
        aten.reshape.default,
        aten.view.default,
    ):
        return None
    expand = node.args[0]
    if not isinstance(expand, fx.Node) or expand.target is not aten.expand.default:
        return None
    unsqueeze = expand.args[0]
    if not isinstance(unsqueeze, fx.Node) or unsqueeze.target is not aten.unsqueeze.default:
        return None
    kv = unsqueeze.args[0]
    if unsqueeze.args[1] != 2 or not isinstance(kv, fx.Node):
        return None
    vals = [n.meta.get("val") for n in (kv, expand, node)]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    source, expanded, out = (tuple(str(d) for d in v.shape) for v in vals)
    if len(source) != 4 or len(expanded) != 5 or len(out) != 4:
        return None
    repeats = vals[1].shape[2]
    if not isinstance(repeats, int) or not isinstance(vals[0].shape[1], int):
        return None
    same = expanded[:2] == source[:2] and expanded[3:] == source[2:]
    if not same or out != (source[0], str(vals[0].shape[1] * repeats), *source[2:]):
        return None
    return kv, repeats


def _attend_grouped(graph: fx.Graph) -> int:
    """Rewrite attention over repeated key/value heads into `enable_gqa=True` on the
    grouped tensors; returns how many attention calls changed."""
    count = 0
    for node in list(graph.nodes):
        if node.target is not aten.scaled_dot_product_attention.default:
            continue
        if node.kwargs.get("enable_gqa") or len(node.args) < 3:
            continue
        key, value = _repeated_heads(node.args[1]), _repeated_heads(node.args[2])
        if key is None or value is None or key[1] != value[1]:
            continue
        repeated = node.args[1:3]
        node.args = (node.args[0], key[0], value[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        count += 1
        # reshape -> expand -> unsqueeze, each erased once nothing reads it
        for reshape in dict.fromkeys(repeated):
            chain = [reshape, reshape.args[0], reshape.args[0].args[0]]
            for dead in chain:
                if not dead.users:
                    graph.erase_node(dead)
    return count


def _inline_grad_mode_regions(gm: fx.GraphModule) -> int:
    """Replace each `wrap_with_set_grad_enabled(flag, submodule, *inputs)` by the
    submodule's own nodes; returns how many were inlined."""
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or hop is None or node.target is not hop:
            continue
        sub_node, operands = node.args[1], node.args[2:]
        sub = getattr(gm, sub_node.target) if isinstance(sub_node, fx.Node) else None
        if not isinstance(sub, fx.GraphModule) or any(
            n.op in ("get_attr", "call_module") for n in sub.graph.nodes
        ):
            continue  # reads its own attributes: leave the region as it is
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if (
            node.kwargs
            or len(placeholders) != len(operands)
            or any(user.target is not operator.getitem for user in node.users)
        ):
            continue
        with gm.graph.inserting_before(node):
            outputs = gm.graph.graph_copy(sub.graph, dict(zip(placeholders, operands)))
        outputs = outputs if isinstance(outputs, list | tuple) else (outputs,)
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not sub_node.users:
            gm.graph.erase_node(sub_node)
        count += 1
    return count
