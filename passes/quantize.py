"""Rewrite linear layers on constant weights into quantized-linear custom ops.

Matches ATen `linear(x, W, b)`, `addmm(b, x, W.t())` and `mm(x, W.t())` where W is a
2-D float `get_attr`, and `addmm(b, x, V)` / `mm(x, V)` on a constant V = W.t() stored
[in, out] (GPT-2's Conv1D); packs W as the strategy asks (kernels/quantized_linear.py) and
registers the packed tensors on the graph module. Layers whose module path matches a
`Quantize.skip` glob stay float. With int8 activations, the graph first runs on the
calibration inputs to record each layer's per-input-channel |x| maximum (SmoothQuant).
Decisions land in ctx.records['quantize']: per layer, the scheme and bytes before/after.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import itertools
from collections.abc import Iterable

import torch
import torch.fx as fx

from ..compiler.context import CompileContext
from ..compiler.errors import StrategyError
from ..compiler.pass_manager import graph_pass
from ..compiler.quantize_config import Quantize
from ..kernels import quantized_linear as ql
from ..runtime.calls import bind_call, capture_defaults
from .annotate import getattr_path

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


# ---------------------------------------------------------------------- calibration

_observed: dict[str, torch.Tensor] = {}


def _observe_absmax(key: str, x: torch.Tensor) -> None:
    """Graph hook: fold max |x| over every dim but the last into `_observed[key]`."""
    absmax = x.detach().abs().float().reshape(-1, x.shape[-1]).amax(dim=0)
    seen = _observed.get(key)
    _observed[key] = absmax if seen is None else torch.maximum(seen, absmax)


def _observe_hessian(key: str, x: torch.Tensor) -> None:
    """Graph hook: add X^T X of the layer input (rows = tokens) into `_observed[key]`."""
    rows = x.detach().double().reshape(-1, x.shape[-1])
    gram = rows.t() @ rows
    seen = _observed.get(key)
    _observed[key] = gram if seen is None else seen + gram


def calibration_batches(config: Quantize, ctx: CompileContext) -> list[tuple[tuple, dict]]:
    """The calibration inputs as (args, kwargs) pairs; the example inputs by default."""
    source = config.calibration
    if source is None:
        return [(tuple(ctx.example_args), dict(ctx.example_kwargs))]
    if isinstance(source, str):
        module_name, _, attr = source.partition(":")
        try:
            source = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise StrategyError(f"Quantize.calibration: cannot import {source!r}: {exc}") from exc
    if callable(source):
        source = source()
    batches = []
    for i, batch in enumerate(source):
        if (
            isinstance(batch, tuple)
            and len(batch) == 2
            and isinstance(batch[0], tuple)
            and isinstance(batch[1], dict)
        ):
            batches.append((batch[0], batch[1]))
        elif isinstance(batch, tuple):
            batches.append((batch, dict(ctx.example_kwargs)))
        elif isinstance(batch, torch.Tensor):
            batches.append(((batch,), dict(ctx.example_kwargs)))
        else:
            raise StrategyError(
                f"Quantize.calibration: batch {i} is a {type(batch).__name__}; give a tensor, "
                "an args tuple, or an (args, kwargs) pair."
            )
    if not batches:
        raise StrategyError("Quantize.calibration: no batches; give at least one.")
    # The graph takes calls in the canonical form it was captured from (runtime/calls.py):
    # bind each batch as a call of the model would be, defaults such as use_cache filled.
    defaults = capture_defaults(ctx.model)
    bound = [bind_call(ctx.model, args, kwargs, defaults) for args, kwargs in batches]
    return [(call.args, call.kwargs) for call in bound]


def calibrate(
    gm: fx.GraphModule,
    layers: dict[str, fx.Node],
    batches: list[tuple[tuple, dict]],
    statistic: str,
) -> dict[str, torch.Tensor]:
    """Run `gm` on the batches with observers on each layer's input; returns, per layer,
    the per-channel |x| maximum ('absmax') or the Gram matrix X^T X ('hessian')."""
    observer = _observe_absmax if statistic == "absmax" else _observe_hessian
    hooks = []
    for key, node in layers.items():
        x = match_linear(node)[0]  # type: ignore[index]
        with gm.graph.inserting_before(node):
            hooks.append(gm.graph.call_function(observer, (key, x)))
    gm.recompile()
    _observed.clear()
    try:
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(batches):
                try:
                    gm(*args, **kwargs)
                except Exception as exc:
                    raise StrategyError(
                        f"Quantize.calibration: batch {i} does not run through the captured "
                        f"graph ({type(exc).__name__}: {exc}). Give batches shaped like the "
                        "example inputs (only the batch dimension may differ)."
                    ) from exc
        return dict(_observed)
    finally:
        _observed.clear()
        for hook in hooks:
            gm.graph.erase_node(hook)
        gm.recompile()


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
            group_size=config.group_size,
            symmetric=config.symmetric,
            hessian=stat if config.method == "gptq" else None,
            name=name,
        )
    return ql.quantize_int8(weight, symmetric=config.symmetric, name=name)


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
    layers: dict[str, fx.Node] = {}
    skipped: dict[str, str] = {}
    counter = itertools.count()
    for node in gm.graph.nodes:
        match = match_linear(node)
        if match is None:
            continue
        weight = match[1]
        path = layer_path(node, weight)
        value = linear_weight(gm, node, weight)
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
            skipped[path] = "weight is not a 2-D float tensor"
            continue
        glob = is_skipped(path, str(weight.target), config.skip)
        if glob is not None:
            skipped[path] = f"matches skip glob {glob!r}"
            continue
        key = path if path not in layers else f"{path}#{next(counter)}"
        layers[key] = node

    stats: dict[str, torch.Tensor] = {}
    if layers and (config.activations == "int8" or config.method == "gptq"):
        statistic = "absmax" if config.activations == "int8" else "hessian"
        stats = calibrate(gm, layers, calibration_batches(config, ctx), statistic)

    records: dict[str, dict] = {}
    with single_threaded():
        for group in sibling_groups(layers, config, gm):
            records.update(_rewrite_group(gm, group, config, stats.get(group[0][0])))
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


def _rewrite_group(
    gm: fx.GraphModule,
    members: list[tuple[str, fx.Node]],
    config: Quantize,
    stat: torch.Tensor | None,
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
    first_key, first = members[0]
    stacked = values[0] if len(values) == 1 else torch.cat([v.detach() for v in values])
    qw = _quantize_weight(stacked, config, f"layer {first_key!r}", stat)
    safe = str(weights[0].target).replace(".", "_")
    if first_key != layer_path(first, weights[0]):  # the same weight feeding several layers
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
        records[key] = _retire(gm, key, node, match, value, qw, buffers, start, stacked.shape[0])
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
    weights = f"int4 g{config.group_size}" if config.weights == "int4" else "int8"
    if config.method == "gptq":
        weights += " gptq"
    kind = "sym" if config.symmetric else "asym"
    acts = " + int8 dynamic activations" if config.activations == "int8" else " weight-only"
    return f"{weights} {kind}{acts}"
