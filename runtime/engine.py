"""The training engine: what `strato.compile` returns when the strategy has an optimizer.

It is a CompiledModel (called like the model, inspectable: graph, history, explain...)
that also trains:

    loss = engine.train_step(x, y)   # grad_accumulation micro-batches, then the update

or the three-call loop, once per micro-batch:

    loss = engine(batch)      # the compiled training graph
    engine.backward(loss)     # loss / grad_accumulation (x loss scale for fp16), backward
    engine.step()             # at accumulation boundaries: sync, unscale, clip, update

Gradient sync, optimizer states and the update belong to a state manager
(runtime/state_manager.py): data parallel or ZeRO, the engine does not know which.
What the passes decided (loss scaling from the mixed-precision pass, whether parameters
get sharded, whether the engine must own the step) is read from the training graph's
`ctx.records`, never re-derived from the strategy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..compiler.errors import StratoError
from ..compiler.strategy import Strategy
from . import collectives, engine_state, moe, tensor_parallel
from .collective_schedule import (
    launch_entries,
    stage_schedule,
    step_schedule,
    verify_collective_schedule,
)
from .compiled_model import CompiledGraph, CompiledModel
from .loss_scaler import DynamicLossScaler
from .optim import lr_factor
from .state_manager import make_state_manager
from .train_step import (
    MicroBatch,
    Schedule,
    given_micro_batches,
    is_micro_batch_source,
    loss_of,
    plain_schedule,
    split_batch,
)

DATA_PARALLEL_DIMS = ("replicate", "shard")
"""Mesh dimensions whose ranks train on different batches (outermost first)."""


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
        records = train_ctx.records
        # One exchange, before any other collective: the step's collectives, then the
        # strategy fields and parameters (a mismatch names the first entry that differs).
        verify_collective_schedule(
            step_schedule(records, train_ctx.mesh) + launch_entries(model, strategy)
        )
        within_stage = [d for d in train_ctx.mesh.dims if d != "pipeline"]
        if stage_schedule(records) and within_stage:  # a pipeline rank's stage-local part
            verify_collective_schedule(
                stage_schedule(records), group=train_ctx.mesh.group(*within_stage)
            )
        if _passes_recording(records, "shards_parameters"):
            # The manager will leave each parameter holding only its shard, after which the
            # model cannot be captured again: build the eval graph now, while they are whole.
            self._graph_for(False)
        self.step_owners = _passes_recording(records, "requires_train_step")
        """Passes whose graphs only `train_step` can drive (e.g. a pipeline's schedule)."""
        self.schedule: Schedule = plain_schedule
        """How `train_step` runs forward/backward over its micro-batches (runtime/train_step.py);
        pipelined: the PipelineRunner, whose `engine.schedule()` is the plan (print, plot)."""
        self.pipeline = None
        if "pipeline_cut" in records:
            from .pipeline.executor import PipelineRunner

            self.pipeline = PipelineRunner(self, self._graph_for(True).gm, train_ctx)
            self.schedule = self.pipeline
        self._in_train_step = False
        self._in_backward = False
        self._loss_fn: Callable | None = None
        self.manager = make_state_manager(strategy, model, train_ctx, strategy.optimizer, None)
        if self.pipeline is not None:  # after the manager's start-up broadcast
            self.pipeline.release_other_stages()
        loss_scaling = records.get("mixed_precision", {}).get("loss_scaling", False)
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
        self._comm_dims_start = collectives.comm_bytes_by_dim()
        self._comm_dims_mark = self._comm_dims_start
        self._comm_dims_last_step: dict[str, dict[str, int]] = {}
        self._pending_save = None
        self._last_save_seconds = 0.0
        engine_state.install_state_dict_hooks(self)

    # ------------------------------------------------------------------ training
    def forward(self, *args, **kwargs):
        if self.training:
            self._refuse_outside_train_step("engine(...)")
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is not None and self.training:
            self._tokens += first.numel()
        if not self.training:  # the eval graph has no waits for in-flight parameter gathers
            self.manager.synchronize()
            self._refresh_other_stages()  # the whole model runs: other stages' weights too
        return super().forward(*args, **kwargs)

    def synchronize(self) -> None:
        """Land communication the last step left in flight (ZeRO stage 1/2 parameter
        all-gathers, which the next training forward waits for layer by layer): call it
        before reading the model's parameters directly between steps."""
        self.manager.synchronize()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-step's loss (divided by grad_accumulation, scaled for fp16)."""
        self._refuse_outside_train_step("engine.backward")
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
        self.backward_micro_batch(loss)
        self._backward_pending = True

    def step(self) -> bool:
        """End a micro-step; at an accumulation boundary update the weights.

        Returns True when an optimizer step happened (or was skipped for an fp16 overflow)."""
        self._refuse_outside_train_step("engine.step")
        if not self._backward_pending:
            raise RuntimeError("engine.step() needs an engine.backward(loss) before it.")
        self._backward_pending = False
        if self.micro_step < self.strategy.grad_accumulation:
            return False
        self._update()
        return True

    def train_step(self, *args, loss_fn: Callable | None = None, target: Any = None, **kwargs):
        """One optimizer step over this rank's batch; returns its mean loss (a float).

        `train_step(*args, **kwargs)` splits every tensor input along dim 0 into
        `Strategy.grad_accumulation` equal micro-batches; `train_step(micro_batches)` takes
        a list of exactly that many, or the next that many of an iterator (each a tuple of
        positional inputs, a dict of keyword inputs, or one tensor). Each micro-batch runs
        forward and backward (`self.schedule`), then the weights update once.

        The loss is the model's output, or its `.loss` (Hugging Face models given labels);
        for a model returning logits pass `loss_fn=fn, target=y`: the loss is
        `fn(output, y_k)` with `y` split like the inputs (with a list of micro-batches,
        `target` is a list of as many; both are train_step's own keywords, never the
        model's). The returned float is this rank's mean over its
        micro-batches, as `stats()["loss"]`: average it over data-parallel ranks yourself
        for the global batch's loss.
        """
        if not self.training:
            raise StratoError(
                "train_step needs the engine in training mode; call engine.train() first "
                "(engine.eval() switched it to the eval graph)."
            )
        if self.micro_step or self._backward_pending:
            raise StratoError(
                f"train_step was called with {self.micro_step} of "
                f"{self.strategy.grad_accumulation} micro-steps of the three-call loop "
                "(engine(x), engine.backward, engine.step) still accumulating; finish them "
                "with engine.step() until it returns True, or use only train_step."
            )
        n, setting = self.strategy.grad_accumulation, "Strategy.grad_accumulation"
        if self.pipeline is not None:
            n, setting = self.pipeline.plan.microbatches, "Pipeline.microbatches"
        if is_micro_batch_source(args, kwargs):
            micro_batches = given_micro_batches(args[0], target, n)
        else:
            micro_batches = split_batch(args, kwargs, target, n, setting)
        tensor_parallel.check_step_inputs(self, micro_batches)
        self._loss_fn = loss_fn
        self._in_train_step = True
        try:
            with tensor_parallel.inputs_checked():  # the micro-batches' forwards
                losses = self.schedule(self, micro_batches)
        except Exception:
            if not self._in_backward:
                # A forward (or loss) failed: no reduction is in flight, so drop what earlier
                # micro-batches accumulated and the next train_step starts clean.
                self.manager.zero_grad()
                self._loss_sum, self.micro_step = 0.0, 0
            raise
        finally:
            self._in_train_step = False
            self._loss_fn = None
        self._update()
        return sum(float(loss) for loss in losses) / len(losses) if losses else math.nan

    def micro_batch_loss(self, micro_batch: MicroBatch) -> torch.Tensor:
        """Forward of one micro-batch and its scalar loss (a schedule's forward action)."""
        output = self(*micro_batch.args, **micro_batch.kwargs)
        return loss_of(output, micro_batch, self._loss_fn)

    def backward_micro_batch(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss: the manager learns whether it ends the
        accumulation; the loss is divided by grad_accumulation and scaled for fp16."""
        accumulation = self.strategy.grad_accumulation
        self.manager.prepare_micro_step(is_boundary=self.micro_step + 1 == accumulation)
        scaled = loss / accumulation if accumulation > 1 else loss
        if self.scaler is not None:
            scaled = scaled * self.scaler.scale
        self._in_backward = True
        # MoE auxiliary losses get the gradient the loss got (runtime/moe.py).
        factor = (self.scaler.scale if self.scaler is not None else 1.0) / accumulation
        with moe.scaled_loss_grad(factor):
            scaled.backward()
        self._in_backward = False
        self._loss_sum += float(loss.detach())
        self.micro_step += 1

    def _update(self) -> None:
        """The accumulation boundary: land reductions, unscale, clip, update, count."""
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
            manager.step(lr_factor(self.strategy.schedule, self.global_step))
        manager.zero_grad()
        now = time.perf_counter()
        elapsed = now - self._step_started
        self._tokens_per_s = (
            self._tokens * collectives.world_size() / elapsed if elapsed > 0 else 0.0
        )
        self._step_started, self._tokens = now, 0
        self._last = {
            "loss": self._loss_sum / max(self.micro_step, 1),
            "grad_norm": grad_norm,
        }
        self._loss_sum = 0.0
        self.micro_step = 0
        self.global_step += 1
        comm_now = collectives.comm_bytes()
        self._comm_last_step = _counter_growth(self._comm_mark, comm_now)
        self._comm_mark = comm_now
        dims_now = collectives.comm_bytes_by_dim()
        self._comm_dims_last_step = collectives.growth_by_dim(self._comm_dims_mark, dims_now)
        self._comm_dims_mark = dims_now

    def _refuse_outside_train_step(self, call: str) -> None:
        if self.step_owners and not self._in_train_step:
            raise StratoError(
                f"{call}: pass {self.step_owners[0]!r} recorded that this strategy needs the "
                "engine to own the training step (its micro-batch schedule), so the three-call "
                "loop cannot drive it; call engine.train_step(*batch) instead."
            )

    # ------------------------------------------------------------------ reporting
    @property
    def stages(self) -> list:
        """The training graph's per-stage GraphModules (passes/pipeline_cut.py), every
        stage's, whichever ranks run them; without a pipeline, [the training graph]."""
        if self.pipeline is None:
            return [self._graph_for(True).gm]
        return [stage.gm for stage in self.pipeline.stages]

    def timeline(self):
        """The last pipelined step as measured (runtime/pipeline/timeline.py): events per
        rank, `bubble()`, `plot(png)`. Call on every rank (it gathers the ranks' events)."""
        if self.pipeline is None:
            raise StratoError(
                "engine.timeline(): this strategy has no pipeline (Strategy.pipeline)."
            )
        return self.pipeline.timeline()

    @property
    def mesh(self):
        """The run's mesh (runtime/mesh.py): print it for the rank grid, the groups of each
        dimension and the collectives the compiled graphs run over them."""
        ctx = self._graph_for(True).ctx
        return ctx.mesh.with_uses(ctx.records)

    @property
    def data_parallel_size(self) -> int:
        """How many different batches one step trains on: the mesh's replicate x shard
        ranks (the ranks of a tensor group, or of a pipeline, share one batch)."""
        mesh = self._graph_for(True).ctx.mesh
        return mesh.size(*[d for d in DATA_PARALLEL_DIMS if d in mesh.dims])

    @property
    def data_parallel_rank(self) -> int:
        """Which of the `data_parallel_size` batches this rank takes: shard data by it
        (DistributedSampler(data, num_replicas=engine.data_parallel_size, rank=...))."""
        mesh = self._graph_for(True).ctx.mesh
        coords, index = mesh.coordinates(mesh.rank), 0
        for dim in (d for d in DATA_PARALLEL_DIMS if d in mesh.dims):
            index = index * mesh.sizes[dim] + coords[dim]
        return index

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
            # The same bytes by mesh dimension ('shard', 'replicate', 'replicate,shard'...).
            "comm_bytes_by_dim": dict(self._comm_dims_last_step),
            "model_state_bytes": self.manager.model_state_bytes(),
            # Per strato.nn.MoE layer: tokens per expert, dropped tokens, aux loss, z-loss.
            "moe": moe.model_stats(self.model),
        }

    # ------------------------------------------------------------------ checkpoints
    # (the work is in runtime/engine_state.py; every rank must call these together)
    def save_checkpoint(
        self, path: str | Path, keep_last: int = 2, async_save: bool = True
    ) -> Path:
        """Save model, optimizer, schedule position, loss scale, step and RNG states under
        `path` as layout-independent pieces (loadable at another world size or ZeRO stage).
        Returns the step folder it will publish. With `async_save` the tensors are copied to
        host memory now and written by a background thread; the next save, a load,
        `wait_for_checkpoint()` or the process exit waits for it."""
        return engine_state.save(self, path, keep_last, async_save)

    def wait_for_checkpoint(self) -> Path | None:
        """Wait until the save in progress is written (and, on rank 0, published)."""
        return engine_state.wait_for_save(self)

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore everything `save_checkpoint` wrote (any world size or ZeRO stage), all or
        nothing: every file and piece is read and checked before anything changes.
        Returns the step it resumes at."""
        return engine_state.load(self, path)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors under the model's own state-dict names (CPU), for any strategy;
        call on every rank."""
        return engine_state.full_state_dict(self)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write what transformers' `save_pretrained` writes (config.json, model.safetensors
        with tied weights once) from the whole tensors; call on every rank."""
        return engine_state.save_pretrained(self, directory)

    def _refresh_other_stages(self) -> None:
        """Pipelined: a rank holds only its stages' parameters; eval forwards (the whole
        model) first fetch the others from their stages."""
        if self.pipeline is not None:
            self.manager.synchronize()
            self.pipeline.synchronize_parameters()

    def layout(self):
        """(layout per model tensor, alias -> first name) on this rank, from the records."""
        return engine_state.layout_of(self)

    def __repr__(self) -> str:
        return f"TrainingEngine({type(self.model).__name__}, {self.strategy!r})"


# ---------------------------------------------------------------------- helpers


def _counter_growth(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _passes_recording(records: dict[str, Any], key: str) -> list[str]:
    """Names of the passes whose record sets `key` (a decision the engine acts on)."""
    return [
        name for name, record in records.items() if isinstance(record, dict) and record.get(key)
    ]
