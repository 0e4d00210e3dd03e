"""Lower quantized-linear ops to this CPU's kernels, for graphs inductor compiles.

Strato's quantized-linear ops keep a portable weight format (kernels/quantized_linear.py)
and pick a kernel on every call, in Python. When an eval graph runs under
`Strategy(inference_backend='inductor')` on CPU, this pass writes out the kernel the op
would pick, on the layout that kernel reads best:
- ops on a few input rows (decode graphs): Strato's CPU GEMV kernels (kernels/cpu_gemv.py)
  on codes in their blocked layout, `strato::cpu_gemv_int8/int4` (the layout doubles the
  bandwidth the kernels get from DRAM, since each block of rows is one stream);
- else the aten packed kernels: a cast to bf16, `_weight_int4pack_mm_for_cpu` on the
  packed int4 layout or `_weight_int8pack_mm`, a cast back, the bias. Inductor then sees
  plain aten ops, with no Python between them, and may use its own int8 weight-only GEMM.
Ops on many rows on CPUs without AVX-512 stay Strato ops: dequantize + fp32 BLAS beats the
packed kernels there. The new layouts replace the portable tensors on the graph module,
so a lowered graph belongs to this machine: export the 'fx' graph and lower where it is
served.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..compiler.context import CompileContext
from ..compiler.pass_manager import graph_pass
from ..kernels import cpu_gemv
from ..kernels import quantized_linear as ql
from .annotate import getattr_path

aten = torch.ops.aten
LOWERED_TARGETS = (
    aten._weight_int4pack_mm_for_cpu.default,
    aten._weight_int8pack_mm.default,
    ql.cpu_gemv_int8,
    ql.cpu_gemv_int4,
)
"""Ops only a lowered graph contains (export refuses them: their layouts are this CPU's)."""


@graph_pass(
    name="lower_quantized_linears", requires="quantized", provides="lowered_quantized_linears"
)
def lower_quantized_linears(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Rewrite int8/int4 quantized-linear ops into aten packed-kernel calls (CPU, inductor)."""
    if ctx.training or ctx.strategy.inference_backend != "inductor":
        return gm
    lowered: Counter[str] = Counter()
    kept: dict[str, str] = {}
    retired: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (
            ql.quant_linear_int8,
            ql.quant_linear_int4,
        ):
            continue
        kernel, reason = _lowering(gm, node)
        if kernel is None:
            kept[node.name] = reason
            continue
        scheme = "int4" if node.target is ql.quant_linear_int4 else "int8"
        with gm.graph.inserting_before(node):
            out = _LOWER[scheme, kernel](gm, node)
        lowered[scheme if kernel == "packed" else f"{scheme} {kernel}"] += 1
        out.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(out)
        retired.update(a.target for a in node.args[1:4] if isinstance(a, fx.Node))
        gm.graph.erase_node(node)
    _drop_unused_attrs(gm, retired)
    gm.graph.lint()
    gm.recompile()
    ctx.record("lower_quantized_linears", lowered=dict(lowered), kept=kept)
    return gm


def _lowering(gm: fx.GraphModule, node: fx.Node) -> tuple[str | None, str | None]:
    """The kernel `node` is lowered to ('gemv' or 'packed', None), or (None, why it stays
    a Strato op)."""
    x = node.args[0]
    qweight = getattr_path(gm, node.args[1].target)
    if ql._kernel(qweight) != "aten":
        return None, "not on CPU, or STRATO_KERNELS picks another kernel"
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None, "the input's shape is unknown"
    sizes = val.shape[:-1]
    rows = math.prod(int(d) for d in sizes) if all(map(is_concrete_int, sizes)) else None
    group_size = node.args[5] if node.target is ql.quant_linear_int4 else 32
    if rows is not None and ql.uses_cpu_gemv(rows, group_size):
        return "gemv", None
    if rows is not None and ql.dequantize_wins(rows):
        return None, f"{rows} input rows on a CPU without AVX-512: dequantize + fp32 BLAS is faster"
    if node.target is ql.quant_linear_int8:
        if node.args[3] is not None:
            return None, "asymmetric int8 (the packed kernel has no zero points)"
        if qweight.shape[1] % 16:
            return None, "in_features not a multiple of 16 (aten's int8 kernel misreads it)"
    return "packed", None


def _attr(gm: fx.GraphModule, name: str, make) -> fx.Node:
    """A get_attr of buffer `name` on gm, registered from make() on first use."""
    if not hasattr(gm, name):
        gm.register_buffer(name, make())
    return gm.graph.get_attr(name)


def _flat_bf16(gm: fx.GraphModule, x: fx.Node, k: int) -> fx.Node:
    flat = gm.graph.call_function(aten.reshape.default, (x, [-1, k]))
    return gm.graph.call_function(aten._to_copy.default, (flat,), {"dtype": torch.bfloat16})


def _finish(gm: fx.GraphModule, node: fx.Node, y: fx.Node, n: int) -> fx.Node:
    """Cast back to the input's dtype, add the bias, restore the leading dims."""
    x, bias = node.args[0], node.args[4]
    dtype = x.meta["val"].dtype
    if dtype != torch.bfloat16:
        y = gm.graph.call_function(aten._to_copy.default, (y,), {"dtype": dtype})
    if bias is not None:
        if getattr_path(gm, bias.target).dtype != dtype:
            bias = gm.graph.call_function(aten._to_copy.default, (bias,), {"dtype": dtype})
        y = gm.graph.call_function(aten.add.Tensor, (y, bias))
    leading = [
        int(size) if is_concrete_int(size) else gm.graph.call_function(aten.sym_size.int, (x, d))
        for d, size in enumerate(x.meta["val"].shape[:-1])
    ]
    return gm.graph.call_function(aten.reshape.default, (y, [*leading, n]))


def _lower_int4(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    x, qweight_node, scales_node, zeros_node, _, group_size, in_features = node.args
    qweight = getattr_path(gm, qweight_node.target)
    scales = getattr_path(gm, scales_node.target)
    zeros = getattr_path(gm, zeros_node.target) if zeros_node is not None else None
    weight, scale_zero = ql._cpu_int4_pack(qweight, scales, zeros, group_size)
    base = qweight_node.target.replace(".", "_")
    w = _attr(gm, f"{base}__cpu_int4pack", lambda: weight)
    sz = _attr(gm, f"{base}__cpu_scale_zero", lambda: scale_zero)
    xb = _flat_bf16(gm, x, in_features)
    kp = qweight.shape[1] * 2
    if kp != in_features:
        xb = gm.graph.call_function(aten.constant_pad_nd.default, (xb, [0, kp - in_features]))
    y = gm.graph.call_function(aten._weight_int4pack_mm_for_cpu.default, (xb, w, group_size, sz))
    n = qweight.shape[0]
    if weight.shape[0] != n:  # rows padded to 16
        y = gm.graph.call_function(aten.slice.Tensor, (y, 1, 0, n))
    return _finish(gm, node, y, n)


def _lower_int8(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    x, qweight_node, scales_node = node.args[:3]
    qweight = getattr_path(gm, qweight_node.target)
    scales = getattr_path(gm, scales_node.target)
    base = scales_node.target.replace(".", "_")
    s = _attr(gm, f"{base}__bf16", lambda: scales.to(torch.bfloat16))
    xb = _flat_bf16(gm, x, qweight.shape[1])
    y = gm.graph.call_function(aten._weight_int8pack_mm.default, (xb, qweight_node, s))
    return _finish(gm, node, y, qweight.shape[0])


def _lower_gemv(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The same op on this CPU's GEMV kernel, its codes in the kernel's blocked layout."""
    x, qweight_node, scales_node, zeros_node, bias = node.args[:5]
    qweight = getattr_path(gm, qweight_node.target)
    base = qweight_node.target.replace(".", "_")
    codes = _attr(gm, f"{base}__gemv_blocks", lambda: cpu_gemv.block_codes(qweight))
    if node.target is ql.quant_linear_int4:
        args = (x, codes, scales_node, zeros_node, bias, node.args[5])
        return gm.graph.call_function(ql.cpu_gemv_int4, args)
    return gm.graph.call_function(ql.cpu_gemv_int8, (x, codes, scales_node, zeros_node, bias))


_LOWER = {
    ("int4", "packed"): _lower_int4,
    ("int8", "packed"): _lower_int8,
    ("int4", "gemv"): _lower_gemv,
    ("int8", "gemv"): _lower_gemv,
}


def _drop_unused_attrs(gm: fx.GraphModule, targets: set[str]) -> None:
    """Erase get_attrs of the portable tensors nothing reads now, and the buffers too."""
    used = set()
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.target in targets and not node.users:
            gm.graph.erase_node(node)
        elif node.op == "get_attr":
            used.add(node.target)
    for target in targets - used:
        if "." not in target and target in gm._buffers:  # registered by the quantize pass
            del gm._buffers[target]
