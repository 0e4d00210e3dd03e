"""Remove nodes whose results nothing uses and that have no side effects."""

from __future__ import annotations

import torch.fx as fx

from ..compiler.context import CompileContext
from ..compiler.pass_manager import graph_pass


def has_side_effects(node: fx.Node) -> bool:
    """True for nodes that must stay even when unused (mutations, RNG, module calls)."""
    if node.op in ("placeholder", "output", "call_module"):
        return True
    if node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
        return node.is_impure()
    return False


@graph_pass(name="eliminate_dead_code", provides="dead_code_free")
def eliminate_dead_code(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Drop unused, side-effect-free nodes (a sweep from the output back to the inputs)."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not has_side_effects(node):
            gm.graph.erase_node(node)
            removed += 1
    gm.delete_all_unused_submodules()
    ctx.record("eliminate_dead_code", removed_nodes=removed)
    return gm
