"""Data parallelism (ZeRO stage 0): every rank holds everything; gradients are all-reduced.

Gradients are reduced in buckets (about 25 MiB each, parameters in reverse model order,
roughly the order backward produces them). A per-parameter post-accumulate-grad hook
marks a gradient ready; a bucket whose gradients are all ready is all-reduced
asynchronously while backward goes on. Buckets launch strictly in index order on every
rank, so the collectives match across ranks even when ranks finish gradients in a
different order or a rank leaves a parameter unused. Tied weights are one parameter
(one hook, one gradient). Non-boundary accumulation micro-steps send nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from ..compiler.training_config import OptimizerConfig
from . import collectives
from .buckets import GradientReducer, broadcast_model
from .optim import build_optimizer, trainable_parameters

DEFAULT_BUCKET_BYTES = 25 * 2**20


def make_buckets(params: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of same-dtype parameters of at most `bucket_bytes` (at least one each)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not buckets or size + nbytes > bucket_bytes or buckets[-1][0].dtype != p.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


class DataParallelManager:
    """The stage-0 StateManager (see runtime/state_manager.py for the contract)."""

    sharded = False

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer_config: OptimizerConfig,
        process_group: Any | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        self.model = model
        self.group = process_group
        self.world_size = collectives.world_size(process_group)
        self.params = trainable_parameters(model)
        self.optimizer = build_optimizer(model, optimizer_config)
        self.optimizer_config = optimizer_config
        if self.world_size > 1:
            broadcast_model(model, process_group)
        self.buckets = make_buckets(list(self.params.values())[::-1], bucket_bytes)
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
        flat = torch.cat([*parts, flags])
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
                        p.grad = reduced.clone()
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
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        load_optimizer_state_dict(self.model, self.optimizer, tensors, metadata)

    def model_state_bytes(self) -> int:
        params = sum(t.numel() * t.element_size() for t in self.model.parameters())
        grads = sum(p.numel() * p.element_size() for p in self.params.values())
        states = sum(
            v.numel() * v.element_size()
            for state in self.optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor)
        )
        return params + grads + states


# ---------------------------------------------------------------------- state dicts
# Shared with other managers: model tensors as 'model/<name>', optimizer state tensors as
# 'optim/<param name>/<key>'; tied parameters are stored once and named in metadata.


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state_dict with tied tensors once: (tensors by name, alias -> name kept)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[f"model/{name}"] = t.detach().contiguous()
    return tensors, aliases


def load_model_tensors(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str]
) -> None:
    state = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    for alias, name in aliases.items():
        state[alias] = state[name]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the model: "
            + (f"missing {missing[:5]} " if missing else "")
            + (f"unexpected {unexpected[:5]}" if unexpected else "")
        )


def optimizer_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model tensors plus optimizer states keyed by parameter name."""
    tensors, aliases = model_tensors(model)
    scalars: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{name}/{key}"] = value.detach().contiguous()
                else:
                    scalars.setdefault(name, {})[key] = value
    groups = [
        {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in g.items()
            if k != "params" and isinstance(v, int | float | str | bool | list | tuple | None)
        }
        for g in optimizer.param_groups
    ]
    return tensors, {"model_aliases": aliases, "optimizer_scalars": scalars, "param_groups": groups}


def load_optimizer_state_dict(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any],
) -> None:
    saved_names = [g["names"] for g in metadata["param_groups"]]
    current_names = [g["names"] for g in optimizer.param_groups]
    if saved_names != current_names:
        raise ValueError(
            "the checkpoint's optimizer parameter groups differ from this engine's "
            f"({len(saved_names)} groups saved, {len(current_names)} now): was it saved with a "
            "different model or optimizer settings (weight decay exclusions, layer_decay)?"
        )
    load_model_tensors(model, tensors, metadata.get("model_aliases", {}))
    scalars = metadata.get("optimizer_scalars", {})
    optimizer.state.clear()
    for group in optimizer.param_groups:
        for name, p in zip(group["names"], group["params"]):
            prefix = f"optim/{name}/"
            state = {
                k[len(prefix) :]: v.clone() for k, v in tensors.items() if k.startswith(prefix)
            }
            state.update(scalars.get(name, {}))
            if state:
                optimizer.state[p] = state
