"""Calibration for the quantize pass: statistics of each linear layer's inputs.

GPTQ needs X^T X of each layer's inputs and SmoothQuant the per-input-channel |x| maxima.
Both come from running the user's model eagerly on `Quantize.calibration` under a
TorchFunctionMode that sees every product of an input with a watched 2-D weight, keyed by
weight tensor: every graph of the model (its forward, the prefill and decode graphs of
generate) then quantizes each weight from the same numbers, and the calibration runs once
per model, not once per graph. Layers reading the same input (q/k/v, gate/up) share one
Hessian, computed once.
"""

from __future__ import annotations

import importlib
import itertools
import time
import warnings
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

from ..compiler.capture import model_mode
from ..compiler.context import CompileContext
from ..compiler.errors import StrategyError
from ..compiler.quantize_config import Quantize
from ..runtime.calls import capture_defaults

_TRANSPOSES_EAGER = {
    torch.Tensor.t,
    torch.t,
    torch.Tensor.transpose,
    torch.transpose,
    torch.Tensor.permute,
    torch.permute,
    torch.Tensor.T.__get__,
    torch.Tensor.mT.__get__,
}
_MATMULS_EAGER = {
    torch.Tensor.mm,
    torch.mm,
    torch.Tensor.matmul,
    torch.matmul,
    torch.Tensor.__matmul__,
}
_ADDMMS_EAGER = {torch.Tensor.addmm, torch.addmm}


class _LayerInputs(TorchFunctionMode):
    """Calls `observe(weight, x)` for every linear product of x with a watched 2-D weight:
    F.linear(x, W), addmm(b, x, W or W.t()), mm/matmul/@ (x, W or W.t())."""

    def __init__(self, weights: dict[int, torch.Tensor], observe) -> None:
        super().__init__()
        self.weights = weights
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.observe = observe

    def _watched(self, value) -> torch.Tensor | None:
        if not isinstance(value, torch.Tensor):
            return None
        if id(value) in self.weights and self.weights[id(value)] is value:
            return value
        view = self.views.get(id(value))
        return view[1] if view is not None and view[0] is value else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
        elif func in _ADDMMS_EAGER:
            x, w = args[1], args[2]
        elif func in _MATMULS_EAGER:
            x, w = args[0], args[1]
        else:
            if (
                func in _TRANSPOSES_EAGER
                and args
                and (weight := self._watched(args[0])) is not None
            ):
                self.views[id(out)] = (out, weight)  # kept alive for the run: ids stay unique
            return out
        weight = self._watched(w)
        if weight is not None and isinstance(x, torch.Tensor):
            self.observe(weight, x)  # the same object for siblings: one product
        return out


def _absmax_observer(stats):
    def observe(weight, x):
        absmax = x.abs().float().reshape(-1, x.shape[-1]).amax(dim=0)
        seen = stats.get(weight)
        stats[weight] = absmax if seen is None else torch.maximum(seen, absmax)

    return observe


def _hessian_observer(stats):
    """X^T X of each weight's input rows (fp32 products summed in fp64). Each input's
    product is computed once, and layers that read the same inputs (q/k/v, gate/up) hold
    one shared sum: a sum is keyed by the sequence of inputs it has added."""
    inputs = itertools.count()
    last: list = [None, None, None]  # the input, its number, its product
    added: dict[int, tuple] = {}  # id(weight) -> numbers of the inputs in its sum
    sums: dict[tuple, torch.Tensor] = {}  # the newest sum of each input sequence

    def observe(weight, x):
        if last[0] is not x:
            rows = x.float().reshape(-1, x.shape[-1])
            last[:] = x, next(inputs), (rows.t() @ rows).double()
        before = added.get(id(weight), ())
        after = added[id(weight)] = (*before, last[1])
        if after not in sums:
            seen = stats.get(weight)
            sums[after] = last[2] if seen is None else seen + last[2]
            sums.pop(before, None)  # later siblings look up `after`
        stats[weight] = sums[after]

    return observe


_statistics: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> {(calibration source id, statistic, weight versions): {weight: statistic}}."""


def served_model(ctx: CompileContext) -> tuple[torch.nn.Module, str]:
    """The user's model a graph computes and its module-path prefix in the graph: the
    model itself, or the model a wrapper (generate's KVCacheStep) names `wrapped_model`."""
    inner = getattr(ctx.model, "wrapped_model", None)
    if isinstance(inner, torch.nn.Module):
        return inner, ctx.model.wrapped_prefix
    return ctx.model, ""


def layer_statistics(
    config: Quantize, ctx: CompileContext, statistic: str
) -> WeakTensorKeyDictionary:
    """Per weight tensor, the per-channel |x| maximum ('absmax') or X^T X ('hessian') of the
    layer inputs over the calibration batches (computed once per model and source)."""
    model, _ = served_model(ctx)
    versions = tuple(p._version for p in model.parameters())
    key = (id(config.calibration), statistic, versions)
    cached = _statistics.setdefault(model, {})
    if key not in cached:
        started = time.perf_counter()
        stats = WeakTensorKeyDictionary()
        weights = {id(p): p for p in [*model.parameters(), *model.buffers()] if p.dim() == 2}
        observe = (_absmax_observer if statistic == "absmax" else _hessian_observer)(stats)
        batches = calibration_batches(config, ctx, model)
        with torch.no_grad(), _LayerInputs(weights, observe), model_mode(model, training=False):
            for i, (args, kwargs) in enumerate(batches):
                try:
                    model(*args, **kwargs)
                except Exception as exc:
                    raise StrategyError(
                        f"Quantize.calibration: batch {i} does not run through "
                        f"{type(model).__name__} ({type(exc).__name__}: {exc}). Give calls of "
                        "the model: a tensor, an args tuple, or an (args, kwargs) pair."
                    ) from exc
        cached.clear()  # statistics of older weights or sources are stale
        cached[key] = stats
        ctx.record(
            "quantize_calibration", batches=len(batches), seconds=time.perf_counter() - started
        )
    return cached[key]


def calibration_batches(config: Quantize, ctx: CompileContext, model: torch.nn.Module):
    """The calibration inputs as (args, kwargs) calls of `model`; without a source (only
    SmoothQuant allows none) the example inputs, with a warning."""
    source = config.calibration
    if source is None:
        if model is not ctx.model:
            raise StrategyError(
                f"Quantize.calibration: SmoothQuant (activations='int8') calibrates on calls of "
                f"{type(model).__name__}, and this graph ({type(ctx.model).__name__}) has no "
                "such example inputs; pass calibration=[batches]."
            )
        warnings.warn(
            "strato: Quantize.calibration is None, so SmoothQuant (activations='int8') measures "
            "activation ranges on strato.compile's example inputs; pass calibration=[batches] "
            "of representative inputs.",
            stacklevel=2,
        )
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
            batches.append((batch, {}))
        elif isinstance(batch, torch.Tensor):
            batches.append(((batch,), {}))
        elif isinstance(batch, dict):
            batches.append(((), batch))
        else:
            raise StrategyError(
                f"Quantize.calibration: batch {i} is a {type(batch).__name__}; give a tensor, "
                "an args tuple, a kwargs dict, or an (args, kwargs) pair."
            )
    if not batches:
        raise StrategyError("Quantize.calibration: no batches; give at least one.")
    # Calls as the model's graphs see them: defaults such as use_cache=False filled.
    defaults = capture_defaults(model)
    return [(args, {**defaults, **kwargs}) for args, kwargs in batches]
