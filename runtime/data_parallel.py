"""Data parallelism (ZeRO stage 0): every rank holds everything; gradients are all-reduced
over the whole mesh (replicate x shard).

The `data_parallel` pass (passes/zero.py) records the buckets in ctx.records
['data_parallel']: parameters in gradient-ready order (reverse first use in the graph),
same-dtype runs of about 25 MiB. A per-parameter post-accumulate-grad hook marks a
gradient ready; a bucket whose gradients are all ready is all-reduced asynchronously
while backward goes on (runtime/buckets.py's GradientReducer, shared with ZeRO). Buckets
launch strictly in index order on every rank, so the collectives match across ranks even
when ranks finish gradients in a different order or a rank leaves a parameter unused.
Tied weights are one parameter (one hook, one gradient). Non-boundary accumulation
micro-steps send nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from ..compiler.context import CompileContext
from ..compiler.training_config import OptimizerConfig
from . import collectives
from .buckets import GradientReducer, broadcast_model
from .optim import build_optimizer, trainable_parameters
from .train_state import ShardedState, apply_state, collect_state


class DataParallelManager:
    """The stage-0 StateManager (see runtime/state_manager.py for the contract)."""

    sharded = False

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer_config: OptimizerConfig,
        compiled_ctx: CompileContext,
    ) -> None:
        record = compiled_ctx.records.get("data_parallel")
        if record is None:
            raise RuntimeError(
                "data parallel: the training graph has no 'data_parallel' record; the "
                "data_parallel pass did not run (was it disabled with Strategy(disable=...)?)."
            )
        self.model = model
        self.group = compiled_ctx.mesh.group(*record["mesh_dims"])
        """Every rank of the mesh (replicate x shard): gradients are averaged over it."""
        self.world_size = self.group.size
        planned = record.get("params")  # a pipeline rank: only its stages' parameters
        self.params = {
            n: p for n, p in trainable_parameters(model).items() if planned is None or n in planned
        }
        self.optimizer = build_optimizer(model, optimizer_config, self.params)
        self.optimizer_config = optimizer_config
        if collectives.world_size() > 1:
            # Every rank starts from the first data-parallel rank's weights, as DDP does (within
            # the group only: ranks along other dimensions hold other pieces of the model).
            broadcast_model(model, self.group)
        self.buckets = [[self.params[n] for n in bucket["params"]] for bucket in record["buckets"]]
        self.reducer = GradientReducer(self.buckets, self._launch) if self.world_size > 1 else None

    # ------------------------------------------------------------------ gradients
    def prepare_micro_step(self, is_boundary: bool) -> None:
        if self.reducer is not None:
            self.reducer.prepare_micro_step(is_boundary)

    def _launch(self, index: int) -> tuple[int, torch.Tensor, Any]:
        """All-reduce bucket `index`: its gradients, then one 'has a gradient' flag per parameter."""
        bucket = self.buckets[index]
        parts = [
            p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in bucket
        ]
        flags = torch.tensor(
            [float(p.grad is not None) for p in bucket],
            dtype=bucket[0].dtype,
            device=bucket[0].device,
        )
        flat = torch.cat([*parts, flags]).to(self.group.device)  # (no copy when already there)
        work = collectives.all_reduce(flat, group=self.group, async_op=True)
        return index, flat, work

    def finish_backward(self) -> None:
        if self.reducer is None:
            return
        if not self.reducer.reduce_now:
            raise RuntimeError(
                "finish_backward called after a non-boundary micro-step: the engine must mark "
                "the last micro-step of each accumulation as the boundary."
            )
        with torch.no_grad():
            for index, flat, work in self.reducer.finish():
                work.wait()
                bucket = self.buckets[index]
                flat.div_(self.world_size)
                flags = flat[-len(bucket) :]
                offset = 0
                for p, flag in zip(bucket, flags.tolist()):
                    reduced = flat[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
                    if flag == 0:  # no rank produced a gradient: leave it None, as eager does
                        p.grad = None
                    elif p.grad is None:
                        p.grad = reduced.to(p.device, copy=True)
                    else:
                        p.grad.copy_(reduced)

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params.values() if p.grad is not None]

    def unscale_(self, inv_scale: float) -> bool:
        grads = self._grads()
        if not grads:
            return False
        torch._foreach_mul_(grads, inv_scale)
        # After the all-reduce every rank holds the same gradients: same answer everywhere.
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        return not bool(finite)

    def clip_grad_norm_(self, max_norm: float | None) -> float:
        params = [p for p in self.params.values() if p.grad is not None]
        if not params:
            return 0.0
        if max_norm is None:
            return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # ------------------------------------------------------------------ update
    def step(self, lr_factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        """Nothing outlives a step here."""

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, layouts: dict[str, Any], aliases: dict[str, str]) -> ShardedState:
        return collect_state(self.model, self.optimizer, layouts, aliases)

    def load_state_dict(self, state: ShardedState) -> None:
        apply_state(self.model, self.optimizer, state)

    def model_state_bytes(self) -> int:
        # Parameters as held now (a pipeline rank has freed the other stages' ones).
        params = sum(t.numel() * t.element_size() for t in self.model.parameters())
        grads = sum(p.numel() * p.element_size() for p in self.params.values())
        states = sum(
            v.numel() * v.element_size()
            for state in self.optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor)
        )
        return params + grads + states
