"""Inference-graph cleanup: drop export's runtime asserts and no-op casts, inline grad-mode
regions, merge duplicates.

Export leaves `_assert_tensor_metadata` checks and `to(dtype)` calls that do nothing,
wraps code under `torch.no_grad()` (Hugging Face's rotary embeddings) in
`wrap_with_set_grad_enabled` submodules, and models recompute identical values (masks,
rotary tables) in every layer. In an inference graph, which never records autograd, a
grad-mode region is just its ops, and the rest is pure interpreter overhead, which
dominates small-batch decoding on a CPU. Inlining also lets such graphs be exported.
Training graphs are left as they are.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..compiler.context import CompileContext
from ..compiler.pass_manager import graph_pass

aten = torch.ops.aten

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
    asserts = casts = merged = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in RUNTIME_ASSERTS and not node.users:
            graph.erase_node(node)
            asserts += 1
        elif _is_noop_cast(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            casts += 1
    inlined = _inline_grad_mode_regions(gm)
    # Merging is only safe when nothing writes in place to a value two users would share.
    if not any(_mutates(n) for n in graph.nodes):
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
        inlined_grad_mode_regions=inlined,
        merged=merged,
    )
    return gm


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
