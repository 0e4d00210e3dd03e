"""Give every node its output shape/dtype and owning module path in `meta`."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..compiler.capture import annotate_module_paths
from ..compiler.context import CompileContext
from ..compiler.errors import PassError
from ..compiler.pass_manager import graph_pass


class _FakePropagation(FakeTensorProp):
    """FakeTensorProp that also fakes parameters and buffers, so in-place ops in the graph
    (batch-norm statistics, counters) never touch the model's real tensors. `before_node`,
    when given, sees each node and the values computed so far before the node runs (a pass
    may adjust the node to what it now receives)."""

    def __init__(self, gm, mode=None, before_node=None):
        super().__init__(gm, mode=mode)
        self.before_node = before_node

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return self._mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    def run_node(self, node):
        if self.before_node is not None:
            self.before_node(node, self.env)
        try:
            return super().run_node(node)
        except Exception as exc:
            creator = node.meta.get("strato_created_by", "capture")
            made_by = "capture" if creator == "capture" else f"pass {creator!r}"
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise PassError(
                f"the compiled graph fails at node {node.name!r} ({node.format_node()}), "
                f"made by {made_by}: {type(exc).__name__}: {first_line}"
            ) from exc


def fill_fake_values(gm: fx.GraphModule, ctx: CompileContext, before_node=None) -> int:
    """Propagate fake tensors when some node lacks meta['val']; returns how many were missing.
    `before_node(node, values)` is called before each node runs (see _FakePropagation)."""
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
    leaves = _placeholder_values(gm, ctx)
    if missing and leaves is not None:
        _FakePropagation(gm, mode=fake_mode, before_node=before_node).propagate(*leaves)
    return missing


def check_graph_runs(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """Run the graph once on fake tensors (no compute, no RNG), so a graph a pass broke in
    a way lint cannot see fails at compile time, naming the node and the pass that made it."""
    leaves = _placeholder_values(gm, ctx)
    if leaves is None or ctx.capture_method != "export":
        return  # symbolic_trace graphs may hold opaque calls that branch on real values

    _FakePropagation(gm, mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*leaves)


def _placeholder_values(gm: fx.GraphModule, ctx: CompileContext) -> list | None:
    """The example inputs as the graph's placeholders take them, or None if they don't fit."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    leaves = _flat_examples(ctx)
    if len(leaves) != len(placeholders):
        leaves = [a for a in leaves if isinstance(a, torch.Tensor)]
    return leaves if len(leaves) == len(placeholders) else None


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
