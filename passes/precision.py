"""Mixed precision (bf16/fp16) as explicit casts in the graph, autocast-style.

Matmul-like ops (linear, matmul, mm, bmm, addmm, baddbmm, convolutions, attention) get
their floating inputs cast to the low precision and produce low-precision outputs.
Numerically sensitive ops (softmax, log_softmax, normalizations, losses, exp/log, sums
and means) get low-precision inputs cast back to fp32. Every other op runs in whatever
its inputs promote to (bf16 + fp32 -> fp32), as under torch.autocast. Parameters stay
fp32 (the master weights): their casts are graph nodes, so gradients reach them in fp32.
The casts are `aten._to_copy` nodes marked meta['strato_created_by'] = 'mixed_precision'.

Export checks the dtypes it saw at capture with `_assert_tensor_metadata` nodes (before
every `.to(dtype)` / `.float()`, e.g. in Hugging Face losses and RMSNorms). Where an
asserted value is one this pass moved to low precision, the assert is re-targeted to the
dtype the value now has; asserts on anything the pass did not change stay as they were.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..compiler.context import CompileContext
from ..compiler.pass_manager import graph_pass
from .annotate import fill_fake_values

aten = torch.ops.aten

LOW_PRECISION_OPS = {
    aten.linear.default,
    aten.matmul.default,
    aten.mm.default,
    aten.bmm.default,
    aten.addmm.default,
    aten.baddbmm.default,
    aten.addbmm.default,
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.convolution.default,
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
    aten.scaled_dot_product_attention.default,
    aten.einsum.default,
}

FP32_OPS = {
    aten.softmax.int,
    aten._softmax.default,
    aten.log_softmax.int,
    aten._log_softmax.default,
    aten.layer_norm.default,
    aten.native_layer_norm.default,
    aten.group_norm.default,
    aten.batch_norm.default,
    aten.cross_entropy_loss.default,
    aten.nll_loss.default,
    aten.nll_loss_nd.default,
    aten.mse_loss.default,
    aten.l1_loss.default,
    aten.smooth_l1_loss.default,
    aten.binary_cross_entropy_with_logits.default,
    aten.kl_div.default,
    aten.exp.default,
    aten.log.default,
    aten.pow.Tensor_Scalar,
    aten.sum.default,
    aten.sum.dim_IntList,
    aten.mean.default,
    aten.mean.dim,
    aten.norm.Scalar,
    aten.linalg_vector_norm.default,
    aten.cumsum.default,
    aten.prod.default,
}
if hasattr(aten, "rms_norm"):
    FP32_OPS.add(aten.rms_norm.default)

# Ops whose output dtype is stated explicitly: never changed by promotion.
EXPLICIT_DTYPE_OPS = {
    aten._to_copy.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
}

LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _tensor_dtype(node: fx.Node) -> torch.dtype | None:
    """dtype of the node's tensor output (of its first tensor, for a tuple such as split's)."""
    val = node.meta.get("val")
    if isinstance(val, list | tuple):
        val = next((v for v in val if isinstance(v, torch.Tensor)), None)
    return val.dtype if isinstance(val, torch.Tensor) else None


@graph_pass(name="mixed_precision", requires="shapes", provides="mixed_precision")
def mixed_precision(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Cast matmul-like ops to bf16/fp16 and sensitive ops back to fp32 (casts are graph nodes)."""
    name = ctx.strategy.precision
    low = LOW_DTYPES[name]
    graph = gm.graph
    dtype_of: dict[fx.Node, torch.dtype | None] = {}
    casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
    low_nodes: list[str] = []

    def cast(arg: fx.Node, dtype: torch.dtype, before: fx.Node) -> fx.Node:
        if (arg, dtype) not in casts:
            with graph.inserting_before(before):
                node = graph.call_function(aten._to_copy.default, (arg,), {"dtype": dtype})
            node.meta.update(
                strato_created_by="mixed_precision",
                strato_module=before.meta.get("strato_module", ""),
            )
            dtype_of[node] = dtype
            casts[(arg, dtype)] = node
        return casts[(arg, dtype)]

    def recast_inputs(node: fx.Node, want: torch.dtype, only_from: set[torch.dtype]) -> None:
        def visit(a):
            if isinstance(a, fx.Node) and dtype_of.get(a) in only_from:
                return cast(a, want, node)
            return a

        node.args = fx.node.map_aggregate(node.args, visit)
        node.kwargs = fx.node.map_aggregate(node.kwargs, visit)

    for node in list(graph.nodes):
        original = _tensor_dtype(node)
        if node.op != "call_function" or node.meta.get("strato_created_by") == "mixed_precision":
            dtype_of.setdefault(node, original)
            continue
        if node.target in LOW_PRECISION_OPS:
            recast_inputs(node, low, {torch.float32})
            dtype_of[node] = low if original == torch.float32 else original
            node.meta["strato_precision"] = name
            low_nodes.append(node.name)
        elif node.target in FP32_OPS:
            recast_inputs(node, torch.float32, {low})
            dtype_of[node] = original
        elif (
            node.target in EXPLICIT_DTYPE_OPS or original is None or not original.is_floating_point
        ):
            dtype_of[node] = original
        else:  # promotion: low only when every floating tensor input became low
            inputs = [dtype_of.get(a) for a in node.all_input_nodes]
            floats = [d for d in inputs if d is not None and d.is_floating_point]
            dtype_of[node] = low if floats and all(d == low for d in floats) else original
    # Shapes are unchanged; dtypes changed: recompute every node's fake value.
    captured = {node: _tensor_dtype(node) for node in graph.nodes}
    for node in graph.nodes:
        if node.op == "call_function":
            node.meta.pop("val", None)
    graph.lint()
    gm.recompile()
    retargeted: list[str] = []

    def retarget_assert(node: fx.Node, values: dict) -> None:
        if node.target is not aten._assert_tensor_metadata.default:
            return
        source = node.args[0]
        asserted = node.args[3] if len(node.args) > 3 else node.kwargs.get("dtype")
        now = getattr(values.get(source), "dtype", None)
        if asserted is not None and now != asserted and captured.get(source) == asserted:
            if len(node.args) > 3:
                node.args = (*node.args[:3], now, *node.args[4:])
            else:
                node.kwargs = {**node.kwargs, "dtype": now}
            retargeted.append(node.name)

    fill_fake_values(gm, ctx, before_node=retarget_assert)
    gm.recompile()
    ctx.record(
        "mixed_precision",
        dtype=name,
        low_precision_nodes=low_nodes,
        casts=len(casts),
        retargeted_asserts=retargeted,
        loss_scaling=name == "fp16",
    )
    return gm
