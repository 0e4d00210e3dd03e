"""Tensor parallelism (Megatron-style) over the mesh's `tensor` dimension.

The pass finds, per module, the linears whose outputs feed another linear of the same
module through head reshapes, attention, activations and elementwise ops (attention:
q/k/v -> heads -> output projection; MLP: up/gate -> activation -> down), and splits
them: the feeding ones *column*-parallel (output features: heads, MLP width), the fed one
*row*-parallel (input features); its partial results are summed by one all-reduce in
forward (`tp_reduce`), and the block's input gradient by one in backward (`tp_copy`).
Between the two every value is split along one dimension, which the pass follows node by
node (`SplitPropagation` in passes/tensor_parallel_split.py): a reshape into heads gets the local head count, an expand of GQA
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
from typing import Any

import torch
import torch.fx as fx

from ..compiler.context import CompileContext
from ..compiler.errors import StrategyError
from ..compiler.layout import register_step, state_names
from ..compiler.pass_manager import graph_pass
from ..runtime import tensor_parallel as tp_runtime
from .annotate import fill_fake_values, getattr_path
from .tensor_parallel_io import (
    check_kept_output,
    finish_split_inputs,
    kept_outputs,
    split_inputs,
)
from .tensor_parallel_split import (
    CASTS,
    VIEWS,
    SplitPropagation,
    Unsupported,
    linear_of,
    module_of,
    op_name,
    parameter_of,
    through_casts,
)

aten = torch.ops.aten
TENSOR = "tensor"

# ---------------------------------------------------------------------- finding layers


def _is_token_embedding(gm: fx.GraphModule, node: fx.Node) -> bool:
    if op_name(node) != "embedding" or parameter_of(gm, node.args[0]) is None:
        return False
    ids = node.args[1]
    while isinstance(ids, fx.Node) and op_name(ids) in VIEWS | CASTS:
        ids = ids.args[0]
    return isinstance(ids, fx.Node) and ids.op == "placeholder"


def _within(module: str, parent: str) -> bool:
    return module == parent or module.startswith(parent + ".")


def _linear_module(gm: fx.GraphModule, node: fx.Node, names: dict[int, str]) -> str:
    return module_of(node) or names[id(linear_of(gm, node)["weight"])].rpartition(".")[0]


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
            found, seen, stack = [], set(), [linear_of(gm, row)["input"]]
            while stack:
                node = stack.pop()
                if not isinstance(node, fx.Node) or node in seen:
                    continue
                seen.add(node)
                if node in members:
                    found.append(node)
                elif node.op == "call_function" and _within(module_of(node), parent):
                    stack.extend(node.all_input_nodes)
            if found:
                feeders[row] = sorted(found, key=lambda n: list(gm.graph.nodes).index(n))
        columns = {c for cs in feeders.values() for c in cs}
        if len(feeders) == 1 and not columns & set(feeders):
            ((row, cols),) = feeders.items()
            blocks.append((parent, cols, row))
    return blocks


# ---------------------------------------------------------------------- the pass


HEAD_COUNTS = (
    ("num_attention_heads", "attention heads"),
    ("n_head", "attention heads"),
    ("num_key_value_heads", "KV heads"),
)


def _check_heads(model, parent: str, columns: list, linears: dict, size: int) -> None:
    """Head counts a Hugging Face config states must divide over the size (a reshape with
    -1 heads would otherwise split the head dimension instead)."""
    config = getattr(model, "config", None)
    if config is None or not any(
        linears[c].rpartition(".")[2] in ("q_proj", "k_proj", "c_attn", "query", "key")
        for c in columns
    ):
        return
    for field, what in HEAD_COUNTS:
        count = getattr(config, field, None)
        if isinstance(count, int) and count % size:
            where = next(
                (linears[c] for c in columns if "k" in linears[c].rpartition(".")[2]), parent
            )
            raise StrategyError(
                f"tensor_parallel: {parent} ({where}): {count} {what} (config.{field}) do not "
                f"divide over TensorParallel.size={size}; choose a size that divides {count}."
            )


def _expert_parallel_layers(ctx: CompileContext) -> dict[str, str]:
    """Module path -> kind of each MoE layer `moe_dispatch` rewrites (under ExpertParallel):
    the whole layer becomes one expert-parallel call, so nothing in it is split here."""
    if ctx.strategy.moe is None:
        return {}
    from .moe_dispatch import moe_layers

    return {path: layer.kind for path, layer in moe_layers(ctx.model, ctx.training).items()}


def _globbed(ctx: CompileContext, glob: str) -> list[str]:
    return [m for m, _ in ctx.model.named_modules() if m and fnmatch.fnmatchcase(m, glob)]


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
    group = ctx.mesh.group(TENSOR)
    key = tp_runtime.register_group(group)
    names = {id(t): n for n, t, _ in reversed(list(state_names(ctx.model)))}
    linears = {n: "" for n in gm.graph.nodes if linear_of(gm, n) is not None}
    for node in linears:
        linears[node] = _linear_module(gm, node, names)
    experts = _expert_parallel_layers(ctx)
    linears = {n: m for n, m in linears.items() if not any(_within(m, e) for e in experts)}
    embeddings = [n for n in gm.graph.nodes if _is_token_embedding(gm, n)]
    inputs = split_inputs(gm, ctx) if size > 1 else {}
    modules = {**{m: n for n, m in linears.items()}}
    modules.update(
        {
            module_of(n) or names[id(parameter_of(gm, n.args[0]))].rpartition(".")[0]: n
            for n in embeddings
        }
    )

    styles: dict[fx.Node, str] = {}
    skipped: list[dict[str, str]] = []
    blocks = []
    for parent, columns, row in _match_blocks(gm, linears):
        _check_heads(ctx.model, parent, columns, linears, size)
        trial = {**{c: "column" for c in columns}, row: "row"}
        try:
            SplitPropagation(gm, trial, size, apply=False).run(inputs=inputs)
        except Unsupported as exc:
            skipped.append({"module": parent, "node": exc.node.name, "reason": exc.reason})
            continue
        styles.update(trial)
        blocks.append(parent)
    vocab_rows = {parameter_of(gm, e.args[0]).shape[0] for e in embeddings}
    if config.vocab_parallel:
        for node, module in linears.items():
            lin = linear_of(gm, node)
            rows = lin["weight"].shape[lin["out_dim"]]
            if node not in styles and rows in vocab_rows:
                if rows % size:
                    raise StrategyError(
                        f"tensor_parallel: {module}: vocabulary of {rows} rows does not divide "
                        f"over TensorParallel.size={size}; pad the vocabulary to a multiple of "
                        f"{size}, or use TensorParallel(vocab_parallel=False)."
                    )
                trial = {**styles, node: "column"}
                try:
                    SplitPropagation(gm, trial, size, apply=False).run(inputs=inputs)
                except Unsupported as exc:
                    skipped.append({"module": module, "node": exc.node.name, "reason": exc.reason})
                    continue
                styles[node] = "column"
        for emb in embeddings:
            styles[emb] = "vocab"
    planned = {}
    for glob, style in config.plan:
        inside = [
            (e, k, m) for e, k in experts.items() for m in _globbed(ctx, glob) if _within(m, e)
        ]
        if inside and style != "replicate":
            (layer, kind, module), *_ = inside
            named = ctx.model.get_submodule(module).named_parameters(prefix=module)
            param = next((n for n, _ in named), module)
            raise StrategyError(
                f"TensorParallel.plan[{glob!r}]: {param} is in {layer} ({kind}), a mixture-of-"
                "experts layer that Strategy(moe=strato.ExpertParallel(...)) shards by experts "
                "(its router, experts and shared expert run whole on each expert rank); "
                "tensor parallelism cannot split it as well. Leave it out of the plan: "
                "attention and the other layers still split."
            )
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
        weight = parameter_of(gm, emb.args[0])
        if weight.shape[0] % size:
            raise StrategyError(
                f"tensor_parallel: {module_of(emb)}: vocabulary of {weight.shape[0]} rows does not "
                f"divide over TensorParallel.size={size}; pad the vocabulary to a multiple of "
                f"{size}, or use TensorParallel(vocab_parallel=False)."
            )
        others = [n for n in linears if linear_of(gm, n)["weight"] is weight]
        if any(styles.get(n) != "column" or linear_of(gm, n)["out_dim"] != 0 for n in others):
            styles.pop(emb)
    for node, style in styles.items():
        if style == "column":
            lin = linear_of(gm, node)
            features = lin["weight"].shape[lin["out_dim"]]
            if features % size:
                raise StrategyError(
                    f"tensor_parallel: {linears[node]}: {features} output features do not divide "
                    f"over TensorParallel.size={size}; choose a size that divides {features}, "
                    f"or plan={{{linears[node]!r}: 'replicate'}}."
                )
    propagation = SplitPropagation(gm, styles, size, apply=True)
    try:
        propagation.run(inputs=inputs)
    except Unsupported as exc:
        raise StrategyError(
            f"TensorParallel.plan: cannot split {module_of(exc.node) or exc.node.name}: "
            f"{exc.reason} (node {exc.node.name}: {exc.node.format_node()}); change the plan."
        ) from None
    propagation.commit()
    _split_dropouts(gm.graph, propagation, key)
    if inputs:
        finish_split_inputs(gm, ctx, propagation, inputs, key, skipped)
    rank = group.rank
    coords = ctx.mesh.coordinates(ctx.mesh.rank)
    # The first data-parallel replica writes; which stage writes is pipeline_cut's call.
    writes = all(
        c == 0
        for dim, c in coords.items()
        if dim not in (TENSOR, "pipeline") and not (dim == "shard" and ctx.strategy.zero)
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
            weight = parameter_of(gm, node.args[0])
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
        lin = linear_of(gm, node)
        weight, out_dim = lin["weight"], lin["out_dim"]
        if style == "column":
            segments = propagation.segments.get(node, 1)
            shards.cut(weight, out_dim, segments)
            bias = parameter_of(gm, lin["bias"]) if lin["bias"] is not None else None
            if bias is not None:
                shards.cut(bias, 0, segments)
            root = lin["input"]
            while (
                isinstance(root, fx.Node)
                and (op_name(root) in CASTS | VIEWS)
                and len(root.users) == 1
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
        lin = linear_of(gm, origin)
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
    if size > 1:  # whole tensors: one writer per piece, the first rank of the tensor group
        split = set(shards.done)
        for name, tensor, _ in state_names(ctx.model):
            if name not in split and name in names.values():
                whole = {"kind": "view", "shape": list(tensor.shape)}
                register_step(
                    ctx, "tensor_parallel", name, tensor, whole, True, writes and rank == 0
                )
    _gather_outputs(graph, propagation, key, kept_outputs(gm, ctx) if inputs else {})
    summed = _sum_gradients(graph, propagation, key)
    _refresh(gm, ctx)
    if config.sequence_parallel:
        summed += _sequence_parallel(gm, ctx, key, size)
    dropouts = [n.args[1] for n in graph.nodes if n.target is tp_runtime.tp_dropout]
    dropouts += [n.args[1] for n in graph.nodes if op_name(n) == "dropout"]
    if ctx.training and any(not isinstance(p, float) or p > 0 for p in dropouts):
        tp_runtime.sync_rng(key)  # replicated dropout: the same masks on every rank
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
        sequence_parallel=config.sequence_parallel,
        split_inputs={n.name: d for n, d in inputs.items()},
        gradients_summed=summed,
        check_inputs=config.check_inputs,
        collectives=[
            *(
                [
                    {
                        "op": "all_gather",
                        "dim": TENSOR,
                        "what": "input fingerprints (the same batch on every tensor rank)",
                    }
                ]
                if config.check_inputs
                else []
            ),
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


def _refresh(gm: fx.GraphModule, ctx: CompileContext) -> None:
    """Shapes changed: recompute every node's fake value."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            node.meta.pop("val", None)
    gm.graph.lint()
    gm.recompile()
    fill_fake_values(gm, ctx)


def _gather_outputs(
    graph: fx.Graph, propagation: SplitPropagation, key: str, kept: dict | None = None
) -> None:
    output = next(n for n in graph.nodes if n.op == "output")
    for value, dim in propagation.outputs:
        if check_kept_output(value, dim, kept or {}):
            continue
        with graph.inserting_before(output):
            gathered = _call(graph, tp_runtime.tp_gather, (value, dim, key), "gather")
        output.replace_input_with(value, gathered)


def _sum_gradients(graph: fx.Graph, propagation: SplitPropagation, key: str) -> list[dict]:
    """Whole values that meet split ones (norm weights and position embeddings on token
    shards, a per-head scale) get only this rank's part of their gradient there: read them
    through tp_copy, whose backward sums the parts over the group (values without a
    gradient, masks or rotary tables, communicate nothing)."""
    copies: dict[fx.Node, fx.Node] = {}
    for node, whole in propagation.whole_uses:
        if whole not in copies:
            with graph.inserting_after(whole):
                copies[whole] = _call(graph, tp_runtime.tp_copy, (whole, key), "copy_gradient")
        node.replace_input_with(whole, copies[whole])
    return [
        {
            "value": str(through_casts(w).target) if through_casts(w).op == "get_attr" else w.name,
            "numel": n if isinstance(n := w.meta["val"].numel(), int) else str(n),
            "requires_grad": _needs_gradient(graph, w),
        }
        for w in copies
    ]


def _needs_gradient(graph: fx.Graph, node: fx.Node) -> bool:
    """Whether autograd computes a gradient for `node`: it depends on a trainable parameter."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            value = getattr_path(graph.owning_module, n.target)
            if isinstance(value, torch.nn.Parameter) and value.requires_grad:
                return True
        stack.extend(n.all_input_nodes)
    return False


def _sequence_parallel(gm: fx.GraphModule, ctx: CompileContext, key: str, size: int) -> list[str]:
    """Megatron sequence parallelism: between blocks activations stay split along their
    outermost token dimension (dim 0); each row-parallel all-reduce becomes a
    reduce-scatter, each block input an all-gather (backward: the other one)."""
    graph = gm.graph
    seeds: dict[fx.Node, int] = {}
    sinks: set[fx.Node] = set()
    for node in list(graph.nodes):
        op = node.meta.get("strato_tp", {}).get("op")
        if op == "reduce":
            node.target, node.args = tp_runtime.tp_reduce_scatter, (node.args[0], 0, key)
            node.meta["strato_tp"]["op"] = "reduce_scatter"
            seeds[node] = 0
        elif op == "vocab_embedding":
            node.args = (*node.args[:5], 0)
            seeds[node] = 0
        elif op == "copy":
            node.target, node.args = tp_runtime.tp_all_gather, (node.args[0], 0, key)
            node.meta["strato_tp"]["op"] = "all_gather"
            sinks.add(node)
        elif _is_token_embedding(gm, node):  # a whole token embedding: keep this rank's rows
            with graph.inserting_after(node):
                split = _call(graph, tp_runtime.tp_split, (node, 0, key), "split")
            node.replace_all_uses_with(split, delete_user_cb=lambda u, keep=split: u is not keep)
            seeds[split] = 0
    propagation = SplitPropagation(gm, {}, size, apply=True)
    propagation.sinks = sinks
    try:
        propagation.run(seeds)
    except Unsupported as exc:
        raise StrategyError(
            f"TensorParallel.sequence_parallel: {module_of(exc.node) or exc.node.name} cannot run "
            f"on token shards: {exc.reason} (node {exc.node.name}: {exc.node.format_node()}); "
            "use sequence_parallel=False for this model."
        ) from None
    for sink in sinks:
        if sink.args[0] not in propagation.split:  # a whole input: nothing to gather
            sink.target, sink.args = tp_runtime.tp_copy, (sink.args[0], key)
            sink.meta["strato_tp"]["op"] = "copy"
    propagation.commit()
    _split_dropouts(graph, propagation, key)
    _gather_outputs(graph, propagation, key)
    summed = _sum_gradients(graph, propagation, key)
    _refresh(gm, ctx)
    return summed


def _split_dropouts(graph: fx.Graph, propagation: SplitPropagation, key: str) -> None:
    """Dropout on a split value draws the whole value's mask and keeps this rank's slice
    (`tp_dropout`): one process's masks, and the same random numbers used on every rank."""
    for node, dim in propagation.split.items():
        if op_name(node) == "dropout" and isinstance(dim, int):
            x, p, train = node.args[:3]
            node.target, node.args = tp_runtime.tp_dropout, (x, p, train, dim, key)
            node.meta["strato_tp"] = {"op": "dropout", "mesh_dim": TENSOR}


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
