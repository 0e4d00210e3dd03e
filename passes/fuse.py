"""Operator fusion: replace groups of ATen ops with one generated kernel each.

Regions, claimed in this order so bigger patterns win:
1. attention      softmax(Q Kᵀ · scale + mask) · V -> strato::attention, or
                  strato::attention_packed when q, k, v are views of one qkv tensor
                  (hand-written kernels in kernels/attention.py)
2. cross_entropy  cross_entropy_loss, or log_softmax -> nll_loss
3. row            a norm or softmax over the last dim, with the elementwise ops feeding it
                  (e.g. residual add + LayerNorm); RMSNorm is fused even alone
4. pointwise      chains of elementwise ops (bias + GELU/SiLU, residual add, casts,
                  scaling, dropout) of two ops or more
Regions 2-4 become `strato::<kind>_<digest>` ops whose Triton source codegen/ renders from
the region's op list. A value computed inside a region that is also used outside (or is a
graph output) is returned by the fused op too, so nothing a later op or the backward needs
is lost; the fused ops carry their own autograd.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from ..codegen.region import TL_DTYPES, pointwise_kind, region_from_nodes, row_op_parts
from ..compiler.context import CompileContext
from ..compiler.pass_manager import graph_pass
from ..kernels import attention as attention_kernel
from ..kernels.fused import fused_op, fused_source, op_name

aten = torch.ops.aten


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _float_tensor(node) -> bool:
    val = _val(node)
    return val is not None and val.dtype in TL_DTYPES


def _shape(node) -> tuple[str, ...]:
    # Compared as text so symbolic sizes (a dynamic batch) compare without guards.
    return tuple(str(s) for s in _val(node).shape)


def _pointwise(node: fx.Node) -> bool:
    """An elementwise op on float tensors whose tensor operands are float FX nodes."""
    if node.op != "call_function" or not _float_tensor(node):
        return False
    if pointwise_kind(node.target, node.args, dict(node.kwargs)) is None:
        return False
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    return all(_float_tensor(a) for a in operands) and not any(
        isinstance(a, list | tuple) for a in node.args
    )


# Ops that only re-view their first argument (what `packed_qkv` looks through).
_VIEW_OPS = {
    aten.transpose.int,
    aten.view.default,
    aten.permute.default,
    aten.unsqueeze.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.unbind.int,
    aten.alias.default,
    operator.getitem,
}


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


class _Fuser:
    """Claims regions in one graph and rewrites each into a fused-op call."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.taken: set[fx.Node] = set()
        self.records: list[dict] = []

    # -------------------------------------------------------------- growing regions
    def grow(self, sink: fx.Node, seeds: list[fx.Node], shape: tuple[str, ...]) -> list[fx.Node]:
        """Pointwise producers of `seeds` that can join a region ending at `sink`.

        A producer joins when every user it has outside the region comes after `sink`
        (the fused op sits at the sink, so those users still see its value); one with
        such users is exported and must have the region's full `shape`.
        """
        members = {sink}
        stack = list(seeds)
        while stack:
            node = stack.pop()
            if node in members or node in self.taken or not _pointwise(node):
                continue
            outside = [u for u in node.users if u not in members]
            if any(self.order[u] < self.order[sink] for u in outside):
                continue
            if outside and _shape(node) != shape:
                continue
            members.add(node)
            stack.extend(a for a in node.args if isinstance(a, fx.Node))
        members.discard(sink)
        return sorted(members, key=self.order.__getitem__)

    def outputs(self, members: list[fx.Node]) -> list[fx.Node]:
        inside = set(members)
        return [n for n in members if any(u not in inside for u in n.users)]

    # -------------------------------------------------------------- rewriting
    def replace(self, members, outputs, op, args, record: dict) -> None:
        sink = members[-1]
        graph = self.gm.graph
        with graph.inserting_before(sink):
            fused = graph.call_function(op, args)
        fused.meta.update(
            {k: sink.meta[k] for k in ("nn_module_stack", "stack_trace") if k in sink.meta}
        )
        fused.meta["strato_module"] = sink.meta.get("strato_module", "")
        fused.meta["strato_fused"] = record
        vals = [n.meta.get("val") for n in outputs]
        if record["kind"] == "attention":  # one tensor out, not a list
            val = self.fake_run(op, args)
            fused.meta["val"] = val if val is not None else vals[0]
            sink.replace_all_uses_with(fused)
        else:
            fused.meta["val"] = vals
            for k, out in enumerate(outputs):
                with graph.inserting_after(fused):
                    item = graph.call_function(operator.getitem, (fused, k))
                item.meta.update(fused.meta)
                item.meta["val"] = vals[k]
                out.replace_all_uses_with(item)
        for node in reversed(members):
            if not node.users:
                graph.erase_node(node)
        self.taken.update(members)
        self.records.append(record)
        self.order = {n: i for i, n in enumerate(graph.nodes)}

    def fake_run(self, op, args):
        vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]
        mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        if mode is None:
            return None
        with mode:
            return op(*vals)

    def fuse_region(
        self, kind: str, members: list[fx.Node], row_op=None, column_inputs=None
    ) -> None:
        sink = members[-1]
        outputs = self.outputs(members)
        where = sink.meta.get("strato_module") or "<root>"
        region, inputs = region_from_nodes(
            kind, f"{where}:{sink.name}", members, outputs, row_op, column_inputs
        )
        op = fused_op(region)
        record = {
            "name": region.name,
            "kind": kind,
            "kernel": f"strato::{op_name(region)}",
            "nodes": [n.name for n in members],
            "inputs": [n.name for n in inputs],
            "outputs": [n.name for n in outputs],
            "source": fused_source(region),
        }
        self.replace(members, outputs, op, (list(inputs),), record)

    # -------------------------------------------------------------- patterns
    def attention(self, pv: fx.Node) -> None:
        """softmax(q @ kᵀ * scale [+ mask]) [dropout(p=0)] @ v, self-attention shapes."""
        if pv.target is not aten.matmul.default or pv in self.taken:
            return
        chain = [pv]
        probs, v = pv.args
        while isinstance(probs, fx.Node) and probs.target is aten.dropout.default:
            if pointwise_kind(probs.target, probs.args, dict(probs.kwargs)) != "identity":
                return
            chain.append(probs)
            probs = probs.args[0]
        if not isinstance(probs, fx.Node) or probs.target not in (
            aten.softmax.int,
            aten._softmax.default,
        ):
            return
        parts = row_op_parts(probs.target, probs.args, dict(probs.kwargs), ndim=4)
        if parts is None:
            return
        chain.append(probs)
        scores, mask, scale = probs.args[0], None, 1.0
        if isinstance(scores, fx.Node) and scores.target is aten.add.Tensor and not scores.kwargs:
            a, b = scores.args
            scaled, mask = (
                (a, b)
                if isinstance(a, fx.Node)
                and a.target in (aten.mul.Tensor, aten.div.Tensor, aten.matmul.default)
                else (b, a)
            )
            chain.append(scores)
            scores = scaled
        if isinstance(scores, fx.Node) and scores.target in (aten.mul.Tensor, aten.div.Tensor):
            x, c = scores.args
            if not isinstance(c, int | float) or scores.kwargs:
                return
            scale = float(c) if scores.target is aten.mul.Tensor else 1.0 / float(c)
            chain.append(scores)
            scores = x
        if not isinstance(scores, fx.Node) or scores.target is not aten.matmul.default:
            return
        chain.append(scores)
        q, kt = scores.args
        if not (isinstance(kt, fx.Node) and kt.target is aten.transpose.int):
            return
        if sorted(d % 4 for d in kt.args[1:3]) != [2, 3]:
            return
        k = kt.args[0]
        if any(n in self.taken for n in chain) or not all(_single_user(n) for n in chain[1:]):
            return
        if not all(_float_tensor(t) and _val(t).dim() == 4 for t in (q, k, v)):
            return
        qv, kv, vv = _val(q), _val(k), _val(v)
        if not (_shape(q) == _shape(k) == _shape(v) and qv.dtype == kv.dtype == vv.dtype):
            return
        t, d = qv.shape[2], qv.shape[3]
        if not (isinstance(t, int) and isinstance(d, int) and attention_kernel.fits(t, d)):
            return
        if mask is not None and not (
            _float_tensor(mask) and _val(mask).dtype == qv.dtype and not self.trainable(mask)
        ):
            return
        members = sorted(chain, key=self.order.__getitem__)
        packed = self.packed_qkv(q, k, v)
        if packed is not None:
            op, args = torch.ops.strato.attention_packed.default, (*packed, mask, scale)
        else:
            op, args = torch.ops.strato.attention.default, (q, k, v, mask, scale)
        record = {
            "name": f"{pv.meta.get('strato_module') or '<root>'}:{pv.name}",
            "kind": "attention",
            "kernel": str(op.name()),
            "nodes": [n.name for n in members],
            "inputs": [n.name for n in args if isinstance(n, fx.Node)],
            "outputs": [pv.name],
            "source": inspect.getsource(attention_kernel),
        }
        self.replace(members, [pv], op, args, record)

    def packed_qkv(self, q: fx.Node, k: fx.Node, v: fx.Node) -> tuple | None:
        """(qkv, layouts, heads, exact) when q, k, v are strided views of one contiguous
        tensor whose batch dim they share (a fused qkv projection split into heads)."""

        def base(node):
            while node.op == "call_function" and node.target in _VIEW_OPS:
                node = node.args[0]
            return node

        root = base(q)
        if base(k) is not root or base(v) is not root or not _float_tensor(root):
            return None
        rv, views = _val(root), [_val(n) for n in (q, k, v)]
        layouts = []
        for view in views:
            layout = [view.storage_offset(), *view.stride()]
            if not all(isinstance(x, int) for x in layout):
                return None
            layouts += layout
        if rv.dim() < 2 or not rv.is_contiguous() or rv.storage_offset() != 0:
            return None
        if _shape(q)[0] != str(rv.shape[0]) or views[0].stride(0) != rv.stride(0):
            return None
        if not (layouts[1:5] == layouts[6:10] == layouts[11:15]):
            return None  # the backward writes dq, dk, dv with one set of strides
        heads = list(views[0].shape[1:])
        per_batch = 1
        for size in rv.shape[1:]:
            per_batch *= size
        if not all(isinstance(x, int) for x in (*heads, per_batch)):
            return None
        exact = attention_kernel.covers_exactly(per_batch, layouts, heads)
        return root, layouts, heads, exact

    def trainable(self, node: fx.Node) -> bool:
        """Whether `node` reads a Parameter (through view ops): its gradient must flow."""
        while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
            node = node.args[0]
        if node.op == "get_attr":
            owner = self.gm
            for part in str(node.target).split("."):
                owner = getattr(owner, part)
            return isinstance(owner, torch.nn.Parameter)
        return node.op == "placeholder"

    def cross_entropy(self, node: fx.Node) -> None:
        """cross_entropy_loss(logits, targets), or nll_loss(log_softmax(logits, -1), targets)."""
        if node in self.taken:
            return
        names = ("input", "target", "weight", "reduction", "ignore_index", "label_smoothing")
        members = [node]
        if node.target is aten.cross_entropy_loss.default:
            bound = {**dict(zip(names, node.args)), **node.kwargs}
            if bound.get("label_smoothing", 0.0) != 0.0:
                return
        elif node.target in (aten.nll_loss_nd.default, aten.nll_loss.default):
            bound = {**dict(zip(names, node.args)), **node.kwargs}
            logp = bound["input"]
            if not (isinstance(logp, fx.Node) and _single_user(logp)):
                return
            parts = row_op_parts(logp.target, logp.args, dict(logp.kwargs), ndim=2)
            if parts is None or parts.kind != "log_softmax" or logp in self.taken:
                return
            members = [logp, node]
        else:
            return
        logits, target = (members[0].args[0], bound["target"])
        if bound.get("weight") is not None or bound.get("reduction", 1) not in (1, 2):
            return
        if not (_float_tensor(logits) and _val(logits).dim() == 2):
            return
        tval = _val(target)
        if tval is None or tval.dim() != 1 or tval.dtype not in (torch.int64, torch.int32):
            return
        # The template reads reduction and ignore_index positionally.
        node.args = (
            node.args[0],
            target,
            None,
            bound.get("reduction", 1),
            bound.get("ignore_index", -100),
        )
        node.kwargs = {}
        self.fuse_region("cross_entropy", members)

    def row(self, node: fx.Node) -> None:
        """A norm or softmax over the last dim, with its elementwise prologue."""
        if node in self.taken or node.op != "call_function" or not _float_tensor(node):
            return
        parts = row_op_parts(node.target, node.args, dict(node.kwargs), ndim=_val(node).dim())
        if parts is None or not _float_tensor(parts.input):
            return
        params = [p for p in (parts.weight, parts.bias) if p is not None]
        if not all(
            isinstance(p, fx.Node) and _float_tensor(p) and _val(p).dim() == 1 for p in params
        ):
            return
        prologue = self.grow(node, [parts.input], _shape(parts.input))
        if any(p in prologue or any(p in m.args for m in prologue) for p in params):
            return
        if not prologue and parts.kind != "rms_norm":
            return  # alone, a row op is already one launch: nothing to gain
        row_shape = _shape(parts.input)

        def is_column(n: fx.Node) -> bool:
            # A vector over the last dim (a bias): its gradient is a sum over rows.
            return len(row_shape) >= 2 and _val(n).dim() == 1 and _shape(n) == row_shape[-1:]

        self.fuse_region("row", prologue + [node], row_op=node, column_inputs=is_column)

    def pointwise(self, node: fx.Node) -> None:
        if node in self.taken or not _pointwise(node):
            return
        members = self.grow(node, [a for a in node.args if isinstance(a, fx.Node)], _shape(node))
        significant = [
            m
            for m in members + [node]
            if pointwise_kind(m.target, m.args, dict(m.kwargs)) != "identity"
        ]
        if len(significant) < 2:
            return
        self.fuse_region("pointwise", members + [node])


def _feeds_row_op(node: fx.Node, depth: int = 4) -> bool:
    """Whether `node` reaches a row op's input through a few elementwise ops."""
    for user in node.users:
        parts = row_op_parts(user.target, user.args, dict(user.kwargs), ndim=_val(node).dim())
        if parts is not None and parts.input is node:
            return True
        if depth and _pointwise(user) and _feeds_row_op(user, depth - 1):
            return True
    return False


def split_linear_bias(gm: fx.GraphModule) -> int:
    """Rewrite linear(x, W, b) as linear(x, W) + b where the sum feeds a row op, so the
    bias add (and its gradient, a sum over rows) joins the fused row kernel."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is not aten.linear.default or len(node.args) < 3 or node.kwargs:
            continue
        x, weight, bias = node.args
        if not (isinstance(bias, fx.Node) and _float_tensor(node) and _feeds_row_op(node)):
            continue
        with gm.graph.inserting_after(node):
            matmul = gm.graph.call_function(aten.linear.default, (x, weight))
        with gm.graph.inserting_after(matmul):
            add = gm.graph.call_function(aten.add.Tensor, (matmul, bias))
        matmul.meta.update(node.meta)
        add.meta.update(node.meta)
        node.replace_all_uses_with(add)
        gm.graph.erase_node(node)
        count += 1
    return count


@graph_pass(name="fuse", requires="shapes", provides="fused")
def fuse_operators(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Group elementwise chains, row reductions and attention into generated kernels."""
    split_linear_bias(gm)
    fuser = _Fuser(gm)
    for claim in (fuser.attention, fuser.cross_entropy, fuser.row):
        for node in list(gm.graph.nodes):
            if node.graph is gm.graph and node not in fuser.taken:
                claim(node)
    # Sinks last-first, so each chain is claimed whole from its end.
    for node in reversed(list(gm.graph.nodes)):
        if node not in fuser.taken:
            fuser.pointwise(node)
    # Views the fused ops no longer read (e.g. the q/k/v head splits of packed attention).
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "call_function" and node.target in _VIEW_OPS and not node.users:
            gm.graph.erase_node(node)
    ctx.record("fuse", regions=fuser.records)
    return gm
