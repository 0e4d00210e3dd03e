"""Following a tensor-parallel split through the graph: which dimension of each value is
split, from the column-parallel linears' outputs (or sequence-parallel token shards) to
where the split ends (row-parallel inputs, block inputs, graph outputs).

`SplitPropagation` walks the nodes in order and knows, per op, where the split dimension
goes and what must change so the op runs on the local piece: a reshape into heads gets the
local head count, an expand of GQA KV heads the local KV count, a split of a fused qkv the
local part size; a symbolic batch size is divided in the graph. An op it cannot follow
raises `Unsupported` (the matcher then keeps that block whole). Used by
passes/tensor_parallel.py.
"""

from __future__ import annotations

import operator
import sys
from typing import Any

import sympy
import torch
import torch.fx as fx

from ..compiler.errors import StrategyError
from .annotate import getattr_path

VIEWS = {"view", "reshape", "_unsafe_view"}
CASTS = {"_to_copy", "to", "type_as", "contiguous", "clone", "alias", "detach", "lift_fresh_copy"}
UNARY = CASTS | {"dropout", "native_dropout", "gelu", "silu", "relu", "tanh", "sigmoid"}
SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}
REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std"}
SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"}
INPUT_PASSTHROUGH = {"select", "slice", "narrow", "transpose", "permute", "unsqueeze", "sym_size"}
"""Ops a split graph input passes through before meeting the column linears' values."""


class Unsupported(Exception):
    """The split cannot pass `node` (the block stays whole, or a planned one is refused)."""

    def __init__(self, node: fx.Node, reason: str) -> None:
        super().__init__(reason)
        self.node, self.reason = node, reason


def op_name(node: fx.Node) -> str:
    """aten op name without namespace and overload ('view'), or '' for other nodes."""
    if node.op != "call_function":
        return ""
    if node.target is operator.getitem:
        return "getitem"
    packet = getattr(node.target, "_overloadpacket", None)
    return getattr(packet, "__name__", "") if packet is not None else ""


def shape_of(node: Any) -> tuple:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def module_of(node: fx.Node) -> str:
    return node.meta.get("strato_module", "") or ""


def through_casts(node: Any) -> Any:
    while isinstance(node, fx.Node) and op_name(node) in CASTS and node.args:
        node = node.args[0]
    return node


def parameter_of(gm: fx.GraphModule, node: Any) -> torch.nn.Parameter | None:
    node = through_casts(node)
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = getattr_path(gm, node.target)
        if isinstance(value, torch.nn.Parameter):
            return value
    return None


def linear_of(gm: fx.GraphModule, node: fx.Node) -> dict | None:
    """A linear layer on a 2-D parameter: {'input', 'weight', 'bias', 'out_dim'} where
    out_dim is the weight dimension of the output features (0 for aten.linear, 1 for
    Conv1D's addmm), else None."""
    name = op_name(node)
    if name == "linear" and len(node.args) >= 2:
        weight = parameter_of(gm, node.args[1])
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if weight is not None and weight.ndim == 2:
            return {"input": node.args[0], "weight": weight, "bias": bias, "out_dim": 0}
    if name == "addmm" and len(node.args) >= 3 and not node.kwargs:
        weight = parameter_of(gm, node.args[2])
        if weight is not None and weight.ndim == 2 and parameter_of(gm, node.args[0]) is not None:
            return {"input": node.args[1], "weight": weight, "bias": node.args[0], "out_dim": 1}
    return None


# ---------------------------------------------------------------------- following the split


def _expr(size: Any):
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _group(in_shape: tuple, out_shape: tuple, dim: int) -> tuple[int, int, int, int]:
    """The reshape group holding input dim `dim`: input dims [a, b) become output [c, d)."""

    def prefixes(shape):
        out, acc = [sympy.Integer(1)], sympy.Integer(1)
        for s in shape:
            acc = sympy.expand(acc * _expr(s))
            out.append(acc)
        return out

    pin, pout = prefixes(in_shape), prefixes(out_shape)
    common = [
        (i, j) for i, x in enumerate(pin) for j, y in enumerate(pout) if sympy.expand(x - y) == 0
    ]
    a, c = max((i, j) for i, j in common if i <= dim)
    b, d = min((i, j) for i, j in common if i > dim and j > c)
    return a, b, c, d


class SplitPropagation:
    """Follows which dimension of each value is split, from the column linears' outputs
    to the row linears' inputs; with `apply`, rewrites the nodes on the way."""

    def __init__(self, gm, styles: dict[fx.Node, str], size: int, apply: bool) -> None:
        self.gm, self.styles, self.size, self.apply = gm, styles, size, apply
        self.split: dict[fx.Node, Any] = {}
        self.origin: dict[fx.Node, fx.Node] = {}
        self.segments: dict[fx.Node, int] = {}
        self.rewrites: list[tuple[fx.Node, str, Any]] = []
        self.cross_entropy: list[tuple[fx.Node, fx.Node]] = []
        self.outputs: list[tuple[fx.Node, int]] = []
        self.sinks: set[fx.Node] = set()
        """Nodes where a split ends without a rule (sequence parallelism: the block inputs)."""
        self.whole_uses: list[tuple[fx.Node, fx.Node]] = []
        """(node, whole value) where a whole floating value (a norm weight, position
        embeddings) meets split ones: its gradient from here is this rank's part only, so it
        is summed over the group in backward."""
        self.global_sizes: list[fx.Node] = []
        self.from_inputs: set[fx.Node] = set()
        """Values split only because a split graph input (`run(inputs=...)`) is."""
        self.stopped: list[fx.Node] = []
        """Nodes where a split input's values met no split ones and stayed whole."""

    def run(
        self, seeds: dict[fx.Node, int] | None = None, inputs: dict[fx.Node, int] | None = None
    ) -> None:
        """Follow the splits from the column linears, `seeds` (values split from the
        start) and `inputs`: graph inputs that arrive split (a KV cache of this rank's
        heads), which stay split only through selects and views until they meet the
        values the column linears split (a cache concatenated with the new keys)."""
        self.split.update(seeds or {})
        self.split.update(inputs or {})
        self.from_inputs.update(inputs or {})
        for node in self.gm.graph.nodes:
            if (seeds and node in seeds) or (inputs and node in inputs):
                continue
            style = self.styles.get(node)
            if style == "column":
                if any(a in self.split for a in node.all_input_nodes):
                    raise Unsupported(node, "its input is already split")
                self.split[node] = len(shape_of(node)) - 1
                self.origin[node] = node
                continue
            split_inputs = [a for a in node.all_input_nodes if a in self.split]
            if not split_inputs:
                continue
            if all(a in self.from_inputs for a in split_inputs):
                if op_name(node) in INPUT_PASSTHROUGH:
                    self._follow(node, split_inputs)
                    self.from_inputs.add(node)
                else:
                    self.stopped.append(node)
                continue
            if style == "row":
                x = linear_of(self.gm, node)["input"]
                if split_inputs != [x] or self.split[x] != len(shape_of(x)) - 1:
                    raise Unsupported(
                        node, "a row-parallel linear needs its input split along its features"
                    )
                continue
            if node.op == "output":
                for a in split_inputs:
                    self.outputs.append((a, self.split[a]))
                continue
            if node in self.sinks:
                continue
            for a in node.all_input_nodes:
                value = a.meta.get("val")
                if a not in self.split and isinstance(value, torch.Tensor):
                    if value.dtype.is_floating_point:
                        self.whole_uses.append((node, a))
            self._follow(node, split_inputs)

    def _dim(self, node, value) -> int:
        return value % max(len(shape_of(node)), 1)

    def _follow(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        name, x = op_name(node), node.args[0] if node.args else None
        d = self.split.get(x) if isinstance(x, fx.Node) else None
        origin = self.origin.get(inputs[0])
        self.origin[node] = origin
        if name == "cat":
            parts = node.args[0]
            dims = {self.split.get(p) for p in parts}
            along = self._dim(node, node.args[1] if len(node.args) > 1 else 0)
            if len(dims) != 1 or along in dims:
                raise Unsupported(node, "a concatenation of split and whole values")
            self.split[node] = dims.pop()
            return
        if name == "stack":
            parts = node.args[0]
            dims = {self.split.get(p) for p in parts}
            along = node.args[1] % (len(shape_of(node))) if len(node.args) > 1 else 0
            if len(dims) != 1 or not isinstance(d := next(iter(dims)), int):
                if not self.apply and None in dims:
                    return  # a trial of one block: the other blocks' parts are whole yet
                raise Unsupported(node, "a stack of split and whole values")
            self.split[node] = d + 1 if along <= d else d
            return
        if name == "sym_size":  # an int: the whole size, also along the split dimension
            if isinstance(d, int) and self._dim(x, node.args[1]) == d:
                self.global_sizes.append(node)
            return
        if name in REDUCTIONS and isinstance(d, int):
            dims = node.args[1] if len(node.args) > 1 else None
            dims = [dims] if isinstance(dims, int) else dims
            if not dims:
                raise Unsupported(node, "a reduction over every dimension")
            dims = [self._dim(x, v) for v in dims]
            keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            if d in dims:
                raise Unsupported(node, "a reduction over the split dimension")
            self.split[node] = d if keep else d - sum(v < d for v in dims)
            return
        if name in ("layer_norm", "native_layer_norm", "rms_norm") and isinstance(d, int):
            if d >= len(shape_of(x)) - len(node.args[1]):
                raise Unsupported(node, "a norm over the split dimension")
            self.split[node] = [d, d, d] if name == "native_layer_norm" else d
            return
        if name == "getitem":
            if isinstance(d, list):
                self.split[node] = d[node.args[1]]
                return
            raise Unsupported(node, "indexing into a split tensor")
        if name in VIEWS and isinstance(d, int):
            self.split[node] = self._reshape(node, d, origin)
        elif name == "expand" and isinstance(d, int):
            sizes = list(node.args[1])
            offset = len(sizes) - len(shape_of(x))
            if isinstance(sizes[d + offset], int) and sizes[d + offset] != -1:
                sizes[d + offset] //= self.size
                self.rewrites.append((node, "args", (x, sizes, *node.args[2:])))
            self.split[node] = d + offset
        elif name in ("transpose", "swapaxes") and isinstance(d, int):
            a, b = (self._dim(x, v) for v in node.args[1:3])
            self.split[node] = b if d == a else a if d == b else d
        elif name == "t" and isinstance(d, int):
            self.split[node] = 1 - d
        elif name == "permute" and isinstance(d, int):
            order = [self._dim(x, v) for v in node.args[1]]
            self.split[node] = order.index(d)
        elif name == "unsqueeze" and isinstance(d, int):
            u = node.args[1] % (len(shape_of(x)) + 1)
            self.split[node] = d + 1 if u <= d else d
        elif name in ("slice", "select", "narrow") and isinstance(d, int):
            along = self._dim(x, node.args[1] if len(node.args) > 1 else 0)
            whole = name == "slice" and node.args[2:] in ((), (0,), (0, sys.maxsize), (None, None))
            if along == d and not whole:
                raise Unsupported(node, "slicing along the split dimension")
            self.split[node] = d - 1 if name == "select" and along < d else d
        elif name in ("split", "split_with_sizes", "chunk") and isinstance(d, int):
            self._split(node, x, d, origin)
        elif name in SOFTMAX and isinstance(d, int):
            if self._dim(x, node.args[1]) == d:
                raise Unsupported(node, "a softmax over the split dimension")
            self.split[node] = d
        elif name in ("matmul", "bmm"):
            self._matmul(node)
        elif name in SDPA:
            q, k, v = node.args[:3]
            if not all(self.split.get(t) == 1 for t in (q, k, v)):
                raise Unsupported(node, "attention needs q, k and v split along heads")
            self.split[node] = [1] * 4 if name.startswith("_") else 1
        elif name == "native_dropout" and isinstance(d, int):
            self.split[node] = [d, d]
        elif name == "_assert_tensor_metadata":
            if len(node.args) > 1 and node.args[1] is not None:
                self.rewrites.append((node, "args", (x, None, *node.args[2:])))
        elif name == "cross_entropy_loss" and d == 1 and len(shape_of(x)) == 2:
            if node.args[1] in self.split:
                raise Unsupported(node, "split targets")
            self.cross_entropy.append((node, origin))
            self.split.pop(node, None)
        elif name in UNARY or self._pointwise(node):
            self.split[node] = self._broadcast(node, inputs)
        else:
            raise Unsupported(node, f"op {name or node.target} on a split value")

    def _pointwise(self, node: fx.Node) -> bool:
        return torch.Tag.pointwise in getattr(node.target, "tags", ())

    def _broadcast(self, node: fx.Node, inputs: list[fx.Node]) -> int:
        out = len(shape_of(node))
        dims = {self.split[a] + out - len(shape_of(a)) for a in inputs}
        if len(dims) != 1 or any(isinstance(self.split[a], list) for a in inputs):
            raise Unsupported(node, "operands split along different dimensions")
        (d,) = dims
        for a in node.all_input_nodes:
            if a in self.split or not isinstance(a.meta.get("val"), torch.Tensor):
                continue
            shape = shape_of(a)
            k = d - (out - len(shape))
            if k >= 0 and shape[k] != 1:
                raise Unsupported(
                    node, f"a whole operand {a.name} of shape {list(shape)} meets a split one"
                )
        return d

    def _matmul(self, node: fx.Node) -> None:
        a, b = node.args[:2]
        da, db = self.split.get(a), self.split.get(b)
        na, nb = len(shape_of(a)), len(shape_of(b))
        if da is None or db is None or na != nb or da != db or da >= na - 2:
            raise Unsupported(node, "a matmul that is not batched over the split dimension")
        self.split[node] = da

    def _reshape(self, node: fx.Node, d: int, origin: fx.Node) -> int:
        x = node.args[0]
        ins, outs = shape_of(x), shape_of(node)
        a, b, c, e = _group(ins, outs, d)
        if any(ins[i] != 1 for i in range(a, d)):
            raise Unsupported(node, "a reshape that interleaves the split dimension")
        target = next((j for j in range(c, e) if outs[j] != 1), c)
        size = outs[target]
        if isinstance(size, int) and size % self.size:
            what = (
                "attention heads"
                if len(outs) > len(ins) and target == len(outs) - 2
                else "features"
            )
            raise StrategyError(
                f"tensor_parallel: {module_of(origin) or module_of(node)}: {size} {what} (node "
                f"{node.name}, shape {list(outs)}) do not divide over TensorParallel.size="
                f"{self.size}; choose a size that divides {size}, or keep the module whole "
                "with plan={'<module glob>': 'replicate'}."
            )
        shape = list(node.args[1])
        if isinstance(shape[target], int) and shape[target] != -1:
            shape[target] //= self.size
            self.rewrites.append((node, "args", (x, shape)))
        elif isinstance(shape[target], fx.Node):  # a symbolic size (batch): divide it in the graph
            self.rewrites.append((node, "divide", target))
        return target

    def _split(self, node: fx.Node, x: fx.Node, d: int, origin: fx.Node) -> None:
        along = self._dim(x, node.args[2] if len(node.args) > 2 else 0)
        name = op_name(node)
        parts = shape_of(x)[along]
        if along != d:
            count = len(node.meta["val"])
            self.split[node] = [d] * count
            return
        if name == "split_with_sizes":
            sizes = list(node.args[1])
            if len(set(sizes)) != 1:
                raise Unsupported(node, f"a fused projection with unequal parts {sizes}")
            count = len(sizes)
            new = [s // self.size for s in sizes]
        elif name == "split":
            count = parts // node.args[1]
            new = node.args[1] // self.size
        else:
            count = node.args[1]
            new = count
        if self.segments.get(origin, count) != count:
            raise Unsupported(node, "a fused projection split twice")
        self.segments[origin] = count
        if (parts // count) % self.size:
            raise StrategyError(
                f"tensor_parallel: {module_of(origin)}: its {count} fused parts of {parts // count} "
                f"features do not divide over TensorParallel.size={self.size}."
            )
        if name != "chunk":
            self.rewrites.append((node, "args", (x, new, *node.args[2:])))
        self.split[node] = [d] * count

    def commit(self) -> None:
        graph = self.gm.graph
        for node, kind, value in self.rewrites:
            if kind == "args":
                node.args = tuple(value)
                continue
            shape = list(node.args[1])
            with graph.inserting_before(node):
                shape[value] = graph.call_function(operator.floordiv, (shape[value], self.size))
            node.args = (node.args[0], shape, *node.args[2:])
        for node in self.global_sizes:  # the size of a split dimension: the whole one
            with graph.inserting_after(node):
                whole = graph.call_function(operator.mul, (node, self.size))
            node.replace_all_uses_with(whole, delete_user_cb=lambda u, keep=whole: u is not keep)
