"""How a call reaches a captured graph: bind it like the model would, describe its signature.

A graph captured by torch.export takes exactly the argument structure of its example. Users
call the model as the model allows: positionally or by keyword, leaving out arguments
that have defaults. `bind_call` turns any such call into one canonical form (parameters in
signature order, positional while nothing before them is left out, then keywords; an
argument given as its default counts as left out), and `CallSignature` describes what a
graph depends on: which arguments are given, their non-tensor values (baked into the
graph) and each tensor's rank, dtype and device (sizes are symbolic, see capture).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import attrs
import torch
from torch.utils import _pytree as pytree

from ..compiler.errors import InputError


@attrs.frozen
class TensorSpec:
    """What a graph fixes about a tensor input: rank, dtype and device (not sizes)."""

    ndim: int
    dtype: torch.dtype
    device: str
    """The device type ('cpu', 'cuda'): a graph runs on any index of it."""

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"a {self.ndim}-d {dtype} tensor on {self.device}"


@attrs.frozen
class CallSignature:
    """The part of a call a captured graph depends on; equal signatures share a graph."""

    names: tuple[str, ...]
    """Given arguments in canonical order ('0', '1'... for positional-only ones)."""
    structure: tuple[str, ...]
    """Each argument's pytree structure (a tensor, a list of tensors, a constant...)."""
    constants: tuple
    """Each argument's non-tensor leaves (use_cache=False, return_dict=True...)."""
    tensors: tuple[tuple[TensorSpec, ...], ...]
    """Each argument's tensor leaves."""

    def same_arguments(self, other: CallSignature) -> bool:
        """Same arguments, structures and constants: only tensor ranks/dtypes may differ."""
        return (self.names, self.structure, self.constants) == (
            other.names,
            other.structure,
            other.constants,
        )

    def difference(self, other: CallSignature) -> str:
        """What this call gives that `other` (a captured signature) does not, in words."""
        added = [n for n in self.names if n not in other.names]
        missing = [n for n in other.names if n not in self.names]
        parts = [f"{n!r} given" for n in added] + [f"{n!r} left out" for n in missing]
        for name in self.names:
            if name in other.names:
                mine, theirs = self._argument(name), other._argument(name)
                if mine[:2] != theirs[:2]:
                    parts.append(
                        f"{name!r}={_constant_text(mine)} (captured: {_constant_text(theirs)})"
                    )
        return ", ".join(parts) or "the same arguments"

    def _argument(self, name: str) -> tuple:
        i = self.names.index(name)
        return self.structure[i], self.constants[i], self.tensors[i]


def _constant_text(argument: tuple) -> str:
    structure, constants, tensors = argument
    if tensors:
        return "a tensor" if len(tensors) == 1 else f"{len(tensors)} tensors"
    return ", ".join(repr(c) for c in constants) if constants else structure


@attrs.frozen
class BoundCall:
    """A call in canonical form, ready for the graph of its signature."""

    args: tuple
    kwargs: dict
    signature: CallSignature


def forward_parameters(model: torch.nn.Module) -> list[inspect.Parameter] | None:
    """The parameters of model.forward, or None when it has no inspectable signature."""
    signature = forward_signature(model)
    return None if signature is None else list(signature.parameters.values())


def forward_signature(model: torch.nn.Module) -> inspect.Signature | None:
    """inspect.signature(model.forward), computed once per forward function (every call
    binds through it, decode steps included)."""
    forward = model.forward
    func = getattr(forward, "__func__", forward)
    try:
        signature = _signature_of(func)
    except (TypeError, ValueError):
        return None
    if hasattr(forward, "__self__"):  # a bound method: drop `self`
        params = list(signature.parameters.values())[1:]
        signature = signature.replace(parameters=params)
    return signature


@functools.lru_cache(maxsize=256)
def _signature_of(func) -> inspect.Signature:
    return inspect.signature(func)


def bind_call(
    model: torch.nn.Module, args: tuple, kwargs: dict, defaults: dict | None = None
) -> BoundCall:
    """`model(*args, **kwargs)` in canonical form; `defaults` fill arguments the call leaves
    out (see `capture_defaults`). A call the model would refuse raises an InputError."""
    signature = forward_signature(model)
    if signature is None:
        return BoundCall(tuple(args), dict(kwargs), describe(tuple(args), dict(kwargs)))
    params = list(signature.parameters.values())
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        names = ", ".join(p.name for p in params)
        raise InputError(
            f"{type(model).__name__}.forward({names}) cannot take this call: {exc}. Call the "
            "compiled model as you would call the model."
        ) from None
    given = bound.arguments
    for name, value in (defaults or {}).items():
        given.setdefault(name, value)

    def left_out(p: inspect.Parameter) -> bool:
        return p.name not in given or _is_default(given[p.name], p)

    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extra = next((given.get(p.name, ()) for p in params if p.kind is p.VAR_POSITIONAL), ())
    # Parameters that can only be passed by position up to the last one given (all of them
    # when *args are given) travel positionally, defaults filling what was left out.
    forced = len(positional) if extra else 0
    for i, p in enumerate(positional):
        if p.kind is p.POSITIONAL_ONLY and not left_out(p):
            forced = max(forced, i + 1)
    out_args: list = []
    out_kwargs: dict = {}
    for i, p in enumerate(positional):
        if i < forced:
            out_args.append(given[p.name] if p.name in given else p.default)
        elif not left_out(p):
            if len(out_args) == i:
                out_args.append(given[p.name])
            else:  # something before it was left out: by keyword from here on
                out_kwargs[p.name] = given[p.name]
    out_args += list(extra)
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not left_out(p):
            out_kwargs[p.name] = given[p.name]
        elif p.kind is p.VAR_KEYWORD:
            out_kwargs.update(given.get(p.name, {}))
    return BoundCall(tuple(out_args), out_kwargs, describe(tuple(out_args), out_kwargs, params))


def capture_defaults(model: torch.nn.Module) -> dict:
    """Arguments every capture passes unless the call gives them: `use_cache=False` for
    Hugging Face models that would otherwise return a KV-cache object, which is no tensor a
    graph can return (their outputs then carry past_key_values=None; generation runs
    through `compiled.generate`, which keeps its own cache)."""
    params = forward_parameters(model) or []
    config = getattr(model, "config", None)
    if any(p.name == "use_cache" for p in params) and getattr(config, "use_cache", False):
        return {"use_cache": False}
    return {}


def _is_default(value: Any, p: inspect.Parameter) -> bool:
    # Identity, not equality: a tensor is never "the default", and None / True / False /
    # small ints given explicitly are the same objects as the defaults they equal.
    return p.default is not p.empty and value is p.default


def describe(
    args: tuple, kwargs: dict, params: list[inspect.Parameter] | None = None
) -> CallSignature:
    """The CallSignature of a call already in canonical form."""
    positional = [
        p.name for p in params or [] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    names = [positional[i] if i < len(positional) else str(i) for i in range(len(args))]
    values = [*args, *kwargs.values()]
    names += list(kwargs)
    structure, constants, tensors = [], [], []
    for value in values:
        if isinstance(value, torch.Tensor):  # the common case, without pytree (decode loops)
            structure.append("*")
            constants.append(())
            tensors.append((_tensor_spec(value),))
            continue
        leaves, spec = pytree.tree_flatten(value)
        structure.append(str(spec))
        constants.append(tuple(_constant(x) for x in leaves if not isinstance(x, torch.Tensor)))
        tensors.append(tuple(_tensor_spec(x) for x in leaves if isinstance(x, torch.Tensor)))
    return CallSignature(tuple(names), tuple(structure), tuple(constants), tuple(tensors))


def _tensor_spec(x: torch.Tensor) -> TensorSpec:
    return TensorSpec(x.dim(), x.dtype, x.device.type)


def _constant(value: Any):
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def check_tensors(call: CallSignature, captured: list[CallSignature]) -> None:
    """Raise an InputError naming the input when `call` gives the same arguments as a
    captured signature but some tensor has a rank/dtype/device no captured graph takes."""
    same = [c for c in captured if c.same_arguments(call)]
    if not same or any(c.tensors == call.tensors for c in same):
        return
    for i, name in enumerate(call.names):
        mine = call.tensors[i]
        if all(c.tensors[i] != mine for c in same):
            theirs = " or ".join(sorted({", ".join(map(str, c.tensors[i])) for c in same}))
            raise InputError(
                f"input {name!r} is {', '.join(map(str, mine))}; the compiled graphs take "
                f"{theirs} (from the example inputs). Pass {name!r} with that rank and dtype, "
                "or compile with an example that has yours."
            )


def position_limit(model: torch.nn.Module) -> tuple[int, str] | None:
    """The longest sequence a model with a learned position table takes, and where that
    limit comes from; None when it has no such table (rotary or relative positions)."""
    config = getattr(model, "config", None)
    for field in ("max_position_embeddings", "n_positions"):
        limit = getattr(config, field, None)
        if not isinstance(limit, int):
            continue
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding) and module.num_embeddings == limit:
                return limit, f"config.{field}, the rows of its position table {name!r}"
    return None


def check_sequence_length(
    model: torch.nn.Module, call: BoundCall, limit: tuple[int, str] | None
) -> None:
    """Raise an InputError naming the input when a token-like input (integer or bool, dim 1
    = sequence) is longer than the model's position table, before the graph indexes past it."""
    if limit is None:
        return
    most, source = limit
    names = [p.name for p in forward_parameters(model) or []]
    for name, value in [*zip(names, call.args), *call.kwargs.items()]:
        if (
            isinstance(value, torch.Tensor)
            and value.dim() >= 2
            and not value.is_floating_point()
            and value.shape[1] > most
        ):
            raise InputError(
                f"input {name!r} has {value.shape[1]} positions (dim 1), more than the "
                f"{most} that {type(model).__name__} takes ({source}). Cut the sequence to "
                f"at most {most} tokens, or split it."
            )
