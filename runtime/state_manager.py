"""The seam between the training engine and whoever owns the model's training state.

A *state manager* owns gradient synchronisation across ranks, the optimizer and its
states, and the parameter update. The engine (runtime/engine.py) drives it and knows
nothing else about it: plain data parallelism (ZeRO stage 0, runtime/data_parallel.py)
and ZeRO stages 1-3 (runtime/zero.py) are interchangeable behind `StateManager`.

One optimizer step, as the engine drives it (`grad_accumulation` = n micro-steps):

    for each micro-step k = 1..n:
        manager.prepare_micro_step(is_boundary=(k == n))   # before backward
        loss.backward()                                     # hooks may start reductions
    manager.finish_backward()          # boundary only: grads reduced, averaged over ranks
    found_inf = manager.unscale_(1 / loss_scale)            # fp16 only (else skipped)
    norm = manager.clip_grad_norm_(max_norm)                # global over ranks; max_norm may be None
    if not found_inf: manager.step(lr_factor)
    manager.zero_grad()

Gradients are sums over micro-steps of the per-micro-step loss divided by n (the engine
divides the loss), so after `finish_backward` they are the mean over micro-steps and
ranks: world size N with batch B each equals one process with batch N*B.

Parameters are the fp32 master weights: mixed precision casts happen inside the graph
(passes/precision.py), so gradients reach the parameters in fp32.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..compiler.context import CompileContext
from ..compiler.layout import TensorLayout
from ..compiler.strategy import Strategy
from ..compiler.training_config import OptimizerConfig
from .train_state import ShardedState


@runtime_checkable
class StateManager(Protocol):
    """Owns gradient sync, optimizer states and the update for this rank.

    Every method is called on every rank in the same order (they may run collectives).
    """

    optimizer: torch.optim.Optimizer
    """The torch optimizer over what this rank updates (full parameters, or its shard).
    Its param_groups carry 'base_lr' (the lr before the schedule factor) and 'names'."""

    sharded: bool
    """True when ranks hold different parts of the state (ZeRO). Informative: what each
    rank saves and loads comes from the layout maps (compiler/layout.py)."""

    def prepare_micro_step(self, is_boundary: bool) -> None:
        """Called before each backward. On a non-boundary micro-step no communication may
        happen (gradients accumulate locally); on the boundary, reductions may start from
        gradient hooks while backward runs."""

    def finish_backward(self) -> None:
        """Called once per optimizer step after the boundary backward: wait for in-flight
        reductions and leave this rank's owned gradients averaged over ranks."""

    def unscale_(self, inv_scale: float) -> bool:
        """Multiply owned gradients by `inv_scale` (fp16 loss scaling); return True if any
        gradient on ANY rank is inf/NaN (the same answer on every rank)."""

    def clip_grad_norm_(self, max_norm: float | None) -> float:
        """Global L2 norm of all gradients over all ranks (each element counted once);
        when max_norm is given, scale gradients by min(1, max_norm / (norm + 1e-6)) as
        torch.nn.utils.clip_grad_norm_ does. Returns the norm before clipping."""

    def step(self, lr_factor: float) -> None:
        """Set each group's lr to base_lr * lr_factor and update the parameters this rank
        owns; afterwards every rank sees the full updated parameters it needs for forward
        (once the graph's waits or `synchronize` have landed what is still in flight)."""

    def zero_grad(self) -> None:
        """Drop gradients (set to None) after a step, skipped or not."""

    def synchronize(self) -> None:
        """Finish communication the last step left in flight, so the parameters hold the
        updated values (ZeRO stages 1/2 overlap their parameter all-gathers with the next
        forward; the training graph waits for each before its first use)."""

    def state_dict(self, layouts: dict[str, TensorLayout], aliases: dict[str, str]) -> ShardedState:
        """This rank's pieces to checkpoint (runtime/train_state.py): the model's tensors as
        'model/<name>' and optimizer states as 'optim/<param name>/<key>', each the part of
        the global tensor `layouts` (compiler/layout.py, from the compile records) says this
        rank owns. Lands communication in flight first."""

    def load_state_dict(self, state: ShardedState) -> None:
        """Restore pieces already cut for this rank's layout and checked (names, shapes,
        dtypes): model tensors the model keeps whole come whole, the rest as owned pieces.
        Replaces the optimizer states; must not fail half-way."""

    def model_state_bytes(self) -> int:
        """Bytes this rank holds for parameters + gradients + optimizer states."""


def make_state_manager(
    strategy: Strategy,
    model: torch.nn.Module,
    compiled_ctx: CompileContext,
    optimizer_config: OptimizerConfig,
    process_group: Any | None,
) -> StateManager:
    """The state manager the compiled graph needs: ZeRO when the zero pass recorded a
    layout (its stage comes from that record), else data parallel.

    `compiled_ctx` is the training graph's compile context (its `records` hold what the
    passes decided; `compiled_ctx.mesh` its process groups); `process_group` must be None
    (kept for callers; the groups come from the mesh).
    Both managers use runtime/optim.py's `param_groups` and `optimizer_config.build` so the
    optimizer math and group settings are the same.
    """
    if "zero" in compiled_ctx.records:  # the zero pass ran; its record holds the stage
        from .zero import make_zero_manager

        return make_zero_manager(strategy, model, compiled_ctx, optimizer_config, process_group)
    from .data_parallel import DataParallelManager

    return DataParallelManager(model, optimizer_config, compiled_ctx)
