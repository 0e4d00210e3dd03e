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
from .expert_parallel import broadcast_experts
from .grad_norm import clip_grad_norm_, found_nonfinite, grad_counting
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
            # the group only: ranks along other dimensions hold other pieces of the model;
            # expert shards from the first rank holding the same experts).
            experts = broadcast_experts(model, compiled_ctx.records, compiled_ctx.mesh)
            broadcast_model(model, self.group, skip=experts)
        self.buckets = [[self.params[n] for n in bucket["params"]] for bucket in record["buckets"]]
        self.bucket_groups = [
            compiled_ctx.mesh.group(bucket["group"])
            if bucket.get("group") == "expert_replicate"
            else self.group
            for bucket in record["buckets"]
        ]
        """Where each bucket is all-reduced: every data-parallel rank, or for expert weights
        the ranks holding the same experts (the sum is still averaged over every rank)."""
        self.reducer = GradientReducer(self.buckets, self._launch) if self.world_size > 1 else None
        self.counting = grad_counting(compiled_ctx.records, model, compiled_ctx.mesh)
        """Which gradients this rank counts in the global norm (runtime/grad_norm.py)."""

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
        group = self.bucket_groups[index]
        flat = torch.cat([*parts, flags]).to(group.device)  # (no copy when already there)
        work = collectives.all_reduce(flat, group=group, async_op=True)
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

    def _grads(self) -> dict[str, torch.Tensor | None]:
        return {name: p.grad for name, p in self.params.items()}

    def unscale_(self, inv_scale: float) -> bool:
        grads = [g for g in self._grads().values() if g is not None]
        if grads:
            torch._foreach_mul_(grads, inv_scale)
        return found_nonfinite(self._grads(), self.counting)

    def clip_grad_norm_(self, max_norm: float | None) -> float:
        return clip_grad_norm_(self._grads(), self.counting, max_norm)

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
