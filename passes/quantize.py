"""Rewrite linear layers on constant weights into quantized-linear custom ops.

Matches ATen `linear(x, W, b)`, `addmm(b, x, W.t())` and `mm(x, W.t())` where W is a
2-D float `get_attr`, and `addmm(b, x, V)` / `mm(x, V)` on a constant V = W.t() stored
[in, out] (GPT-2's Conv1D); packs W as the strategy asks (kernels/quantized_linear.py) and
registers the packed tensors on the graph module. Layers whose module path matches a
`Quantize.skip` glob stay float; a glob matching no layer, or a model with no linear
layer, is a StrategyError. GPTQ (Hessians X^T X) and SmoothQuant (per-input-channel |x|
maxima) calibrate on `Quantize.calibration` (passes/quantize_calibration.py); the
statistics and the packed weights are kept per model, so every graph of it (forward,
generate's prefill and decode) shares them. Decisions land in ctx.records['quantize']:
per layer, the scheme and bytes before/after.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import warnings
import weakref
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch.utils.weak import WeakTensorKeyDictionary

from ..compiler.context import CompileContext
from ..compiler.errors import StrategyError, did_you_mean
from ..compiler.pass_manager import graph_pass
from ..compiler.quantize_config import Quantize
from ..kernels import gptq
from ..kernels import quantized_linear as ql
from .annotate import getattr_path
from .quantize_calibration import layer_statistics, served_model

aten = torch.ops.aten
_TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default)


def _transposed_weight(node: fx.Node) -> fx.Node | None:
    """The get_attr W when `node` is W.t() (or an equivalent 2-D transpose/permute)."""
    if (
        not isinstance(node, fx.Node)
        or node.op != "call_function"
        or node.target not in _TRANSPOSES
    ):
        return None
    if node.target is aten.permute.default and list(node.args[1]) not in ([1, 0], [-1, -2]):
        return None
    if node.target is aten.transpose.int and sorted(int(d) % 2 for d in node.args[1:3]) != [0, 1]:
        return None
    weight = node.args[0]
    return weight if isinstance(weight, fx.Node) and weight.op == "get_attr" else None


def match_linear(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(x, weight get_attr, bias or None) when `node` is a linear layer on a constant weight."""
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            return x, weight, bias
        return None
    if node.target is aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        bias, x, wt = node.args[:3]
        weight = _transposed_weight(wt) or _stored_in_out(wt)
        if weight is not None and isinstance(bias, fx.Node):
            bias_val = bias.meta.get("val")
            if isinstance(bias_val, torch.Tensor) and bias_val.dim() == 1:
                return x, weight, bias
        return None
    if node.target is aten.mm.default:
        weight = _transposed_weight(node.args[1]) or _stored_in_out(node.args[1])
        return (node.args[0], weight, None) if weight is not None else None
    return None


def _stored_in_out(node: fx.Node) -> fx.Node | None:
    """`node` when it is a constant multiplied as is: a weight stored [in, out]."""
    return node if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _matrix_arg(node: fx.Node) -> fx.Node | None:
    """The right-hand matrix of an addmm/mm node (W.t(), or a weight stored [in, out])."""
    if node.target is aten.addmm.default:
        return node.args[2]
    return node.args[1] if node.target is aten.mm.default else None


def linear_weight(gm: fx.GraphModule, node: fx.Node, weight: fx.Node) -> torch.Tensor:
    """The [out, in] weight of the linear layer `node` (a view of an [in, out] constant)."""
    value = getattr_path(gm, weight.target)
    stored_in_out = _matrix_arg(node) is weight
    return value.t() if stored_in_out and isinstance(value, torch.Tensor) else value


def layer_path(node: fx.Node, weight: fx.Node) -> str:
    """The module path of a linear layer: its node's owner, else its weight's owner."""
    return node.meta.get("strato_module") or str(weight.target).rpartition(".")[0]


def is_skipped(path: str, weight_target: str, globs: Iterable[str]) -> str | None:
    """The first glob matching the layer's module path or weight name, else None."""
    for glob in globs:
        if fnmatch.fnmatchcase(path, glob) or fnmatch.fnmatchcase(weight_target, glob):
            return glob
    return None


# ---------------------------------------------------------------------- the pass


def sibling_groups(
    layers: dict[str, fx.Node], config: Quantize, gm: fx.GraphModule
) -> list[list[tuple[str, fx.Node]]]:
    """Layers to quantize together: weight-only layers reading the same input with the same
    kind of bias (none, or constants) are stacked into one op (Quantize.stack_siblings)."""
    groups: dict[object, list[tuple[str, fx.Node]]] = {}
    seen_weights: set[str] = set()
    for key, node in layers.items():
        x, weight, bias = match_linear(node)  # type: ignore[misc]
        mergeable = (
            config.stack_siblings
            and config.activations is None
            and str(weight.target) not in seen_weights
            and (bias is None or (isinstance(bias, fx.Node) and bias.op == "get_attr"))
            and getattr_path(gm, weight.target).dtype == torch.float32
        )
        seen_weights.add(str(weight.target))
        group_key = (x, bias is None) if mergeable else key
        groups.setdefault(group_key, []).append((key, node))
    return list(groups.values())


def _quantize_weight(
    weight: torch.Tensor, config: Quantize, name: str, stat: torch.Tensor | None
) -> ql.QuantizedWeight:
    if config.activations == "int8":
        return ql.quantize_int8_dynamic(weight, stat, alpha=config.smoothquant_alpha, name=name)
    if config.weights == "int4":
        return ql.quantize_int4(
            weight,
            group_size=config.int4_group_size,
            symmetric=config.symmetric,
            hessian=stat if config.method == "gptq" else None,
            name=name,
        )
    return ql.quantize_int8(weight, symmetric=config.symmetric, name=name)


_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> {(weight ids, versions, config, statistic id): QuantizedWeight}: the graphs of
one model (forward, prefill, decode) share each packed weight instead of packing it again."""


def _pack_key(stored, config, stat) -> tuple:
    return (
        tuple(id(t) for t in stored),
        tuple(t._version for t in stored),
        config,
        id(stat) if stat is not None else None,
    )


def _stacked(values: list[torch.Tensor]) -> torch.Tensor:
    return values[0] if len(values) == 1 else torch.cat([v.detach() for v in values])


def _packed_once(model, stored, config, stat, name, values) -> ql.QuantizedWeight:
    """The packed weight of `values` stacked (one layer: as is), packed on first request."""
    key = _pack_key(stored, config, stat)
    cache = _packed.setdefault(model, {})
    if key not in cache:
        for stale in [k for k in cache if k[0] == key[0] and k[1] != key[1]]:
            del cache[stale]  # packed from these weights before they changed
        cache[key] = _quantize_weight(_stacked(values), config, f"layer {name!r}", stat)
    return cache[key]


def _gptq_all_at_once(gm, groups, config: Quantize, stats, model) -> None:
    """Pack every GPTQ group not yet packed in one call, so that layers of one shape (the
    same projection of every decoder layer) run GPTQ as one batch (kernels/gptq.py);
    `_packed_once` then finds them packed."""
    cache = _packed.setdefault(model, {})
    keys, weights, hessians, names = [], [], [], []
    for members in groups:
        matches = [match_linear(node) for _, node in members]
        stored = [getattr_path(gm, m[1].target) for m in matches]
        stat = stats.get(stored[0]) if isinstance(stored[0], torch.Tensor) else None
        key = _pack_key(stored, config, stat)
        if stat is None or key in cache or key in keys:
            continue
        values = [linear_weight(gm, node, m[1]) for (_, node), m in zip(members, matches)]
        keys.append(key)
        weights.append(_stacked(values))
        hessians.append(stat)
        names.append(f"layer {members[0][0]!r}")
    packed = gptq.quantize_int4_gptq(
        weights,
        hessians,
        group_size=config.int4_group_size,
        symmetric=config.symmetric,
        names=names,
    )
    for key, qw in zip(keys, packed):
        for stale in [k for k in cache if k[0] == key[0] and k[1] != key[1]]:
            del cache[stale]
        cache[key] = qw


def _op_args(qw: ql.QuantizedWeight, x, attrs_nodes: dict, bias) -> tuple:
    if qw.scheme == "int8":
        return torch.ops.strato.quant_linear_int8.default, (
            x,
            attrs_nodes["qweight"],
            attrs_nodes["scales"],
            attrs_nodes.get("zeros"),
            bias,
        )
    if qw.scheme == "int4":
        return torch.ops.strato.quant_linear_int4.default, (
            x,
            attrs_nodes["qweight"],
            attrs_nodes["scales"],
            attrs_nodes.get("zeros"),
            bias,
            qw.group_size,
            qw.in_features,
        )
    return torch.ops.strato.quant_linear_int8_dynamic.default, (
        x,
        attrs_nodes["qweight"],
        attrs_nodes["scales"],
        attrs_nodes.get("act_scale"),
        bias,
    )


@graph_pass(name="quantize", requires="shapes", provides="quantized")
def quantize_linears(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Replace float linear layers with int8/int4 quantized-linear ops (eval graphs only)."""
    config: Quantize | None = ctx.strategy.quantize
    if config is None:
        return gm
    if ctx.training:
        ctx.record("quantize", skipped_graph="training graphs are not quantized")
        return gm
    model, prefix = served_model(ctx)
    layers: dict[str, fx.Node] = {}
    skipped: dict[str, str] = {}
    seen: list[str] = []
    used_globs: set[str] = set()
    counter = itertools.count()
    for node in gm.graph.nodes:
        match = match_linear(node)
        if match is None:
            continue
        weight = match[1]
        path = layer_path(node, weight).removeprefix(prefix)
        value = linear_weight(gm, node, weight)
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
            skipped[path] = "weight is not a 2-D float tensor"
            continue
        seen.append(path)
        glob = is_skipped(path, str(weight.target).removeprefix(prefix), config.skip)
        if glob is not None:
            skipped[path] = f"matches skip glob {glob!r}"
            used_globs.add(glob)
            continue
        key = path if path not in layers else f"{path}#{next(counter)}"
        layers[key] = node
    _check_layers_found(config, model, seen, used_globs, skipped)

    stats: WeakTensorKeyDictionary | dict = {}
    if layers and (config.activations == "int8" or config.method == "gptq"):
        statistic = "absmax" if config.activations == "int8" else "hessian"
        stats = layer_statistics(config, ctx, statistic)

    records: dict[str, dict] = {}
    with single_threaded():
        groups = sibling_groups(layers, config, gm)
        if config.method == "gptq":
            _gptq_all_at_once(gm, groups, config, stats, model)
        for group in groups:
            records.update(_rewrite_group(gm, group, config, stats, model))
    gm.graph.lint()
    gm.recompile()
    ctx.record(
        "quantize",
        scheme=_scheme_name(config),
        layers=records,
        skipped=skipped,
        bytes_before=sum(r["bytes_before"] for r in records.values()),
        bytes_after=sum(r["bytes_after"] for r in records.values()),
    )
    return gm


def _check_layers_found(config, model, seen: list[str], used_globs: set[str], skipped) -> None:
    """A quantize request that changes nothing, or a skip glob matching no layer, is an
    error naming it (before the graph changes)."""
    name = type(model).__name__
    unused = [glob for glob in config.skip if glob not in used_globs]
    if unused:
        near = did_you_mean(unused[0], seen)
        listed = ", ".join(seen[:8]) + (", ..." if len(seen) > 8 else "")
        raise StrategyError(
            f"Quantize.skip: {unused[0]!r} matches no linear layer of {name} (globs match "
            f"module paths or weight names; its layers: {listed or 'none'}).{near}"
        )
    if not seen:
        raise StrategyError(
            f"Strategy.quantize: {name} has no linear layers on constant 2-D float weights "
            "(nn.Linear, F.linear, addmm/mm such as GPT-2's Conv1D), so nothing would be "
            f"quantized{' (' + ', '.join(skipped) + ' are not 2-D float)' if skipped else ''}; "
            "drop Strategy.quantize for this model."
        )
    if len(skipped) == len(seen):
        warnings.warn(
            f"strato: every linear layer of {name} matches a Quantize.skip glob "
            f"({', '.join(config.skip)}); nothing is quantized.",
            stacklevel=2,
        )


def _rewrite_group(
    gm: fx.GraphModule,
    members: list[tuple[str, fx.Node]],
    config: Quantize,
    stats,
    model: torch.nn.Module,
) -> dict[str, dict]:
    """Quantize the weights of layers sharing one input as one [sum N, K] weight (one layer:
    as is), register the packed tensors, swap in one op (sliced per layer); their records.

    Rows are quantized independently in every weight-only scheme, so stacking q/k/v (or
    gate/up) changes no value, only the number of kernel calls.
    """
    matches = [match_linear(node) for _, node in members]
    x = matches[0][0]
    weights = [m[1] for m in matches]
    values = [linear_weight(gm, node, w) for (_, node), w in zip(members, weights)]
    stored = [getattr_path(gm, w.target) for w in weights]
    first_key, first = members[0]
    stat = stats.get(stored[0]) if isinstance(stored[0], torch.Tensor) else None
    qw = _packed_once(model, stored, config, stat, first_key, values)
    safe = str(weights[0].target).replace(".", "_")
    if "#" in first_key:  # the same weight feeding several layers
        safe += f"_{first_key.rpartition('#')[2]}"
    if len(members) > 1:
        safe += f"__stacked{len(members)}"
    tensors = dict(qw.tensors())
    bias_nodes = [m[2] for m in matches]
    if len(members) > 1 and bias_nodes[0] is not None:
        tensors["bias"] = torch.cat([getattr_path(gm, b.target).detach() for b in bias_nodes])
    attr_nodes, buffers = {}, {}
    with gm.graph.inserting_before(first):
        for role, tensor in tensors.items():
            buffers[role] = name = f"{safe}__{role}"
            gm.register_buffer(name, tensor)
            attr_nodes[role] = gm.graph.get_attr(name)
        bias = (
            attr_nodes.get("bias", bias_nodes[0]) if len(members) == 1 else attr_nodes.get("bias")
        )
        target, args = _op_args(qw, x, attr_nodes, bias)
        new = gm.graph.call_function(target, args)
    new.meta.update(first.meta)
    new.meta["strato_quantized"] = qw.scheme
    records, start = {}, 0
    for (key, node), match, value in zip(members, matches, values):
        rows = value.shape[0]
        out = new
        if len(members) > 1:
            with gm.graph.inserting_after(new):
                clone = gm.graph.call_function(
                    aten.clone.default, (None,), {"memory_format": torch.contiguous_format}
                )
            with gm.graph.inserting_before(clone):
                piece = gm.graph.call_function(aten.slice.Tensor, (new, -1, start, start + rows))
            clone.args = (piece,)
            piece.meta.update(node.meta)
            clone.meta.update(node.meta)
            out = clone
        node.replace_all_uses_with(out)
        records[key] = _retire(gm, key, node, match, value, qw, buffers, start, qw.out_features)
        start += rows
    if len(members) > 1:
        new.meta["val"] = first.meta["val"].new_empty((*first.meta["val"].shape[:-1], start))
    return records


def _retire(gm, key, node, match, value, qw, buffers, row0, total_rows) -> dict:
    """Erase a replaced layer (and its now-unused transpose/weight nodes); its record."""
    weight = match[1]
    transposed = _matrix_arg(node)
    if transposed is weight:  # stored [in, out]: no transpose node
        transposed = None
    gm.graph.erase_node(node)
    for maybe_dead in (transposed, weight, match[2]):
        if isinstance(maybe_dead, fx.Node) and not maybe_dead.users:
            gm.graph.erase_node(maybe_dead)
    rows = value.shape[0]
    return {
        "scheme": qw.scheme,
        "shape": list(value.shape),
        "weight": str(weight.target),
        "bytes_before": value.numel() * value.element_size(),
        "bytes_after": qw.nbytes() * rows // total_rows,
        "float_weight_kept": bool(weight.users),  # e.g. tied to an embedding
        "buffers": buffers,
        "rows": [row0, row0 + rows],
        "group_size": qw.group_size,
    }


@contextlib.contextmanager
def single_threaded():
    """Run many tiny tensor ops on one thread: intra-op threads only add overhead there,
    and on a busy machine their barriers cost 10x (GPTQ's column loop, MSE clipping)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _scheme_name(config: Quantize) -> str:
    weights = f"int4 g{config.int4_group_size}" if config.weights == "int4" else "int8"
    if config.method == "gptq":
        weights += " gptq"
    kind = "sym" if config.symmetric else "asym"
    acts = " + int8 dynamic activations" if config.activations == "int8" else " weight-only"
    return f"{weights} {kind}{acts}"
