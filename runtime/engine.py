"""The training engine: what `strato.compile` returns when the strategy has an optimizer.

It is a CompiledModel (called like the model, inspectable: graph, history, explain...)
that also trains:

    loss = engine(batch)      # the compiled training graph
    engine.backward(loss)     # loss / grad_accumulation (x loss scale for fp16), backward
    engine.step()             # at accumulation boundaries: sync, unscale, clip, update

Gradient sync, optimizer states and the update belong to a state manager
(runtime/state_manager.py): data parallel or ZeRO, the engine does not know which.
What the passes decided (e.g. loss scaling from the mixed-precision pass) is read from
the training graph's `ctx.records`.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..compiler.strategy import Strategy
from . import checkpoint, collectives
from .compiled_model import CompiledGraph, CompiledModel
from .loss_scaler import DynamicLossScaler
from .state_manager import make_state_manager


class TrainingEngine(CompiledModel):
    """A compiled model that trains: backward / step / checkpoints / lr / stats."""

    def __init__(
        self,
        model: torch.nn.Module,
        strategy: Strategy,
        build_graph: Callable[[bool], CompiledGraph],
    ) -> None:
        if strategy.optimizer is None:
            raise ValueError(
                "TrainingEngine needs Strategy.optimizer (strato.AdamW or strato.SGD)."
            )
        super().__init__(model, strategy, build_graph)
        train_ctx = self._graph_for(True).ctx
        _check_ranks_agree(model, strategy)
        if getattr(strategy, "zero", 0) == 3:
            # ZeRO-3 leaves each parameter holding only its shard, after which the model
            # cannot be captured again: build the eval graph now, while parameters are whole.
            self._graph_for(False)
        self.manager = make_state_manager(strategy, model, train_ctx, strategy.optimizer, None)
        loss_scaling = train_ctx.records.get("mixed_precision", {}).get("loss_scaling", False)
        self.scaler = DynamicLossScaler(strategy.loss_scaling) if loss_scaling else None
        self.global_step = 0
        """Optimizer steps taken (skipped fp16 steps included: the schedule moves on)."""
        self.micro_step = 0
        """Micro-steps done in the current accumulation (0 right after an update)."""
        self.skipped_steps = 0
        self._backward_pending = False
        self._loss_sum = 0.0
        self._last: dict[str, float] = {"loss": math.nan, "grad_norm": math.nan}
        self._tokens = 0
        self._tokens_per_s = 0.0
        self._step_started = time.perf_counter()
        self._comm_start = collectives.comm_bytes()
        self._comm_mark = self._comm_start
        self._comm_last_step: dict[str, int] = {}

    # ------------------------------------------------------------------ training
    def forward(self, *args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is not None and self.training:
            self._tokens += first.numel()
        if not self.training:  # the eval graph has no waits for in-flight parameter gathers
            self.manager.synchronize()
        return super().forward(*args, **kwargs)

    def synchronize(self) -> None:
        """Land communication the last step left in flight (ZeRO stage 1/2 parameter
        all-gathers, which the next training forward waits for layer by layer): call it
        before reading the model's parameters directly between steps."""
        self.manager.synchronize()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-step's loss (divided by grad_accumulation, scaled for fp16)."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                "engine.backward expects the scalar loss tensor of this micro-step, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}; "
                "reduce it first (e.g. loss.mean())."
            )
        if self._backward_pending:
            raise RuntimeError(
                "engine.backward was called twice without engine.step() in between; call "
                "engine.step() after every engine.backward() (it only updates at accumulation "
                "boundaries)."
            )
        accumulation = self.strategy.grad_accumulation
        self.manager.prepare_micro_step(is_boundary=self.micro_step + 1 == accumulation)
        scaled = loss / accumulation if accumulation > 1 else loss
        if self.scaler is not None:
            scaled = scaled * self.scaler.scale
        scaled.backward()
        self._loss_sum += float(loss.detach())
        self._backward_pending = True

    def step(self) -> bool:
        """End a micro-step; at an accumulation boundary update the weights.

        Returns True when an optimizer step happened (or was skipped for an fp16 overflow)."""
        if not self._backward_pending:
            raise RuntimeError("engine.step() needs an engine.backward(loss) before it.")
        self._backward_pending = False
        self.micro_step += 1
        if self.micro_step < self.strategy.grad_accumulation:
            return False
        manager = self.manager
        manager.finish_backward()
        found_inf = False
        if self.scaler is not None:
            found_inf = manager.unscale_(1.0 / self.scaler.scale)
            self.scaler.update(found_inf)
        if found_inf:
            self.skipped_steps += 1
            grad_norm = math.inf
        else:
            grad_norm = manager.clip_grad_norm_(self.strategy.grad_clip)
            manager.step(self.strategy.schedule.factor(self.global_step))
        manager.zero_grad()
        now = time.perf_counter()
        elapsed = now - self._step_started
        self._tokens_per_s = (
            self._tokens * collectives.world_size() / elapsed if elapsed > 0 else 0.0
        )
        self._step_started, self._tokens = now, 0
        self._last = {
            "loss": self._loss_sum / self.strategy.grad_accumulation,
            "grad_norm": grad_norm,
        }
        self._loss_sum = 0.0
        self.micro_step = 0
        self.global_step += 1
        comm_now = collectives.comm_bytes()
        self._comm_last_step = _counter_growth(self._comm_mark, comm_now)
        self._comm_mark = comm_now
        return True

    # ------------------------------------------------------------------ reporting
    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses (the optimizer's lr x schedule)."""
        return self.strategy.optimizer.lr * self.strategy.schedule.factor(self.global_step)

    def stats(self) -> dict[str, Any]:
        """Step counters, last loss (this rank's mean over micro-steps), grad norm, lr,
        loss scale, tokens/s (all ranks), model-state bytes, and payload bytes per collective
        kind: `comm_bytes` during the last optimizer step (from the end of the step before it),
        `comm_bytes_total` since the engine was built."""
        now = collectives.comm_bytes()
        return {
            "step": self.global_step,
            "micro_step": self.micro_step,
            "loss": self._last["loss"],
            "grad_norm": self._last["grad_norm"],
            "lr": self.lr,
            "loss_scale": self.scaler.scale if self.scaler is not None else 1.0,
            "skipped_steps": self.skipped_steps,
            "tokens_per_s": self._tokens_per_s,
            "comm_bytes": dict(self._comm_last_step),
            "comm_bytes_total": _counter_growth(self._comm_start, now),
            "model_state_bytes": self.manager.model_state_bytes(),
        }

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path, keep_last: int = 2) -> Path:
        """Save model, optimizer, schedule position, loss scale, step and RNG states under
        `path` (all ranks call it). Returns the step folder written."""
        if self.micro_step != 0 or self._backward_pending:
            raise RuntimeError(
                "save_checkpoint in the middle of a gradient accumulation would lose the "
                "accumulated gradients; save right after an engine.step() that returned True."
            )
        tensors, manager_meta = self.manager.state_dict()
        rank = collectives.rank()
        files = {f"rng.rank{rank}.safetensors": _rng_tensors()}
        if self.manager.sharded:
            files[f"state.rank{rank}.safetensors"] = tensors
        elif rank == 0:
            files["state.safetensors"] = tensors
        metadata = None
        if rank == 0:
            metadata = {
                "world_size": collectives.world_size(),
                "sharded": self.manager.sharded,
                "global_step": self.global_step,
                "skipped_steps": self.skipped_steps,
                "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "manager": manager_meta,
                "python_rng": _python_rng_state(),
                "strategy": self.strategy.to_yaml(),
                "torch_version": torch.__version__,
            }
        return checkpoint.save(path, self.global_step, files, metadata, keep_last=keep_last)

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore everything `save_checkpoint` wrote; returns the step it resumes at."""
        folder = checkpoint.resolve(path)
        metadata = checkpoint.read_metadata(folder)
        rank, world = collectives.rank(), collectives.world_size()
        if metadata.get("sharded") and metadata.get("world_size") != world:
            raise checkpoint.CheckpointError(
                f"load_checkpoint: {folder} holds state sharded over {metadata.get('world_size')} "
                f"ranks; this run has {world}. Resume with the same number of processes."
            )
        state_file = (
            f"state.rank{rank}.safetensors" if metadata.get("sharded") else "state.safetensors"
        )
        tensors = checkpoint.read_tensors(folder, state_file, metadata)
        try:
            self.manager.load_state_dict(tensors, metadata["manager"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise checkpoint.CheckpointError(
                f"load_checkpoint: {folder} does not fit this model/strategy: {exc}"
            ) from exc
        self.global_step = int(metadata["global_step"])
        self.skipped_steps = int(metadata.get("skipped_steps", 0))
        if self.scaler is not None and metadata.get("loss_scaler"):
            self.scaler.load_state_dict(metadata["loss_scaler"])
        rng_file = f"rng.rank{rank}.safetensors"
        if rng_file in metadata.get("files", {}):
            _set_rng_tensors(checkpoint.read_tensors(folder, rng_file, metadata))
        else:
            warnings.warn(
                f"load_checkpoint: {folder} has no RNG state for rank {rank} (saved with "
                f"{metadata.get('world_size')} ranks): this rank keeps its current RNG, so "
                "dropout masks will not repeat the original run.",
                stacklevel=2,
            )
        if rank == 0 and metadata.get("python_rng") is not None:
            _set_python_rng_state(metadata["python_rng"])
        self.micro_step = 0
        self._backward_pending = False
        return self.global_step

    def __repr__(self) -> str:
        return f"TrainingEngine({type(self.model).__name__}, {self.strategy!r})"


# ---------------------------------------------------------------------- helpers


def _counter_growth(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _check_ranks_agree(model: torch.nn.Module, strategy: Strategy) -> None:
    """Fail fast (instead of hanging in a collective later) when ranks were started with
    different models or strategies."""
    if collectives.world_size() == 1:
        return
    text = strategy.to_yaml() + "".join(
        f"{n}:{tuple(p.shape)}:{p.dtype};" for n, p in model.named_parameters()
    )
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
    mine = torch.tensor([digest], dtype=torch.int64)
    everyone = torch.zeros(collectives.world_size(), dtype=torch.int64)
    collectives.all_gather_into_tensor(everyone, mine)
    differing = [r for r, d in enumerate(everyone.tolist()) if d != everyone[0].item()]
    if differing:
        raise RuntimeError(
            f"ranks {differing} were started with a different model or strategy than rank 0 "
            "(parameter names/shapes or Strategy fields differ); every rank must run the same "
            "script with the same settings."
        )


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return tensors


def _set_rng_tensors(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def _python_rng_state() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _set_python_rng_state(state: dict[str, Any]) -> None:
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
