"""Readable views of a graph: one line per node, and the diff a pass made."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.fx as fx

from .pass_manager import PassRecord


def describe_value(value) -> str:
    """'f32[s0, 128]' for a tensor, a tuple of those for tuples, '' when unknown."""
    if isinstance(value, torch.Tensor):
        dtype = _DTYPE_ABBR.get(value.dtype, str(value.dtype).replace("torch.", ""))
        dims = ", ".join(str(d) for d in value.shape)
        return f"{dtype}[{dims}]"
    if isinstance(value, list | tuple):
        return "(" + ", ".join(describe_value(v) for v in value) + ")"
    if value is None:
        return ""
    return type(value).__name__


_DTYPE_ABBR = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
}


def node_target(node: fx.Node) -> str:
    if node.op == "call_function":
        target = node.target
        name = getattr(target, "__name__", None) or str(target)
        overload = getattr(target, "_overloadpacket", None)
        if overload is not None:  # aten.linear.default -> aten.linear
            name = str(target).replace(".default", "")
        return name
    if node.op in ("call_module", "call_method", "get_attr"):
        return f"{node.op}:{node.target}"
    return node.op


def print_graph(gm: fx.GraphModule) -> str:
    """One row per node: name, op, output shape/dtype, owning module path."""
    rows = [("node", "op", "output", "module")]
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        rows.append(
            (
                node.name,
                node_target(node),
                describe_value(node.meta.get("val")),
                node.meta.get("strato_module", ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def diff(history: Sequence[PassRecord], pass_name: str) -> str:
    """Unified diff of the graph before and after the named pass."""
    for record in history:
        if record.name == pass_name:
            lines = difflib.unified_diff(
                record.graph_before.splitlines(),
                record.graph_after.splitlines(),
                fromfile=f"before {pass_name}",
                tofile=f"after {pass_name}",
                lineterm="",
            )
            text = "\n".join(lines)
            return text or f"pass {pass_name!r} changed nothing"
    ran = ", ".join(r.name for r in history) or "none"
    raise KeyError(f"no pass named {pass_name!r} ran in this compilation; passes that ran: {ran}")
