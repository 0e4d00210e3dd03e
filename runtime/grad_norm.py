"""The global gradient norm, clipping and the inf/NaN check over every rank of the mesh.

One rule for every state manager (data parallel, ZeRO, tensor, pipeline and expert
parallelism): each element of each parameter is counted exactly once across the world. A
rank sums the squared norms of the gradient pieces it *writes* (the layout maps'
`writes`, compiler/layout.py, the rule checkpoints follow: a shard by its holder, a
replica by its first replica), one all-reduce over the whole mesh adds the sums, and every
rank scales its own pieces by the same factor. When no pass moved a tensor (plain data
parallelism) every rank holds the same full gradients, so the local sum already is the
world's and nothing is sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs
import torch
import torch.distributed as dist

from ..compiler.layout import model_layout
from . import collectives
from .mesh import MeshGroup, ProcessMesh


@attrs.frozen
class GradCounting:
    """Which of this rank's gradient pieces count towards the global norm, and over which
    group the per-rank sums are added."""

    counted: frozenset[str]
    """Parameter names (first state-dict names) whose piece on this rank is counted."""
    group: MeshGroup | None
    """The whole mesh, or None when every rank holds the same full gradients."""


def grad_counting(
    records: dict[str, Any], model: torch.nn.Module, mesh: ProcessMesh
) -> GradCounting:
    """This rank's counting from the compile records' layout maps (call after the passes
    ran: every rank of the mesh reaches the same `group` decision, since every rank ran
    the same passes)."""
    layouts, _ = model_layout(records, model, mesh.rank)
    if not records.get("layout", {}).get("tensors") or mesh.world_size == 1:
        return GradCounting(frozenset(layouts), None)
    counted = frozenset(name for name, layout in layouts.items() if layout.writes)
    return GradCounting(counted, mesh.group(*mesh.dims))


def _device(counting: GradCounting, grads: list[torch.Tensor]) -> torch.device:
    if counting.group is not None:
        return counting.group.device
    return grads[0].device if grads else torch.device("cpu")


def clip_grad_norm_(
    grads: Mapping[str, torch.Tensor | None], counting: GradCounting, max_norm: float | None
) -> float:
    """The L2 norm of every parameter's whole gradient over the world (`grads`: this rank's
    piece of each parameter by name, None where it has none); with `max_norm`, every rank
    scales its pieces by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_
    does. Returns the norm before clipping. Every rank of `counting.group` must call it."""
    present = {name: g for name, g in grads.items() if g is not None}
    mine = [g for name, g in present.items() if name in counting.counted]
    device = _device(counting, list(present.values()))
    # Per-tensor norms in one fused pass, their squares summed in float64.
    total = torch.zeros(1, dtype=torch.float64, device=device)
    if mine:
        norms = torch.stack([n.double().to(device) for n in torch._foreach_norm(mine)])
        total += (norms**2).sum()
    if counting.group is not None:
        collectives.all_reduce(total, group=counting.group)
    norm = math.sqrt(float(total.item()))
    if max_norm is not None and present:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            torch._foreach_mul_(list(present.values()), coef)
    return norm


def found_nonfinite(grads: Mapping[str, torch.Tensor | None], counting: GradCounting) -> bool:
    """Whether any rank holds an inf/NaN gradient element (the same answer on every rank;
    fp16 loss scaling skips the step on it)."""
    present = [g for g in grads.values() if g is not None]
    device = _device(counting, present)
    bad = any(not bool(torch.isfinite(g).all()) for g in present)
    flag = torch.tensor([float(bad)], device=device)
    if counting.group is not None:
        collectives.all_reduce(flag, op=dist.ReduceOp.MAX, group=counting.group)
    return bool(flag.item() > 0)
