"""A state manager's training state as layout-independent pieces, and back.

Every tensor is named as in a checkpoint: the model's own tensors as 'model/<name>' (tied
ones once, under their first name), optimizer states as 'optim/<param name>/<key>'. Each
holds this rank's *piece*, described by the model tensor's `TensorLayout`
(compiler/layout.py): optimizer states shaped like their parameter's optimizer tensor follow
its layout, the rest (AdamW's `step`) are whole on every rank. Data parallelism and ZeRO
use these functions through their `state_dict` / `load_state_dict`
(runtime/state_manager.py), so checkpoints and `full_state_dict` never know which manager
made the pieces.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from ..compiler.layout import TensorLayout, intervals, model_layout, state_names
from . import collectives


@attrs.define
class ShardedState:
    """What a state manager saves or loads on this rank."""

    tensors: dict[str, torch.Tensor]
    """By checkpoint name: this rank's piece (owned piece for saving; for loading, what the
    rank needs: the whole tensor where the model keeps it whole)."""
    layouts: dict[str, TensorLayout]
    """Layout of each entry of `tensors` (an optimizer state's is its parameter's)."""
    follows: dict[str, str] = attrs.field(factory=dict)
    """Optimizer-state name -> the model tensor whose layout it follows."""
    metadata: dict[str, Any] = attrs.field(factory=dict)
    """JSON-able rest: optimizer type, non-tensor optimizer state, tied-weight aliases."""


def manager_layout(
    records: dict[str, Any], model: torch.nn.Module
) -> tuple[dict[str, TensorLayout], dict[str, str]]:
    """Layouts of the model's tensors on this rank (from the compile records) and aliases."""
    return model_layout(records, model, collectives.rank())


def _owned_piece(tensor: torch.Tensor, layout: TensorLayout, is_full: bool) -> torch.Tensor:
    """The owned piece of a tensor that holds the whole tensor (`is_full`) or the owned
    piece, possibly padded (ZeRO-3 shards and their optimizer states)."""
    if is_full:
        return layout.to_local(tensor.detach())
    k = math.prod(layout.local_shape())
    return tensor.detach().reshape(-1)[:k].view(layout.local_shape())


def _holds_first_element(layout: TensorLayout) -> bool:
    """Whether this rank writes the piece that starts at the tensor's first element."""
    if not layout.steps:
        return collectives.rank() == 0
    starts = all(
        step["lo"] == 0 if step["kind"] == "flat" else not any(step["starts"])
        for step in layout.steps
    )
    return layout.writes and starts


def collect_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    layouts: dict[str, TensorLayout],
    aliases: dict[str, str],
) -> ShardedState:
    """This rank's pieces of the model's tensors and of the optimizer states.

    The optimizer tensor of parameter `name` (group 'names') is either the whole parameter
    (data parallel) or the owned piece, flat and maybe padded (ZeRO)."""
    named = {name: t for name, t, _ in _model_tensors(model)}
    state = ShardedState({}, {}, metadata={"aliases": dict(aliases)})
    for name, layout in layouts.items():
        tensor = named[name]
        state.tensors[f"model/{name}"] = layout.owned_from_held(tensor.detach())
        state.layouts[f"model/{name}"] = layout
    scalars: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for name, q in zip(group["names"], group["params"]):
            layout = layouts[name]
            for key, value in optimizer.state.get(q, {}).items():
                full_key = f"optim/{name}/{key}"
                if not isinstance(value, torch.Tensor):
                    scalars.setdefault(name, {})[key] = value
                elif value.dim() > 0 and value.shape == q.shape:
                    is_full = q.shape == torch.Size(layout.shape) and not layout.steps
                    state.tensors[full_key] = _owned_piece(value, layout, is_full)
                    state.layouts[full_key] = layout
                    state.follows[full_key] = name
                else:  # per-parameter scalars (AdamW's step): the same on every rank that
                    # updates the parameter; the one holding its first element writes it
                    # (rank 0 unless a pipeline stage or a shard elsewhere owns it).
                    state.tensors[full_key] = value.detach()
                    state.layouts[full_key] = TensorLayout(
                        tuple(value.shape),
                        str(value.dtype).removeprefix("torch."),
                        writes=_holds_first_element(layout),
                    )
    state.metadata.update(
        optimizer=type(optimizer).__name__,
        optimizer_scalars=scalars,
        optimized=[n for g in optimizer.param_groups for n in g["names"]],
    )
    return state


def needed_piece(
    layouts: dict[str, TensorLayout], name: str, follows: str | None, saved: dict[str, Any]
) -> tuple[list[tuple[int, int]], tuple[int, ...]]:
    """What this rank must read of checkpoint tensor `name` (its global flat intervals and
    the shape to give them): model tensors the model keeps whole are read whole."""
    if name.startswith("model/"):
        layout = layouts[name.removeprefix("model/")]
        if layout.holds_full:
            return [(0, layout.numel)] if layout.numel else [], layout.shape
        held = layout.held_steps()
        if held < len(layout.steps):  # the model keeps an intermediate piece: read it all
            return intervals(layout.shape, layout.steps[:held]), layout.held_shape()
        return layout.intervals(), layout.local_shape()
    if follows is not None:
        layout = layouts[follows]
        return layout.intervals(), layout.local_shape()
    shape = tuple(saved["shape"])
    numel = math.prod(shape)
    return ([(0, numel)] if numel else []), shape


def apply_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: ShardedState
) -> None:
    """Load pieces shaped by `needed_piece` (already validated: nothing here can fail on
    shapes) into the model's tensors and fresh optimizer states."""
    named = {name: t for name, t, _ in _model_tensors(model)}
    by_name = {n: q for g in optimizer.param_groups for n, q in zip(g["names"], g["params"])}
    # torch keeps `step` with the parameter for fused/capturable optimizers, else on CPU.
    on_device = {
        n: bool(g.get("fused") or g.get("capturable"))
        for g in optimizer.param_groups
        for n in g["names"]
    }
    new_states: dict[torch.Tensor, dict[str, Any]] = {}
    for key, value in state.tensors.items():
        if not key.startswith("optim/"):
            continue
        name, _, state_key = key.removeprefix("optim/").rpartition("/")
        q = by_name[name]
        if key in state.follows:
            full = torch.zeros_like(q)
            full.view(-1)[: value.numel()].copy_(value.reshape(-1))
            value = full
        else:
            value = value.to(q.device if on_device[name] else "cpu", copy=True)
        new_states.setdefault(q, {})[state_key] = value
    with torch.no_grad():
        for key, value in state.tensors.items():
            if not key.startswith("model/"):
                continue
            target = named[key.removeprefix("model/")]
            layout = state.layouts[key]
            if layout.holds_full or layout.held_steps() < len(layout.steps):  # read as held
                target.data.copy_(value.view(target.shape))
            else:  # a (padded) flat shard: the owned piece, padding left as it is
                target.data.view(-1)[: value.numel()].copy_(value.reshape(-1))
    scalars = state.metadata.get("optimizer_scalars", {})
    optimizer.state.clear()
    for name, q in by_name.items():
        q_state = new_states.get(q, {})
        q_state.update(scalars.get(name, {}))
        if q_state:
            optimizer.state[q] = q_state


def _model_tensors(model: torch.nn.Module):
    return state_names(model)


# ---------------------------------------------------------------------- whole tensors


def gather_full(
    model: torch.nn.Module,
    layouts: dict[str, TensorLayout],
    aliases: dict[str, str],
    group: Any | None = None,
    bucket_bytes: int = 64 * 2**20,
) -> dict[str, torch.Tensor]:
    """Every model tensor whole, on every rank, under the model's state-dict names (aliases
    share their tensor). Tensors the model keeps whole are copied; pieces are put in place
    by their writer and summed over ranks (every element has exactly one writer), a bucket
    of tensors per all-reduce. Every rank must call it."""
    named = {name: t for name, t, _ in _model_tensors(model)}
    out: dict[str, torch.Tensor] = {}
    pending: list[tuple[str, TensorLayout]] = []

    def flush() -> None:
        by_dtype: dict[torch.dtype, list[tuple[str, TensorLayout]]] = {}
        for name, layout in pending:
            by_dtype.setdefault(getattr(torch, layout.dtype), []).append((name, layout))
        for dtype, items in by_dtype.items():
            device = named[items[0][0]].device
            flat = torch.zeros(sum(lay.numel for _, lay in items), dtype=dtype, device=device)
            offset = 0
            for name, layout in items:
                view = flat[offset : offset + layout.numel].view(layout.shape)
                if layout.writes:
                    piece = layout.owned_from_held(named[name].detach())
                    layout.to_global_(view, piece)
                offset += layout.numel
            collectives.all_reduce(flat, group=group)
            flat = flat.cpu()
            offset = 0
            for name, layout in items:
                out[name] = flat[offset : offset + layout.numel].view(layout.shape)
                offset += layout.numel
        pending.clear()

    size = 0
    whole_everywhere = _whole_on_every_rank(layouts, group)
    for name, layout in layouts.items():
        if whole_everywhere[name]:
            out[name] = named[name].detach().cpu().clone()
            continue
        pending.append((name, layout))
        size += layout.numel * 4
        if size >= bucket_bytes:
            flush()
            size = 0
    flush()
    result = {}
    for name, _, _ in _model_tensors(model):
        result[name] = out[aliases.get(name, name)]
    return result


def _whole_on_every_rank(layouts: dict[str, TensorLayout], group: Any | None) -> dict[str, bool]:
    """Whether each tensor is whole on every rank (then copied, not reduced). Ranks may
    differ (a pipeline stage holds only its parameters, an expert rank its experts), so
    they agree first: one all-reduce of a flag per tensor, in the same order everywhere."""
    names = list(layouts)
    if collectives.world_size(group) == 1:
        return {name: layouts[name].holds_full for name in names}
    partial = torch.tensor(
        [float(not layouts[name].holds_full) for name in names],
        device=collectives.device_of(group),
    )
    collectives.all_reduce(partial, group=group)
    return {name: flag == 0 for name, flag in zip(names, partial.tolist())}
