"""Exported graph inputs' dtypes, shapes and size ranges: recorded at export, checked on load."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..compiler.errors import InputError


def value_spec(value: Any) -> dict | None:
    """dtype, shape (None: a symbolic size) and each symbolic size's [low, high] range
    (high None: no bound) of a placeholder's fake value."""
    if not isinstance(value, torch.Tensor):
        return None
    shape = [int(d) if isinstance(d, int) else None for d in value.shape]
    ranges = [None if isinstance(d, int) else _size_range(d) for d in value.shape]
    return {"dtype": str(value.dtype).removeprefix("torch."), "shape": shape, "range": ranges}


def _size_range(size) -> list[int | None]:
    """[low, high] a symbolic size may take, from the shape environment export built."""
    try:
        bounds = size.node.shape_env.bound_sympy(size.node.expr)
    except AttributeError:
        return [0, None]

    def bound(value):
        return int(value) if getattr(value, "is_Integer", False) else None

    return [bound(bounds.lower) or 0, bound(bounds.upper)]


def cap_input_ranges(inputs: list[dict], caps: dict[str, dict[int, int]]) -> None:
    """Bound symbolic sizes by what serving allows (caps[input name][dim] = most)."""
    for spec in inputs:
        for dim, most in caps.get(spec.get("name"), {}).items():
            ranges = spec.get("range")
            if ranges and dim < len(ranges) and ranges[dim] is not None:
                low, high = ranges[dim]
                ranges[dim] = [low, most if high is None else min(high, most)]


def relax_size_one(gm: fx.GraphModule, inputs: list[dict], captured: dict) -> None:
    """Export states a symbolic size's range from 2 (it treats 1 apart); where the graph's
    own shape guards (export's `_guards_fn`, the checks the compiled model runs) accept
    size 1 for it (in every input dim of that size at once), the artifact serves 1 too.
    Probed on meta tensors: nothing computes."""
    guards = getattr(gm, "_guards_fn", None)
    guard_node = next(
        (n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"), None
    )
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if guards is None or guard_node is None or len(placeholders) != len(inputs):
        return
    sizes: dict[str, list[tuple[int, int]]] = {}  # symbol -> (input, dim) it sizes
    for i, node in enumerate(placeholders):
        value = captured.get(node.name)
        for dim, size in enumerate(getattr(value, "shape", ())):
            if not isinstance(size, int) and inputs[i]["range"][dim][0] == 2:
                sizes.setdefault(str(size), []).append((i, dim))
    index = {n: i for i, n in enumerate(placeholders)}
    for where in sizes.values():
        shapes = {i: list(placeholders[i].meta["val"].shape) for i, _ in where}
        for i, dim in where:
            shapes[i][dim] = 1
        args = []
        for a in guard_node.args:
            value = placeholders[index[a]].meta.get("val") if a in index else a
            if isinstance(value, torch.Tensor):
                shape = shapes.get(index[a], tuple(value.shape))
                value = torch.empty(shape, dtype=value.dtype, device="meta")
            args.append(value)
        try:
            guards(*args)
        except Exception:  # the guards refuse 1 (or cannot run on meta tensors)
            continue
        for i, dim in where:
            inputs[i]["range"][dim][0] = 1


def _dim_text(size: int | None, bounds: list | None) -> str:
    if size is not None:
        return str(size)
    if bounds is None:
        return "*"
    low, high = bounds
    return f"{low}..{high}" if high is not None else f"{low}+"


def check_input(spec: dict, value: torch.Tensor) -> None:
    """An InputError when `value` is not of the dtype and within the sizes the graph serves."""
    shape = spec["shape"]
    ranges = spec.get("range") or [None] * len(shape)
    dtype = str(value.dtype).removeprefix("torch.")
    bad = None
    if len(shape) != value.dim():
        bad = f"it has {value.dim()} dims, the graph takes {len(shape)}"
    elif dtype != spec["dtype"]:
        bad = f"its dtype is {dtype}"
    else:
        for d, (size, bounds, got) in enumerate(zip(shape, ranges, value.shape)):
            if size is not None and got != size:
                bad = f"dim {d} is {got}; this graph fixed it to {size}"
            elif size is None and bounds is not None:
                low, high = bounds
                if got < low or (high is not None and got > high):
                    bad = f"dim {d} is {got}, outside the {_dim_text(None, bounds)} it serves"
            if bad:
                break
    if bad is None:
        return
    want = ", ".join(_dim_text(s, r) for s, r in zip(shape, ranges))
    raise InputError(
        f"loaded model: input {spec['name']!r} must be {spec['dtype']}[{want}] (a..b: any "
        f"size from a to b), got {dtype}{list(value.shape)}: {bad}. Sizes outside the range "
        "need a model compiled (and exported) for them."
    )
