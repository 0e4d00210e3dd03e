"""FX graphs as an artifact's graph JSON: allow-listed ops and tagged values, never a pickle."""

from __future__ import annotations

import json
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..compiler.errors import StratoError
from .input_ranges import relax_size_one, value_spec

_OPERATORS = {
    f"operator.{name}": getattr(operator, name)
    for name in (
        "getitem",
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "neg",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "not_",
    )
}
_OPERATORS.update(
    {
        f"torch.{name}": getattr(torch, name)
        for name in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not")
    }
)
_TARGET_NAMES = {fn: name for name, fn in _OPERATORS.items()}
_SKIPPED_MODULES = ("_guards_fn",)
"""call_module nodes torch.export adds to re-check its shape guards; `load` checks
input shapes itself from the manifest."""


class ArtifactError(StratoError):
    """A file is not a valid Strato inference artifact, or a graph cannot be exported."""


# ---------------------------------------------------------------------- encoding


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, slice):
        return {"slice": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    raise ArtifactError(
        f"cannot export {where}: argument {value!r} of type {type(value).__name__} has no "
        "JSON form (only tensors by reference, numbers, strings, dtypes, devices and lists)."
    )


def _decode(value: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise ArtifactError(f"graph.json: malformed value {value!r}")
    ((tag, data),) = value.items()
    if tag == "node":
        if data not in nodes:
            raise ArtifactError(f"graph.json: reference to unknown or later node {data!r}")
        return nodes[data]
    if tag == "tuple":
        return tuple(_decode(v, nodes) for v in data)
    if tag == "slice":
        return slice(*(_decode(v, nodes) for v in data))
    if tag in ("dtype", "layout", "memory_format"):
        attr = getattr(torch, str(data), None)
        expected = {
            "dtype": torch.dtype,
            "layout": torch.layout,
            "memory_format": torch.memory_format,
        }[tag]
        if not isinstance(attr, expected):
            raise ArtifactError(f"graph.json: {data!r} is not a torch {tag}")
        return attr
    if tag == "device":
        return torch.device(data)
    raise ArtifactError(f"graph.json: unknown value tag {tag!r}")


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.name()  # 'aten::linear.default'
    if target in _TARGET_NAMES:
        return _TARGET_NAMES[target]
    raise ArtifactError(
        f"cannot export node {node.name!r} (module {node.meta.get('strato_module', '?')!r}): its "
        f"target {target!r} is not an ATen/strato op or an allow-listed operator."
    )


def _resolve_target(name: str) -> Any:
    if name in _OPERATORS:
        return _OPERATORS[name]
    namespace, sep, rest = name.partition("::")
    if not sep or namespace not in ("aten", "strato"):
        raise ArtifactError(
            f"graph.json: op {name!r} is not allowed (only aten::, strato:: and operators)"
        )
    if namespace == "strato":
        _import_strato_ops()
    op_name, _, overload = rest.partition(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), op_name), overload or "default")
    except (AttributeError, RuntimeError) as exc:
        if namespace == "strato":
            raise ArtifactError(
                f"graph.json: op {name!r} is neither one of Strato's own ops nor a fused "
                "kernel the artifact carries (graph.json 'kernels'); re-export the model."
            ) from exc
        raise ArtifactError(f"graph.json: op {name!r} does not exist in this torch build") from exc


def _import_strato_ops() -> None:
    """Register Strato's own ops (modules of this package, not of any model)."""
    import importlib

    for module in ("quantized_linear", "attention"):
        try:
            importlib.import_module(f"{__package__.rpartition('.')[0]}.kernels.{module}")
        except ImportError:
            pass


# ---------------------------------------------------------------------- graphs


def graph_to_json(gm: fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON form of `gm` and the tensors its get_attr nodes read."""
    from ..compiler.capture import INPUT_VALUES

    captured = gm.meta.get(INPUT_VALUES, {})
    nodes, tensors, inputs = [], {}, []
    for node in gm.graph.nodes:
        entry: dict[str, Any] = {"op": node.op, "name": node.name}
        if node.op == "placeholder":
            entry["target"] = str(node.target)
            value = captured.get(node.name, node.meta.get("val"))
            inputs.append({"name": node.name, **(value_spec(value) or {})})
        elif node.op == "get_attr":
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part)
            if not isinstance(value, torch.Tensor):
                raise ArtifactError(
                    f"cannot export get_attr {node.target!r}: a {type(value).__name__}, not a tensor."
                )
            tensors[str(node.target)] = value.detach()
            entry["target"] = str(node.target)
        elif node.op == "call_function":
            entry["target"] = _target_name(node)
            entry["args"] = _encode(list(node.args), node.name)
            entry["kwargs"] = {k: _encode(v, node.name) for k, v in node.kwargs.items()}
        elif node.op == "output":
            entry["args"] = _encode(list(node.args), node.name)
        elif node.op == "call_module" and str(node.target) in _SKIPPED_MODULES and not node.users:
            continue
        else:
            raise ArtifactError(
                f"cannot export node {node.name!r}: {node.op} {node.target!r} is not supported; "
                "only ATen/strato op calls, tensors and inputs can be exported."
            )
        nodes.append(entry)
    relax_size_one(gm, inputs, captured)
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    graph = {
        "nodes": nodes,
        "inputs": inputs,
        "orig_args": list(info.orig_args) if info is not None else None,
        "in_spec": pytree.treespec_dumps(info.in_spec) if info and info.in_spec else None,
        "out_spec": pytree.treespec_dumps(info.out_spec) if info and info.out_spec else None,
    }
    return graph, tensors


def _load_spec(text: str | None):
    """A treespec from JSON; container types this process does not know become dicts."""
    if text is None:
        return None
    try:
        return pytree.treespec_loads(text)
    except Exception:
        protocol, root = json.loads(text)

        def plain(node):
            if (
                node["type"] is not None
                and node["type"] not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE
            ):
                node = {**node, "type": "builtins.dict"}
            return {**node, "children_spec": [plain(c) for c in node["children_spec"]]}

        return pytree.treespec_loads(json.dumps([protocol, plain(root)]))


def graph_from_json(graph: dict, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the GraphModule `graph_to_json` described, on `tensors` (stored weights,
    which graph["weights"] maps its tensor names to; without that map, by the same name)."""
    stored = graph.get("weights")
    names = stored if isinstance(stored, dict) else None
    g = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    used: dict[str, torch.Tensor] = {}
    for entry in graph["nodes"]:
        op, name = entry["op"], entry["name"]
        if op == "placeholder":
            node = g.placeholder(entry["target"])
        elif op == "get_attr":
            target = entry["target"]
            key = names.get(target) if names is not None else target
            if key not in tensors:
                raise ArtifactError(f"graph.json: get_attr {target!r} has no tensor in weights")
            used[target] = tensors[key]
            node = g.get_attr(target)
        elif op == "call_function":
            target = _resolve_target(entry["target"])
            args = tuple(_decode(entry["args"], nodes))
            kwargs = {k: _decode(v, nodes) for k, v in entry["kwargs"].items()}
            node = g.call_function(target, args, kwargs)
        elif op == "output":
            node = g.output(*_decode(entry["args"], nodes))
        else:
            raise ArtifactError(f"graph.json: node op {op!r} is not allowed")
        node.name = name
        nodes[name] = node
    root = torch.nn.Module()
    for target, tensor in (used if names is not None else tensors).items():
        owner = root
        *parents, attr = target.split(".")
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_buffer(attr, tensor)
    if graph.get("in_spec") is not None:
        g._codegen = fx.graph._PyTreeCodeGen(
            fx.graph._PyTreeInfo(
                graph["orig_args"], _load_spec(graph["in_spec"]), _load_spec(graph["out_spec"])
            )
        )
    gm = fx.GraphModule(root, g)
    gm.graph.lint()
    return gm
