"""Tensor parallelism (Megatron-style) over the mesh's `tensor` dimension.

The pass finds, per module, the linears whose outputs feed another linear of the same
module through head reshapes, attention, activations and elementwise ops (attention:
q/k/v -> heads -> output projection; MLP: up/gate -> activation -> down), and splits
them: the feeding ones *column*-parallel (output features: heads, MLP width), the fed one
*row*-parallel (input features); its partial results are summed by one all-reduce in
forward (`tp_reduce`), and the block's input gradient by one in backward (`tp_copy`).
Between the two every value is split along one dimension, which the pass follows node by
node (`_Propagation`): a reshape into heads gets the local head count, an expand of GQA
KV heads the local KV count, a split of a fused qkv the local part size (the fused weight
is then cut per part). With `vocab_parallel`, the token embedding is split by rows
(`vocab_parallel_embedding`) and the LM head by output classes; a cross-entropy on the
split logits becomes `vocab_parallel_cross_entropy`, and split logits leaving the graph
are all-gathered. `TensorParallel.plan` adds or overrides styles by module glob.

Each split parameter keeps its Parameter object, now holding this rank's block; the block
is registered as layout steps (`box`, with `view`s around it for fused weights), so
checkpoints, `full_state_dict()` and resharding work across tensor-parallel sizes.
Decisions go to ctx.records['tensor_parallel'] and node.meta['strato_tp'].
"""

from __future__ import annotations

import difflib
import fnmatch
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx

from ..compiler.context import CompileContext
from ..compiler.errors import StrategyError
from ..compiler.layout import register_step, state_names
from ..compiler.pass_manager import graph_pass
from ..runtime import tensor_parallel as tp_runtime
from .annotate import fill_fake_values, getattr_path

aten = torch.ops.aten
TENSOR = "tensor"

VIEWS = {"view", "reshape", "_unsafe_view"}
CASTS = {"_to_copy", "to", "type_as", "contiguous", "clone", "alias", "detach", "lift_fresh_copy"}
UNARY = CASTS | {"dropout", "native_dropout", "gelu", "silu", "relu", "tanh", "sigmoid"}
SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}
SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"}


class _Unsupported(Exception):
    """The split cannot pass `node` (the block stays whole, or a planned one is refused)."""

    def __init__(self, node: fx.Node, reason: str) -> None:
        super().__init__(reason)
        self.node, self.reason = node, reason


def _op(node: fx.Node) -> str:
    """aten op name without namespace and overload ('view'), or '' for other nodes."""
    if node.op != "call_function":
        return ""
    if node.target is operator.getitem:
        return "getitem"
    packet = getattr(node.target, "_overloadpacket", None)
    return getattr(packet, "__name__", "") if packet is not None else ""


def _shape(node: Any) -> tuple:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _module(node: fx.Node) -> str:
    return node.meta.get("strato_module", "") or ""


def _through_casts(node: Any) -> Any:
    while isinstance(node, fx.Node) and _op(node) in CASTS and node.args:
        node = node.args[0]
    return node


# ---------------------------------------------------------------------- finding layers


def _parameter(gm: fx.GraphModule, node: Any) -> torch.nn.Parameter | None:
    node = _through_casts(node)
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = getattr_path(gm, node.target)
        if isinstance(value, torch.nn.Parameter):
            return value
    return None


def _linear(gm: fx.GraphModule, node: fx.Node) -> dict | None:
    """A linear layer on a 2-D parameter: {'input', 'weight', 'bias', 'out_dim'} where
    out_dim is the weight dimension of the output features (0 for aten.linear, 1 for
    Conv1D's addmm), else None."""
    name = _op(node)
    if name == "linear" and len(node.args) >= 2:
        weight = _parameter(gm, node.args[1])
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if weight is not None and weight.ndim == 2:
            return {"input": node.args[0], "weight": weight, "bias": bias, "out_dim": 0}
    if name == "addmm" and len(node.args) >= 3 and not node.kwargs:
        weight = _parameter(gm, node.args[2])
        if weight is not None and weight.ndim == 2 and _parameter(gm, node.args[0]) is not None:
            return {"input": node.args[1], "weight": weight, "bias": node.args[0], "out_dim": 1}
    return None


def _is_token_embedding(gm: fx.GraphModule, node: fx.Node) -> bool:
    if _op(node) != "embedding" or _parameter(gm, node.args[0]) is None:
        return False
    ids = node.args[1]
    while isinstance(ids, fx.Node) and _op(ids) in VIEWS | CASTS:
        ids = ids.args[0]
    return isinstance(ids, fx.Node) and ids.op == "placeholder"


def _within(module: str, parent: str) -> bool:
    return module == parent or module.startswith(parent + ".")


def _linear_module(gm: fx.GraphModule, node: fx.Node, names: dict[int, str]) -> str:
    return _module(node) or names[id(_linear(gm, node)["weight"])].rpartition(".")[0]


def _match_blocks(gm, linears: dict[fx.Node, str]) -> list[tuple[str, list, fx.Node]]:
    """(parent module, column linears, row linear) for each module whose last linear is fed
    only through that module's own ops by its other linears."""
    by_parent: dict[str, list[fx.Node]] = {}
    for node, module in linears.items():
        by_parent.setdefault(module.rpartition(".")[0], []).append(node)
    blocks = []
    for parent, group in by_parent.items():
        if not parent:
            continue
        members = set(group)
        feeders: dict[fx.Node, list[fx.Node]] = {}
        for row in group:
            found, seen, stack = [], set(), [_linear(gm, row)["input"]]
            while stack:
                node = stack.pop()
                if not isinstance(node, fx.Node) or node in seen:
                    continue
                seen.add(node)
                if node in members:
                    found.append(node)
                elif node.op == "call_function" and _within(_module(node), parent):
                    stack.extend(node.all_input_nodes)
            if found:
                feeders[row] = sorted(found, key=lambda n: list(gm.graph.nodes).index(n))
        columns = {c for cs in feeders.values() for c in cs}
        if len(feeders) == 1 and not columns & set(feeders):
            ((row, cols),) = feeders.items()
            blocks.append((parent, cols, row))
    return blocks


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


class _Propagation:
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

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            style = self.styles.get(node)
            if style == "column":
                if any(a in self.split for a in node.all_input_nodes):
                    raise _Unsupported(node, "its input is already split")
                self.split[node] = len(_shape(node)) - 1
                self.origin[node] = node
                continue
            split_inputs = [a for a in node.all_input_nodes if a in self.split]
            if not split_inputs:
                continue
            if style == "row":
                x = _linear(self.gm, node)["input"]
                if split_inputs != [x] or self.split[x] != len(_shape(x)) - 1:
                    raise _Unsupported(
                        node, "a row-parallel linear needs its input split along its features"
                    )
                continue
            if node.op == "output":
                for a in split_inputs:
                    self.outputs.append((a, self.split[a]))
                continue
            self._follow(node, split_inputs)

    def _dim(self, node, value) -> int:
        return value % max(len(_shape(node)), 1)

    def _follow(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        name, x = _op(node), node.args[0] if node.args else None
        d = self.split.get(x) if isinstance(x, fx.Node) else None
        origin = self.origin.get(inputs[0])
        self.origin[node] = origin
        if name == "cat":
            parts = node.args[0]
            dims = {self.split.get(p) for p in parts}
            along = self._dim(node, node.args[1] if len(node.args) > 1 else 0)
            if len(dims) != 1 or along in dims:
                raise _Unsupported(node, "a concatenation of split and whole values")
            self.split[node] = dims.pop()
            return
        if name == "sym_size":  # an int: whole unless it is the split dimension's size
            if isinstance(d, int) and self._dim(x, node.args[1]) == d:
                raise _Unsupported(node, "reading the size of the split dimension")
            return
        if name == "getitem":
            if isinstance(d, list):
                self.split[node] = d[node.args[1]]
                return
            raise _Unsupported(node, "indexing into a split tensor")
        if name in VIEWS and isinstance(d, int):
            self.split[node] = self._reshape(node, d, origin)
        elif name == "expand" and isinstance(d, int):
            sizes = list(node.args[1])
            offset = len(sizes) - len(_shape(x))
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
            u = node.args[1] % (len(_shape(x)) + 1)
            self.split[node] = d + 1 if u <= d else d
        elif name in ("slice", "select", "narrow") and isinstance(d, int):
            along = self._dim(x, node.args[1] if len(node.args) > 1 else 0)
            if along == d:
                raise _Unsupported(node, "slicing along the split dimension")
            self.split[node] = d - 1 if name == "select" and along < d else d
        elif name in ("split", "split_with_sizes", "chunk") and isinstance(d, int):
            self._split(node, x, d, origin)
        elif name in SOFTMAX and isinstance(d, int):
            if self._dim(x, node.args[1]) == d:
                raise _Unsupported(node, "a softmax over the split dimension")
            self.split[node] = d
        elif name in ("matmul", "bmm"):
            self._matmul(node)
        elif name in SDPA:
            q, k, v = node.args[:3]
            if not all(self.split.get(t) == 1 for t in (q, k, v)):
                raise _Unsupported(node, "attention needs q, k and v split along heads")
            self.split[node] = [1] * 4 if name.startswith("_") else 1
        elif name == "native_dropout" and isinstance(d, int):
            self.split[node] = [d, d]
        elif name == "_assert_tensor_metadata":
            if len(node.args) > 1 and node.args[1] is not None:
                self.rewrites.append((node, "args", (x, None, *node.args[2:])))
        elif name == "cross_entropy_loss" and d == 1 and len(_shape(x)) == 2:
            if node.args[1] in self.split:
                raise _Unsupported(node, "split targets")
            self.cross_entropy.append((node, origin))
            self.split.pop(node, None)
        elif name in UNARY or self._pointwise(node):
            self.split[node] = self._broadcast(node, inputs)
        else:
            raise _Unsupported(node, f"op {name or node.target} on a split value")

    def _pointwise(self, node: fx.Node) -> bool:
        return torch.Tag.pointwise in getattr(node.target, "tags", ())

    def _broadcast(self, node: fx.Node, inputs: list[fx.Node]) -> int:
        out = len(_shape(node))
        dims = {self.split[a] + out - len(_shape(a)) for a in inputs}
        if len(dims) != 1 or any(isinstance(self.split[a], list) for a in inputs):
            raise _Unsupported(node, "operands split along different dimensions")
        (d,) = dims
        for a in node.all_input_nodes:
            if a in self.split or not isinstance(a.meta.get("val"), torch.Tensor):
                continue
            shape = _shape(a)
            k = d - (out - len(shape))
            if k >= 0 and shape[k] != 1:
                raise _Unsupported(
                    node, f"a whole operand {a.name} of shape {list(shape)} meets a split one"
                )
        return d

    def _matmul(self, node: fx.Node) -> None:
        a, b = node.args[:2]
        da, db = self.split.get(a), self.split.get(b)
        na, nb = len(_shape(a)), len(_shape(b))
        if da is None or db is None or na != nb or da != db or da >= na - 2:
            raise _Unsupported(node, "a matmul that is not batched over the split dimension")
        self.split[node] = da

    def _reshape(self, node: fx.Node, d: int, origin: fx.Node) -> int:
        x = node.args[0]
        ins, outs = _shape(x), _shape(node)
        a, b, c, e = _group(ins, outs, d)
        if any(ins[i] != 1 for i in range(a, d)):
            raise _Unsupported(node, "a reshape that interleaves the split dimension")
        target = next((j for j in range(c, e) if outs[j] != 1), c)
        size = outs[target]
        if isinstance(size, int) and size % self.size:
            what = (
                "attention heads"
                if len(outs) > len(ins) and target == len(outs) - 2
                else "features"
            )
            raise StrategyError(
                f"tensor_parallel: {_module(origin) or _module(node)}: {size} {what} (node "
                f"{node.name}, shape {list(outs)}) do not divide over TensorParallel.size="
                f"{self.size}; choose a size that divides {size}, or keep the module whole "
                "with plan={'<module glob>': 'replicate'}."
            )
        shape = list(node.args[1])
        if isinstance(shape[target], int) and shape[target] != -1:
            shape[target] //= self.size
            self.rewrites.append((node, "args", (x, shape)))
        elif isinstance(shape[target], fx.Node):
            raise _Unsupported(node, "a symbolic size on the split dimension")
        return target

    def _split(self, node: fx.Node, x: fx.Node, d: int, origin: fx.Node) -> None:
        along = self._dim(x, node.args[2] if len(node.args) > 2 else 0)
        name = _op(node)
        parts = _shape(x)[along]
        if along != d:
            count = len(node.meta["val"])
            self.split[node] = [d] * count
            return
        if name == "split_with_sizes":
            sizes = list(node.args[1])
            if len(set(sizes)) != 1:
                raise _Unsupported(node, f"a fused projection with unequal parts {sizes}")
            count = len(sizes)
            new = [s // self.size for s in sizes]
        elif name == "split":
            count = parts // node.args[1]
            new = node.args[1] // self.size
        else:
            count = node.args[1]
            new = count
        if self.segments.get(origin, count) != count:
            raise _Unsupported(node, "a fused projection split twice")
        self.segments[origin] = count
        if (parts // count) % self.size:
            raise StrategyError(
                f"tensor_parallel: {_module(origin)}: its {count} fused parts of {parts // count} "
                f"features do not divide over TensorParallel.size={self.size}."
            )
        if name != "chunk":
            self.rewrites.append((node, "args", (x, new, *node.args[2:])))
        self.split[node] = [d] * count

    def commit(self) -> None:
        for node, _, args in self.rewrites:
            node.args = tuple(args)


# ---------------------------------------------------------------------- the pass


def _near(glob: str, names: list[str]) -> str:
    close = difflib.get_close_matches(glob, names, n=3, cutoff=0.5)
    if close:
        return f" Near matches: {', '.join(close)}."
    more = "..." if len(names) > 8 else ""
    return f" Modules with linears or embeddings: {', '.join(names[:8])}{more}."


@graph_pass(
    name="tensor_parallel",
    requires="shapes",
    provides="tensor_parallel",
    after=("mixed_precision",),
    before=("zero1", "zero2", "zero3", "data_parallel", "recompute", "fuse", "quantize"),
)
def tensor_parallel(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Split attention heads, MLP features and the vocabulary over the mesh's `tensor`
    dimension (column-parallel in, row-parallel out), rewriting head counts to local ones."""
    config = ctx.strategy.tensor_parallel
    size = ctx.mesh.size(TENSOR)
    if config.sequence_parallel:
        raise StrategyError(
            "TensorParallel.sequence_parallel: not implemented yet in this build; use "
            "sequence_parallel=False (the Megatron all-reduce layout)."
        )
    group = ctx.mesh.group(TENSOR)
    key = tp_runtime.register_group(group)
    names = {id(t): n for n, t, _ in reversed(list(state_names(ctx.model)))}
    linears = {n: "" for n in gm.graph.nodes if _linear(gm, n) is not None}
    for node in linears:
        linears[node] = _linear_module(gm, node, names)
    embeddings = [n for n in gm.graph.nodes if _is_token_embedding(gm, n)]
    modules = {**{m: n for n, m in linears.items()}}
    modules.update(
        {
            _module(n) or names[id(_parameter(gm, n.args[0]))].rpartition(".")[0]: n
            for n in embeddings
        }
    )

    styles: dict[fx.Node, str] = {}
    skipped: list[dict[str, str]] = []
    blocks = []
    for parent, columns, row in _match_blocks(gm, linears):
        trial = {**{c: "column" for c in columns}, row: "row"}
        try:
            _Propagation(gm, trial, size, apply=False).run()
        except _Unsupported as exc:
            skipped.append({"module": parent, "node": exc.node.name, "reason": exc.reason})
            continue
        styles.update(trial)
        blocks.append(parent)
    vocab_rows = {_parameter(gm, e.args[0]).shape[0] for e in embeddings}
    if config.vocab_parallel:
        for node, module in linears.items():
            lin = _linear(gm, node)
            rows = lin["weight"].shape[lin["out_dim"]]
            if node not in styles and rows in vocab_rows:
                trial = {**styles, node: "column"}
                try:
                    _Propagation(gm, trial, size, apply=False).run()
                except _Unsupported as exc:
                    skipped.append({"module": module, "node": exc.node.name, "reason": exc.reason})
                    continue
                styles[node] = "column"
        for emb in embeddings:
            styles[emb] = "vocab"
    planned = {}
    for glob, style in config.plan:
        hits = [m for m in modules if fnmatch.fnmatchcase(m, glob)]
        if not hits:
            raise StrategyError(
                f"TensorParallel.plan: {glob!r} matches no module with a linear or embedding."
                + _near(glob, sorted(modules))
            )
        for m in hits:
            planned[modules[m]] = style
    for node, style in planned.items():
        if style == "replicate":
            styles.pop(node, None)
        else:
            styles[node] = style
    # Vocab-split embeddings must agree with every other use of their (tied) weight.
    for emb in [n for n, s in styles.items() if s == "vocab"]:
        weight = _parameter(gm, emb.args[0])
        if weight.shape[0] % size:
            raise StrategyError(
                f"tensor_parallel: {_module(emb)}: vocabulary of {weight.shape[0]} rows does not "
                f"divide over TensorParallel.size={size}; pad the vocabulary to a multiple of "
                f"{size}, or use TensorParallel(vocab_parallel=False)."
            )
        others = [n for n in linears if _linear(gm, n)["weight"] is weight]
        if any(styles.get(n) != "column" or _linear(gm, n)["out_dim"] != 0 for n in others):
            styles.pop(emb)
    for node, style in styles.items():
        if style == "column":
            lin = _linear(gm, node)
            features = lin["weight"].shape[lin["out_dim"]]
            if features % size:
                raise StrategyError(
                    f"tensor_parallel: {linears[node]}: {features} output features do not divide "
                    f"over TensorParallel.size={size}; choose a size that divides {features}, "
                    f"or plan={{{linears[node]!r}: 'replicate'}}."
                )
    propagation = _Propagation(gm, styles, size, apply=True)
    try:
        propagation.run()
    except _Unsupported as exc:
        raise StrategyError(
            f"TensorParallel.plan: cannot split {_module(exc.node) or exc.node.name}: "
            f"{exc.reason} (node {exc.node.name}: {exc.node.format_node()}); change the plan."
        ) from None
    propagation.commit()
    rank = group.rank
    coords = ctx.mesh.coordinates(ctx.mesh.rank)
    writes = all(
        c == 0
        for dim, c in coords.items()
        if dim != TENSOR and not (dim == "shard" and ctx.strategy.zero)
    )
    shards = _Shards(ctx, names, size, rank, writes)
    decisions = {"column": [], "row": [], "vocab": []}
    graph = gm.graph
    copied: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        style = styles.get(node)
        if style is None:
            continue
        if style == "vocab":
            weight = _parameter(gm, node.args[0])
            shards.cut(weight, 0, 1)
            padding = node.args[2] if len(node.args) > 2 else -1
            start = rank * weight.shape[0]
            local_padding = padding - start if 0 <= padding - start < weight.shape[0] else -1
            with graph.inserting_after(node):
                new = _call(
                    graph,
                    tp_runtime.vocab_parallel_embedding,
                    (node.args[0], node.args[1], start, local_padding, key),
                    "vocab_embedding",
                )
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            decisions["vocab"].append(names[id(weight)].rpartition(".")[0])
            continue
        lin = _linear(gm, node)
        weight, out_dim = lin["weight"], lin["out_dim"]
        if style == "column":
            segments = propagation.segments.get(node, 1)
            shards.cut(weight, out_dim, segments)
            bias = _parameter(gm, lin["bias"]) if lin["bias"] is not None else None
            if bias is not None:
                shards.cut(bias, 0, segments)
            root = lin["input"]
            while (
                isinstance(root, fx.Node) and (_op(root) in CASTS | VIEWS) and len(root.users) == 1
            ):
                root = root.args[0]
            if root not in copied:
                with graph.inserting_after(root):
                    copied[root] = _call(graph, tp_runtime.tp_copy, (root, key), "copy")
            first = lin["input"]
            if first is root:
                node.replace_input_with(root, copied[root])
            else:
                while first.args[0] is not root:
                    first = first.args[0]
                first.replace_input_with(root, copied[root])
            decisions["column"].append(linears[node])
        else:
            shards.cut(weight, 1 - out_dim, 1)
            bias = lin["bias"]
            if out_dim == 0:
                node.args = (lin["input"], node.args[1])
                node.kwargs = {}
            else:
                node.target = aten.mm.default
                node.args = (lin["input"], node.args[2])
            with graph.inserting_after(node):
                reduced = _call(graph, tp_runtime.tp_reduce, (node, key), "reduce")
            node.replace_all_uses_with(
                reduced, delete_user_cb=lambda u, keep=reduced: u is not keep
            )
            if bias is not None:
                with graph.inserting_after(reduced):
                    added = graph.call_function(aten.add.Tensor, (reduced, bias))
                reduced.replace_all_uses_with(
                    added, delete_user_cb=lambda u, keep=added: u is not keep
                )
            decisions["row"].append(linears[node])
    for node, origin in propagation.cross_entropy:
        logits, target = node.args[:2]
        reduction = node.args[3] if len(node.args) > 3 else node.kwargs.get("reduction", 1)
        ignore = node.args[4] if len(node.args) > 4 else node.kwargs.get("ignore_index", -100)
        lin = _linear(gm, origin)
        classes = lin["weight"].shape[lin["out_dim"]]
        with graph.inserting_after(node):
            new = _call(
                graph,
                tp_runtime.vocab_parallel_cross_entropy,
                (logits, target, rank * classes, reduction, ignore, key),
                "vocab_cross_entropy",
            )
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    for value, dim in propagation.outputs:
        with graph.inserting_before(output):
            gathered = _call(graph, tp_runtime.tp_gather, (value, dim, key), "gather")
        output.replace_input_with(value, gathered)
    for node in graph.nodes:
        if node.op != "placeholder":
            node.meta.pop("val", None)
    graph.lint()
    gm.recompile()
    fill_fake_values(gm, ctx)
    act = {"fp32": 4}.get(ctx.strategy.precision, 2)
    ctx.record(
        TENSOR + "_parallel",
        size=size,
        mesh_dim=TENSOR,
        group=key,
        blocks=blocks,
        column=decisions["column"],
        row=decisions["row"],
        vocab=decisions["vocab"],
        vocab_cross_entropy=len(propagation.cross_entropy),
        gathered_outputs=len(propagation.outputs),
        skipped=skipped,
        activation_bytes=act,
        parameters=shards.done,
        collectives=[
            {
                "op": "all_reduce",
                "dim": TENSOR,
                "what": "row-parallel outputs (forward), column-parallel inputs' gradients (backward)",
            },
            *(
                [
                    {
                        "op": "all_reduce",
                        "dim": TENSOR,
                        "what": "vocab-parallel embedding rows and cross-entropy max/sum-exp/target logit",
                    }
                ]
                if decisions["vocab"] or propagation.cross_entropy
                else []
            ),
            *(
                [
                    {
                        "op": "all_gather",
                        "dim": TENSOR,
                        "what": "vocab-split logits leaving the graph",
                    }
                ]
                if propagation.outputs
                else []
            ),
        ],
    )
    return gm


def _call(graph: fx.Graph, fn, args: tuple, op: str) -> fx.Node:
    node = graph.call_function(fn, args)
    node.meta["strato_tp"] = {"op": op, "mesh_dim": TENSOR}
    return node


class _Shards:
    """Cuts parameters into this rank's blocks and registers them as layout steps."""

    def __init__(self, ctx, names: dict[int, str], size: int, rank: int, writes: bool) -> None:
        self.ctx, self.names, self.size, self.rank, self.writes = ctx, names, size, rank, writes
        self.done: dict[str, dict[str, Any]] = {}

    def cut(self, param: torch.nn.Parameter, dim: int, segments: int) -> None:
        name = self.names[id(param)]
        held = getattr(param, tp_runtime.GLOBAL_ATTR, None)
        whole = list(held[0]) if held is not None else list(param.shape)
        if segments == 1:
            steps = [_box(whole, dim, self.rank, self.size)]
        else:
            view = whole[:dim] + [segments, whole[dim] // segments] + whole[dim + 1 :]
            local = list(whole)
            local[dim] //= self.size
            steps = [
                {"kind": "view", "shape": view},
                _box(view, dim + 1, self.rank, self.size),
                {"kind": "view", "shape": local},
            ]
        if name in self.done and self.done[name]["steps"] != steps:
            raise StrategyError(f"tensor_parallel: {name} is used as two differently split layers.")
        if name in self.done:
            return
        tp_runtime.shard_parameter(param, steps)
        whole_tensor = torch.empty(whole, dtype=param.dtype, device="meta")
        for step in steps:
            register_step(
                self.ctx,
                "tensor_parallel",
                name,
                whole_tensor,
                step,
                holds_full=False,
                writes=self.writes,
            )
        self.done[name] = {"shape": whole, "steps": steps}


def _box(shape: list[int], dim: int, rank: int, size: int) -> dict[str, Any]:
    starts, stops = [0] * len(shape), list(shape)
    block = shape[dim] // size
    starts[dim], stops[dim] = rank * block, (rank + 1) * block
    return {"kind": "box", "starts": starts, "stops": stops}
