"""Fused regions: a small op list cut from the ATen graph, its torch reference, and the
pointwise expression code (forward and reverse mode) the templates are filled with.

A region's ops refer to their operands by `Ref`: `in<i>` for the region's i-th tensor
input, `v<k>` for the k-th op's value, or `seed` (the per-call seed of random dropout).
Everything else in `args` is a constant. The reference runs the original ATen ops on the
inputs, so it matches eager exactly (random dropout excepted: it becomes
`seeded_dropout`, whose mask a backward can recompute).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import attrs
import torch
from torch.utils import _pytree as pytree

aten = torch.ops.aten


@attrs.frozen
class Ref:
    """An operand that is a region input ('in0', 'in1'...) or an earlier op's value."""

    name: str


@attrs.frozen
class RegionOp:
    """One ATen op of the region: `name = target(*args, **kwargs)`."""

    name: str
    target: Any = attrs.field(eq=False)
    args: tuple
    kwargs: dict = attrs.field(factory=dict, eq=False)

    @property
    def op(self) -> str:
        """The op's name: stable across processes (it goes into the structural hash)."""
        if isinstance(self.target, torch._ops.OpOverload):
            return str(self.target)
        return f"{self.target.__module__}.{self.target.__qualname__}"


@attrs.frozen
class Region:
    """A fused region: its kind, ops, inputs and exported values.

    kind: 'pointwise' (elementwise ops), 'row' (a pointwise prologue, then a norm or
    softmax over the last dim) or 'cross_entropy' (log-softmax + NLL, mean-reduced).
    """

    kind: str
    name: str
    """Readable name for messages and records, e.g. 'blocks.0.ln2:layer_norm_1'."""
    ops: tuple[RegionOp, ...]
    n_inputs: int
    input_dtypes: tuple[torch.dtype, ...]
    outputs: tuple[str, ...]
    """Op names whose values leave the region, in the order the fused op returns them."""
    output_dtypes: tuple[torch.dtype, ...]
    row_op: str | None = None
    """For 'row' regions: the name of the op reducing over the last dim."""
    column_inputs: tuple[int, ...] = ()
    """For 'row' regions: prologue inputs that are vectors over the last dim (a bias):
    read once per tile, their gradient summed over rows inside the kernel."""

    @property
    def n_dropout(self) -> int:
        """How many random dropouts the region holds (they need a seed per call)."""
        return sum(op.target is seeded_dropout for op in self.ops)

    def op_by_name(self, name: str) -> RegionOp:
        return next(op for op in self.ops if op.name == name)

    def signature(self) -> str:
        """A text of the region's structure (no node names, no shapes): the cache key."""
        rename = {f"in{i}": f"in{i}" for i in range(self.n_inputs)} | {"seed": "seed"}
        for i, op in enumerate(self.ops):
            rename[op.name] = f"v{i}"

        def show(a):
            if isinstance(a, Ref):
                return f"%{rename[a.name]}"
            return repr(a)

        lines = [f"{self.kind} inputs={[str(d) for d in self.input_dtypes]}"]
        for op in self.ops:
            args = ", ".join(show(a) for a in pytree.tree_leaves(op.args, is_leaf=_is_ref))
            kw = ", ".join(f"{k}={show(v)}" for k, v in sorted(op.kwargs.items()))
            lines.append(f"{rename[op.name]} = {op.op}({args}; {kw})")
        lines.append(
            f"outputs={[rename[o] for o in self.outputs]} {[str(d) for d in self.output_dtypes]}"
        )
        if self.row_op:
            lines.append(f"row={rename[self.row_op]} columns={list(self.column_inputs)}")
        return "\n".join(lines)

    def digest(self) -> str:
        return hashlib.sha256(self.signature().encode()).hexdigest()[:12]


def _is_ref(x) -> bool:
    return isinstance(x, Ref)


def run_reference(
    region: Region, inputs: list[torch.Tensor], seed: int | None = None
) -> list[torch.Tensor]:
    """Run the region's ATen ops on `inputs`; returns the exported values. `seed` feeds
    the region's random dropouts (None: shapes only, for fake tensors)."""
    env: dict[str, Any] = {f"in{i}": x for i, x in enumerate(inputs)}
    env["seed"] = seed

    def fetch(a):
        return env[a.name] if isinstance(a, Ref) else a

    for op in region.ops:
        args = pytree.tree_map(fetch, op.args, is_leaf=_is_ref)
        kwargs = pytree.tree_map(fetch, op.kwargs, is_leaf=_is_ref)
        env[op.name] = op.target(*args, **kwargs)
    return [env[name] for name in region.outputs]


def seeded_dropout(x: torch.Tensor, p: float, seed: int | None, salt: int) -> torch.Tensor:
    """Dropout whose mask is a function of (seed, salt), so a backward can recompute it.

    Fused regions use it in place of aten.dropout: the fused op draws one seed per call.
    The Triton kernels draw their masks from Philox instead, so the two backends keep
    different (equally distributed) elements. With seed None only the shape matters."""
    if seed is None:
        return x * (1.0 / (1.0 - p))
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed * 64 + salt)
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep * (1.0 / (1.0 - p))


# ---------------------------------------------------------------------- pointwise ops
# Each fusible elementwise ATen op, the expression of its value (fp32) and of the
# gradient it passes to each operand given `g`, its output's gradient.

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = math.sqrt(2.0 / math.pi)

POINTWISE_TARGETS: dict[Any, str] = {
    aten.add.Tensor: "add",
    aten.add.Scalar: "add",
    aten.sub.Tensor: "sub",
    aten.sub.Scalar: "sub",
    aten.rsub.Scalar: "rsub",
    aten.mul.Tensor: "mul",
    aten.mul.Scalar: "mul",
    aten.div.Tensor: "div",
    aten.div.Scalar: "div",
    aten.neg.default: "neg",
    aten.gelu.default: "gelu",
    aten.silu.default: "silu",
    aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid",
    aten.tanh.default: "tanh",
    aten.exp.default: "exp",
    aten.rsqrt.default: "rsqrt",
    aten.pow.Tensor_Scalar: "pow",
    aten.dropout.default: "identity",
    seeded_dropout: "dropout",
    aten.clone.default: "identity",
    aten._to_copy.default: "cast",
    aten.to.dtype: "cast",
}

TL_DTYPES = {
    torch.float32: "tl.float32",
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float64: "tl.float64",
}


def pointwise_kind(target, args: tuple, kwargs: dict) -> str | None:
    """The pointwise op kind for an ATen call, or None when it cannot fuse as such."""
    kind = POINTWISE_TARGETS.get(target)
    if kind is None:
        return None
    if kind == "div" and kwargs.get("rounding_mode") is not None:
        return None
    if target is aten.dropout.default:
        # Identity in eval or with p == 0; else a random mask (see seeded_dropout).
        p, train = (list(args[1:]) + [kwargs.get("p", 0.5), kwargs.get("train", True)])[:2]
        if p == 0 or train is False:
            return "identity"
        return "dropout" if isinstance(p, float | int) and 0 < p < 1 else None
    if kind == "cast":
        allowed = {"dtype", "non_blocking", "copy", "memory_format"}
        if (
            set(kwargs) - allowed
            or kwargs.get("dtype", args[1] if len(args) > 1 else None) not in TL_DTYPES
        ):
            return None
        if target is aten._to_copy.default and len(args) > 1:
            return None
    if kind == "pow" and not isinstance(args[1], int | float):
        return None
    if kind == "gelu" and kwargs.get("approximate", "none") not in ("none", "tanh"):
        return None
    return kind


def _is_operand(rest: tuple) -> bool:
    """Whether an op's second argument is a value operand (not a dtype or other option)."""
    return bool(rest) and isinstance(rest[0], Ref | int | float) and not isinstance(rest[0], bool)


def _const(x) -> str:
    return repr(float(x))


def _pow(a: str, e: float) -> str:
    """`a ** e` as Triton code: products for small integer powers, else exp/log (a > 0)."""
    if e == 0:
        return f"({a} * 0.0 + 1.0)"
    if e.is_integer() and 1 <= e <= 4:
        return "(" + " * ".join([a] * int(e)) + ")"
    if e == 0.5:
        return f"tl.sqrt({a})"
    if e == -0.5:
        return f"tl.rsqrt({a})"
    if e.is_integer() and -4 <= e <= -1:
        return "(1.0 / (" + " * ".join([a] * int(-e)) + "))"
    return f"tl.exp({e!r} * tl.log({a}))"


# ---------------------------------------------------------------------- row ops
# The ops that reduce over the last dim, with the names of their arguments.

ROW_TARGETS: dict[Any, tuple[str, tuple[str, ...]]] = {
    aten.layer_norm.default: (
        "layer_norm",
        ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
    ),
    aten.rms_norm.default: ("rms_norm", ("input", "normalized_shape", "weight", "eps")),
    aten.softmax.int: ("softmax", ("input", "dim", "dtype")),
    aten._softmax.default: ("softmax", ("input", "dim", "half_to_float")),
    aten.log_softmax.int: ("log_softmax", ("input", "dim", "dtype")),
    aten._log_softmax.default: ("log_softmax", ("input", "dim", "half_to_float")),
}


@attrs.frozen
class RowOp:
    """A row op's parts: kind, its input, weight/bias operands and eps."""

    kind: str
    input: Any
    weight: Any = None
    bias: Any = None
    eps: float | None = None


def row_op_parts(target, args: tuple, kwargs: dict, ndim: int) -> RowOp | None:
    """The parts of a row op over the last dim of an `ndim`-d input, else None."""
    if target not in ROW_TARGETS:
        return None
    kind, names = ROW_TARGETS[target]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if kind in ("layer_norm", "rms_norm"):
        shape = bound.get("normalized_shape")
        if not isinstance(shape, list | tuple) or len(shape) != 1:
            return None
        eps = bound.get("eps", 1e-5 if kind == "layer_norm" else None)
        return RowOp(kind, bound["input"], bound.get("weight"), bound.get("bias"), eps)
    dim = bound.get("dim")
    if not isinstance(dim, int) or dim not in (-1, ndim - 1):
        return None
    if bound.get("dtype") is not None or bound.get("half_to_float"):
        return None
    return RowOp(kind, bound["input"])


class PointwiseCode:
    """Forward and reverse-mode Triton expression lines for a list of pointwise ops.

    Operand names: region inputs are `x_in<i>` (loaded by the template), op values
    are `v_<name>`, gradients `g_<name>` / `g_in<i>`. All arithmetic is fp32.
    """

    def __init__(self, ops: tuple[RegionOp, ...]):
        self.ops = ops
        self.forward: list[str] = []
        self.backward: list[str] = []
        for op in ops:
            self.forward.append(f"v_{op.name} = {self._value(op)}")

    @staticmethod
    def var(a) -> str:
        if isinstance(a, Ref):
            return f"x_{a.name}" if a.name.startswith("in") else f"v_{a.name}"
        return _const(a)

    @staticmethod
    def grad(a) -> str:
        return f"g_{a.name}"

    def _value(self, op: RegionOp) -> str:
        kind = pointwise_kind(op.target, op.args, op.kwargs)
        a = self.var(op.args[0])
        b = self.var(op.args[1]) if _is_operand(op.args[1:]) else None
        alpha = _const(op.kwargs.get("alpha", 1))
        match kind:
            case "add":
                return f"{a} + {b} * {alpha}"
            case "sub":
                return f"{a} - {b} * {alpha}"
            case "rsub":
                return f"{b} - {a} * {alpha}"
            case "mul":
                return f"{a} * {b}"
            case "div":
                return f"{a} / {b}"
            case "neg":
                return f"-{a}"
            case "gelu" if op.kwargs.get("approximate", "none") == "tanh":
                return f"0.5 * {a} * (1.0 + _tanh({_GELU_TANH_C!r} * ({a} + 0.044715 * {a} * {a} * {a})))"
            case "gelu":
                return f"0.5 * {a} * (1.0 + tl.erf({a} * {_SQRT1_2!r}))"
            case "silu":
                return f"{a} * tl.sigmoid({a})"
            case "relu":
                return f"tl.maximum({a}, 0.0)"
            case "sigmoid":
                return f"tl.sigmoid({a})"
            case "tanh":
                return f"_tanh({a})"
            case "exp":
                return f"tl.exp({a})"
            case "rsqrt":
                return f"tl.rsqrt({a})"
            case "pow":
                return _pow(a, float(op.args[1]))
            case "identity":
                return a
            case "dropout":
                p, salt = float(op.args[1]), int(op.args[3])
                return f"tl.where(_keep(seed, offs, {salt}, {p!r}), {a} * {1.0 / (1.0 - p)!r}, 0.0)"
            case "cast":
                dtype = op.kwargs.get("dtype", op.args[1] if len(op.args) > 1 else None)
                # Round through the target dtype so values match eager's rounding.
                return f"{a}.to({TL_DTYPES[dtype]}).to(tl.float32)"
        raise ValueError(f"{op.op} is not a fusible pointwise op")

    def reverse(self, needs_grad: set[str]) -> list[str]:
        """Lines accumulating `g_*` for every operand in `needs_grad` (names of refs)."""
        lines = []
        for op in reversed(self.ops):
            g = f"g_{op.name}"
            kind = pointwise_kind(op.target, op.args, op.kwargs)
            a_ref = op.args[0]
            b_ref = op.args[1] if _is_operand(op.args[1:]) else None
            a, b = self.var(a_ref), (self.var(b_ref) if b_ref is not None else None)
            y = f"v_{op.name}"
            alpha = _const(op.kwargs.get("alpha", 1))
            contributions: list[tuple[Any, str]] = []
            match kind:
                case "add":
                    contributions = [(a_ref, g), (b_ref, f"{g} * {alpha}")]
                case "sub":
                    contributions = [(a_ref, g), (b_ref, f"-{g} * {alpha}")]
                case "rsub":
                    contributions = [(a_ref, f"-{g} * {alpha}"), (b_ref, g)]
                case "mul":
                    contributions = [(a_ref, f"{g} * {b}"), (b_ref, f"{g} * {a}")]
                case "div":
                    contributions = [(a_ref, f"{g} / {b}"), (b_ref, f"-{g} * {a} / ({b} * {b})")]
                case "neg":
                    contributions = [(a_ref, f"-{g}")]
                case "gelu" if op.kwargs.get("approximate", "none") == "tanh":
                    inner = f"{_GELU_TANH_C!r} * ({a} + 0.044715 * {a} * {a} * {a})"
                    t = f"_tanh({inner})"
                    d = (
                        f"0.5 * (1.0 + {t}) + 0.5 * {a} * (1.0 - {t} * {t}) * "
                        f"{_GELU_TANH_C!r} * (1.0 + 3.0 * 0.044715 * {a} * {a})"
                    )
                    contributions = [(a_ref, f"{g} * ({d})")]
                case "gelu":
                    d = (
                        f"0.5 * (1.0 + tl.erf({a} * {_SQRT1_2!r})) + "
                        f"{a} * tl.exp(-0.5 * {a} * {a}) * {_INV_SQRT_2PI!r}"
                    )
                    contributions = [(a_ref, f"{g} * ({d})")]
                case "silu":
                    s = f"tl.sigmoid({a})"
                    contributions = [(a_ref, f"{g} * {s} * (1.0 + {a} * (1.0 - {s}))")]
                case "relu":
                    contributions = [(a_ref, f"tl.where({a} > 0.0, {g}, 0.0)")]
                case "sigmoid":
                    contributions = [(a_ref, f"{g} * {y} * (1.0 - {y})")]
                case "tanh":
                    contributions = [(a_ref, f"{g} * (1.0 - {y} * {y})")]
                case "exp":
                    contributions = [(a_ref, f"{g} * {y}")]
                case "rsqrt":
                    contributions = [(a_ref, f"-0.5 * {g} * {y} * {y} * {y}")]
                case "pow":
                    e = float(op.args[1])
                    contributions = [(a_ref, f"{g} * {e!r} * {_pow(a, e - 1.0)}")]
                case "identity" | "cast":
                    contributions = [(a_ref, g)]
                case "dropout":
                    p, salt = float(op.args[1]), int(op.args[3])
                    keep = f"_keep(seed, offs, {salt}, {p!r})"
                    contributions = [(a_ref, f"tl.where({keep}, {g} * {1.0 / (1.0 - p)!r}, 0.0)")]
            for ref, expr in contributions:
                if isinstance(ref, Ref) and ref.name in needs_grad:
                    lines.append(f"g_{ref.name} += {expr}")
        return lines


# ---------------------------------------------------------------------- from FX nodes


def region_from_nodes(
    kind: str, name: str, members: list, outputs: list, row_op=None, column_inputs=None
) -> tuple[Region, list]:
    """Cut `members` (FX nodes in graph order) into a Region; returns it and its input nodes.

    Node operands outside the region become inputs `in0, in1, ...` (first use first).
    """
    import torch.fx as fx

    # Values are named by position (v0, v1...), so equal structures give equal sources.
    value = {n.name: f"v{i}" for i, n in enumerate(members)}
    inputs: list[fx.Node] = []

    def ref(a):
        if isinstance(a, fx.Node):
            if a.name in value:
                return Ref(value[a.name])
            if a not in inputs:
                inputs.append(a)
            return Ref(f"in{inputs.index(a)}")
        return a

    ops = []
    for node in members:
        args = pytree.tree_map(ref, node.args)
        kwargs = pytree.tree_map(ref, dict(node.kwargs))
        if pointwise_kind(node.target, node.args, dict(node.kwargs)) == "dropout":
            p = (list(node.args[1:]) + [node.kwargs.get("p", 0.5)])[0]
            salt = sum(op.target is seeded_dropout for op in ops)
            ops.append(RegionOp(value[node.name], seeded_dropout, (args[0], p, Ref("seed"), salt)))
            continue
        ops.append(RegionOp(value[node.name], node.target, tuple(args), kwargs))
    region = Region(
        kind=kind,
        name=name,
        ops=tuple(ops),
        n_inputs=len(inputs),
        input_dtypes=tuple(n.meta["val"].dtype for n in inputs),
        outputs=tuple(value[n.name] for n in outputs),
        output_dtypes=tuple(n.meta["val"].dtype for n in outputs),
        row_op=value[row_op.name] if row_op is not None else None,
        column_inputs=tuple(i for i, n in enumerate(inputs) if column_inputs and column_inputs(n)),
    )
    return region, inputs


# ---------------------------------------------------------------------- JSON form
# How an exported artifact carries a region, so a fresh process can register its fused op:
# only ATen ops and `seeded_dropout` may be named, and constants are JSON with tagged
# dtypes and tuples (so the signature, hence the op name and the source, come out equal).

_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


class RegionFormatError(ValueError):
    """A region's JSON form names something other than an ATen op or a plain constant."""


def region_to_json(region: Region) -> dict:
    """The JSON form of `region` (see `region_from_json`)."""
    return {
        "kind": region.kind,
        "name": region.name,
        "ops": [
            {
                "name": op.name,
                "target": op.op,
                "args": _to_json(op.args),
                "kwargs": {k: _to_json(v) for k, v in op.kwargs.items()},
            }
            for op in region.ops
        ],
        "n_inputs": region.n_inputs,
        "input_dtypes": [_to_json(d) for d in region.input_dtypes],
        "outputs": list(region.outputs),
        "output_dtypes": [_to_json(d) for d in region.output_dtypes],
        "row_op": region.row_op,
        "column_inputs": list(region.column_inputs),
    }


def region_from_json(data: dict) -> Region:
    """The Region `region_to_json` wrote; RegionFormatError names what is not allowed."""
    try:
        ops = tuple(
            RegionOp(
                str(op["name"]),
                _target(op["target"]),
                _from_json(op["args"]),
                {str(k): _from_json(v) for k, v in op["kwargs"].items()},
            )
            for op in data["ops"]
        )
        return Region(
            kind=str(data["kind"]),
            name=str(data["name"]),
            ops=ops,
            n_inputs=int(data["n_inputs"]),
            input_dtypes=tuple(_from_json(d) for d in data["input_dtypes"]),
            outputs=tuple(str(o) for o in data["outputs"]),
            output_dtypes=tuple(_from_json(d) for d in data["output_dtypes"]),
            row_op=None if data["row_op"] is None else str(data["row_op"]),
            column_inputs=tuple(int(i) for i in data["column_inputs"]),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise RegionFormatError(f"malformed region ({type(exc).__name__}: {exc})") from exc


def _target(name: str):
    if name == f"{seeded_dropout.__module__}.{seeded_dropout.__qualname__}":
        return seeded_dropout
    namespace, _, rest = str(name).partition(".")
    op_name, _, overload = rest.partition(".")
    if namespace != "aten" or not op_name:
        raise RegionFormatError(f"region op {name!r} is not an ATen op")
    try:
        return getattr(getattr(aten, op_name), overload or "default")
    except AttributeError as exc:
        raise RegionFormatError(f"region op {name!r} does not exist in this torch") from exc


def _to_json(value):
    if isinstance(value, Ref):
        return {"ref": value.name}
    if isinstance(value, _TORCH_ENUMS):
        return {type(value).__name__: str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"tuple": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise RegionFormatError(f"region constant {value!r} ({type(value).__name__}) has no JSON form")


def _from_json(value):
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise RegionFormatError(f"malformed region value {value!r}")
    ((tag, data),) = value.items()
    if tag == "ref":
        return Ref(str(data))
    if tag == "tuple":
        return tuple(_from_json(v) for v in data)
    kinds = {
        type(t).__name__: type(t) for t in (torch.float32, torch.strided, torch.contiguous_format)
    }
    if tag in kinds:
        found = getattr(torch, str(data), None)
        if isinstance(found, kinds[tag]):
            return found
    raise RegionFormatError(f"malformed region value {value!r}")
