"""Graph inputs and outputs that stay split under tensor parallelism.

A model may declare inputs that arrive holding only this rank's part and outputs that
leave so, as `tensor_parallel_inputs = {placeholder name: split dim}` and
`tensor_parallel_outputs = {output index: split dim}` on the compiled module (the
KV-cache step, runtime/kv_cache.py: caches of this rank's KV heads). The tensor_parallel
pass follows them as split from the start (`SplitPropagation.run(inputs=...)`), leaves
those outputs ungathered, shows export's input guards whole-shaped stand-ins, and cuts the
example inputs the later passes propagate shapes from to this rank's part.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..compiler.context import CompileContext
from ..compiler.errors import StrategyError
from ..runtime import tensor_parallel as tp_runtime
from .tensor_parallel_split import SplitPropagation


def split_inputs(gm: fx.GraphModule, ctx: CompileContext) -> dict[fx.Node, int]:
    """The placeholders the compiled module declares as arriving split, with their dim."""
    declared = getattr(ctx.model, "tensor_parallel_inputs", None) or {}
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    return {placeholders[name]: dim for name, dim in declared.items() if name in placeholders}


def kept_outputs(gm: fx.GraphModule, ctx: CompileContext) -> dict[fx.Node, int]:
    """The output values the compiled module declares as leaving split, with their dim."""
    declared = getattr(ctx.model, "tensor_parallel_outputs", None) or {}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = pytree.tree_leaves(output.args[0])
    return {
        leaves[i]: dim
        for i, dim in declared.items()
        if i < len(leaves) and isinstance(leaves[i], fx.Node)
    }


def finish_split_inputs(
    gm: fx.GraphModule,
    ctx: CompileContext,
    propagation: SplitPropagation,
    inputs: dict[fx.Node, int],
    key: str,
    skipped: list[dict[str, str]],
) -> None:
    """After the applied propagation: every use of a split input met split values (else
    refuse, naming the node), guards see whole-shaped stand-ins, and the example inputs
    hold this rank's part."""
    graph = gm.graph
    group = tp_runtime.group_of(key)
    for node in propagation.stopped:
        if node.op == "call_module" and "guards" in str(node.target):
            for value, dim in inputs.items():
                if value in node.all_input_nodes:
                    with graph.inserting_before(node):
                        stand_in = graph.call_function(
                            tp_runtime.tp_whole_stand_in, (value, dim, key)
                        )
                    stand_in.meta["strato_tp"] = {"op": "stand_in", "mesh_dim": "tensor"}
                    node.replace_input_with(value, stand_in)
            continue
        names = ", ".join(n.name for n in inputs)
        kept = "; ".join(f"{s['module']} kept whole at {s['node']}: {s['reason']}" for s in skipped)
        raise StrategyError(
            f"tensor_parallel: {type(ctx.model).__name__} declares its inputs {names} split "
            f"over the tensor group, but node {node.name} ({node.format_node()}) uses them "
            "with values that are not split (an attention block the pass kept whole"
            f"{': ' + kept if kept else '?'}); compile without tensor_parallel, or plan the "
            "block's projections."
        )
    leaves, spec = pytree.tree_flatten((ctx.example_args, ctx.example_kwargs))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    positions = list(range(len(leaves)))
    if len(leaves) != len(placeholders):
        positions = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor)]
    for node, dim in inputs.items():
        i = positions[placeholders.index(node)]
        leaves[i] = leaves[i].chunk(group.size, dim)[group.rank].clone()
        node.meta.pop("val", None)
    ctx.example_args, ctx.example_kwargs = pytree.tree_unflatten(leaves, spec)


def check_kept_output(value: fx.Node, dim: int, kept: dict[fx.Node, int]) -> bool:
    """Whether split output `value` stays split (declared so); refuse another dim."""
    if value not in kept:
        return False
    if kept[value] != dim:
        raise StrategyError(
            f"tensor_parallel: output {value.name} is split along dim {dim}, but the module "
            f"declares it split along dim {kept[value]}."
        )
    return True
