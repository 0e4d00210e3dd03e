"""Give every node its output shape/dtype and owning module path in `meta`."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..compiler.capture import annotate_module_paths
from ..compiler.context import CompileContext
from ..compiler.pass_manager import graph_pass


def fill_fake_values(gm: fx.GraphModule, ctx: CompileContext) -> int:
    """Propagate fake tensors when some node lacks meta['val']; returns how many were missing."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and "val" not in node.meta:
            value = getattr_path(gm, node.target)
            if isinstance(value, torch.Tensor):
                node.meta["val"] = fake_mode.from_tensor(value)
    missing = sum(
        1
        for n in gm.graph.nodes
        if n.op in ("placeholder", "call_function") and "val" not in n.meta
    )
    if missing:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        leaves = _flat_examples(ctx)
        if len(leaves) != len(placeholders):
            leaves = [a for a in leaves if isinstance(a, torch.Tensor)]
        if len(leaves) == len(placeholders):
            FakeTensorProp(gm, mode=fake_mode).propagate(*leaves)
    return missing


def getattr_path(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _flat_examples(ctx: CompileContext) -> list:
    from torch.utils import _pytree as pytree

    leaves, _ = pytree.tree_flatten((ctx.example_args, ctx.example_kwargs))
    return leaves


@graph_pass(name="annotate_metadata", provides="shapes")
def annotate_metadata(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Record shape/dtype (`meta['val']`) and owning module (`meta['strato_module']`) on every node."""
    missing = fill_fake_values(gm, ctx)
    annotate_module_paths(gm)
    ctx.record("annotate_metadata", filled_nodes=missing)
    return gm
