"""Capture: trace a model into a torch.fx GraphModule of ATen ops.

`torch.export.export(strict=False)` is the primary route, unlifted with `ep.module()`
so parameters and buffers are `get_attr` nodes that alias the model's own tensors
and autograd runs through the graph. Where export fails and `torch.fx.symbolic_trace`
works, that is used instead. When both fail, one CaptureError names the module and
source line at fault.
"""

from __future__ import annotations

import inspect
import os
import traceback
from collections.abc import Mapping
from contextlib import contextmanager

import attrs
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .errors import CaptureError

INPUT_VALUES = "strato_input_values"
"""gm.meta key: {placeholder name: its fake value at capture, with symbolic sizes}."""


@attrs.frozen
class Captured:
    """A captured graph and how it was obtained."""

    gm: fx.GraphModule
    method: str
    """'export' or 'symbolic_trace'."""


@contextmanager
def model_mode(model: torch.nn.Module, training: bool):
    """Put the model (and every submodule) in train or eval mode, restoring each after."""
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def capture(
    model: torch.nn.Module,
    args: tuple = (),
    kwargs: Mapping | None = None,
    *,
    training: bool = True,
    dynamic: str = "all",
) -> Captured:
    """Trace `model(*args, **kwargs)` in the given mode into an FX GraphModule. `dynamic`:
    'all' keeps every input size symbolic where the model allows, 'batch' only dim 0
    (kernels that bake the other sizes in, e.g. fused attention), 'none' none."""
    from ..passes.recompute import CHECKPOINT_REGIONS, model_checkpoint_regions

    kwargs = dict(kwargs or {})
    with model_mode(model, training), model_checkpoint_regions(model) as checkpointed:
        try:
            gm = _export(model, args, kwargs, dynamic)
            method = "export"
        except Exception as export_exc:
            try:
                gm = _symbolic_trace(model, args, kwargs)
                method = "symbolic_trace"
            except Exception as fx_exc:
                raise _capture_error(model, kwargs, export_exc, fx_exc) from export_exc
    _bind_model_tensors(gm, model)
    annotate_module_paths(gm)
    # The trace inlined the model's own checkpoint regions; the recompute pass keeps them.
    gm.meta[CHECKPOINT_REGIONS] = checkpointed
    # The inputs' symbolic sizes as captured (later fake runs on the examples make them
    # concrete); strato.export states the size ranges an artifact serves from them.
    gm.meta[INPUT_VALUES] = {
        n.name: n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"
    }
    for node in gm.graph.nodes:
        node.meta["strato_created_by"] = "capture"
    return Captured(gm=gm, method=method)


# ------------------------------------------------------------------ export route


def _dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, batch_only: bool):
    """Mark every dim (or dim 0) of every tensor input `Dim.AUTO`: export keeps symbolic
    what the model lets vary (batch, sequence) and quietly fixes the rest (hidden size).

    Keyed like `torch.export` binds the call, so arguments caught by `**kwargs` (all of
    Hugging Face's optional inputs) are marked too."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None

    def spec(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return {d: torch.export.Dim.AUTO for d in range(1 if batch_only else x.dim())}
        return None

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _export(model, args, kwargs, dynamic) -> fx.GraphModule:
    model = _with_named_keywords(model, kwargs)
    shapes = None if dynamic == "none" else _dynamic_shapes(model, args, kwargs, dynamic == "batch")
    ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=shapes, strict=False)
    return ep.module()


class _NamedKeywords(torch.nn.Module):
    """The model with the keywords its `forward(**kwargs)` catches named in the signature.

    torch.export (2.11-2.13) pairs a `dynamic_shapes` dict with arguments caught by
    `**kwargs` wrongly (it sees them both under 'kwargs' and at the top level). This view
    shares the model's parameters, buffers and submodules (same names, same tensors) and
    calls its forward, so the graph is the model's own."""

    def __init__(self, model: torch.nn.Module, signature: inspect.Signature) -> None:
        super().__init__()
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._modules = model._modules
        self.training = model.training

        def forward(*args, **kwargs):
            return model.forward(*args, **kwargs)

        forward.__signature__ = signature
        object.__setattr__(self, "forward", forward)


def _with_named_keywords(model: torch.nn.Module, kwargs: Mapping) -> torch.nn.Module:
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return model
    params = list(signature.parameters.values())
    var_keyword = [p for p in params if p.kind is p.VAR_KEYWORD]
    caught = [k for k in kwargs if k not in signature.parameters]
    if not var_keyword or not caught:
        return model
    named = [p for p in params if p.kind is not p.VAR_KEYWORD]
    named += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in caught]
    return _NamedKeywords(model, signature.replace(parameters=named))


def _symbolic_trace(model, args, kwargs) -> fx.GraphModule:
    if kwargs:
        raise CaptureError("symbolic_trace cannot take keyword inputs")
    gm = fx.symbolic_trace(model)
    _record_values(gm, args)
    return gm


def _record_values(gm: fx.GraphModule, args: tuple) -> None:
    """Run the traced graph once on the examples, keeping each output's shape and dtype.

    Real inputs, not fake ones: FX leaves (`torch.fx.wrap`) may branch on values.
    """

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            node.meta["val"] = pytree.tree_map_only(
                torch.Tensor, lambda t: torch.empty_like(t, device="meta"), result
            )
            return result

    with torch.no_grad():
        Recorder(gm).run(*args)


def _bind_model_tensors(gm: fx.GraphModule, model: torch.nn.Module) -> None:
    """Make every parameter/buffer the graph reads the model's own tensor (no copies)."""
    originals = dict(model.named_parameters(remove_duplicate=False))
    originals.update(dict(model.named_buffers(remove_duplicate=False)))
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in originals:
            continue
        owner_path, _, attr = node.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        tensor = originals[node.target]
        current = getattr(owner, attr, None)
        if current is tensor:
            continue
        if isinstance(tensor, torch.nn.Parameter):
            owner._parameters[attr] = tensor
        else:
            owner._buffers[attr] = tensor


def annotate_module_paths(gm: fx.GraphModule) -> None:
    """Set node.meta['strato_module'] to the dotted path of the module that owns the node."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            node.meta["strato_module"] = _clean_path(path)
        elif node.op == "call_module":
            node.meta["strato_module"] = str(node.target)
        elif node.op == "get_attr":
            node.meta["strato_module"] = str(node.target).rpartition(".")[0]


def _clean_path(path: str) -> str:
    # export may spell paths as "L['self'].layers[0].mlp"; normalise to "layers.0.mlp".
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path.strip(".")


# ------------------------------------------------------------------ errors


def _cache_hint(model: torch.nn.Module, kwargs: Mapping) -> str:
    """Hugging Face models default to returning KV-cache objects; say what to pass instead."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "use_cache", False) or "use_cache" in kwargs:
        return ""
    return (
        f"{type(model).__name__} returns a KV-cache object by default (config.use_cache=True), "
        "which is no tensor a graph can return: pass example_kwargs={'use_cache': False} to "
        "strato.compile and call the compiled model with use_cache=False too."
    )


def _fault_location(model: torch.nn.Module, exc: BaseException) -> tuple[str, str]:
    """The innermost model submodule and user source line in the exception's traceback."""
    names = {id(m): name for name, m in model.named_modules()}
    module_path, source = "", ""
    torch_dir = os.path.dirname(torch.__file__)
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        filename = frame.f_code.co_filename
        if owner is not None and id(owner) in names:
            module_path = names[id(owner)] or f"<root {type(model).__name__}>"
            source = f"{filename}:{lineno}"
        elif (
            not filename.startswith(torch_dir)
            and module_path
            and "site-packages/torch" not in filename
        ):
            source = f"{filename}:{lineno}"
    return module_path, source


def _capture_error(model, kwargs, export_exc: BaseException, fx_exc: BaseException) -> CaptureError:
    module_path, source = _fault_location(model, export_exc)
    if not module_path:
        module_path, source = _fault_location(model, fx_exc)
    where = f" in module {module_path!r}" if module_path else ""
    at = f" at {source}" if source else ""
    todo = _cache_hint(model, kwargs) if _is_unknown_output_type(export_exc) else ""
    if not todo:
        todo = (
            "Python control flow that depends on tensor values cannot be traced; rewrite it "
            "with torch.where / torch.cond, move it out of forward, or pass the value as a "
            "plain Python constant in example_kwargs."
        )
    return CaptureError(
        f"could not capture {type(model).__name__}{where}{at}.\n"
        f"  torch.export said: {_first_line(export_exc)}\n"
        f"  torch.fx.symbolic_trace said: {_first_line(fx_exc)}\n"
        f"  What to do: {todo}"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _is_unknown_output_type(exc: BaseException) -> bool:
    return "not a known type" in str(exc) or "Cache" in str(exc)
