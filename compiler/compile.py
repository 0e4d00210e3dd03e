"""`strato.compile`: capture, plan and run the passes, hand the graph to the runtime."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..passes.annotate import check_graph_runs, fill_fake_values
from ..runtime.compiled_model import CompiledGraph, CompiledModel, graph_runner
from .capture import annotate_module_paths, capture
from .context import CompileContext
from .pass_manager import plan_passes, run_passes
from .pipeline import pipeline
from .strategy import Strategy


def compile(
    model: torch.nn.Module,
    strategy: Strategy | Mapping[str, Any] | None = None,
    *,
    example_inputs: tuple | Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    keep_snapshots: bool = False,
) -> CompiledModel:
    """Compile `model` under `strategy`; the result is called like the model.

    The graph for the model's current mode (train/eval) is built now; the other mode's
    graph is captured from the same example inputs the first time it is used.
    With `strategy.optimizer` set the result is a `TrainingEngine` (runtime/engine.py):
    a CompiledModel that also has backward/step/save_checkpoint/load_checkpoint/lr/stats.
    """
    if strategy is None:
        strategy = Strategy()
    elif isinstance(strategy, Mapping):
        strategy = Strategy.from_dict(strategy)
    elif not isinstance(strategy, Strategy):
        raise TypeError(
            f"strategy must be a strato.Strategy or a dict, got {type(strategy).__name__}"
        )
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    example_kwargs = dict(example_kwargs or {})
    passes = plan_passes(pipeline(strategy), strategy.disable)
    if strategy.optimizer is not None:
        # Training under torchrun: join the process group before capture, so passes see
        # the real rank and world size.
        from ..runtime.distributed import init_from_env

        init_from_env()

    def build(training: bool) -> CompiledGraph:
        ctx = CompileContext(
            strategy=strategy,
            model=model,
            example_args=example_inputs,
            example_kwargs=example_kwargs,
            training=training,
            **_world(),
        )
        captured = capture(model, example_inputs, example_kwargs, training=training)
        ctx.capture_method = captured.method
        gm, history = run_passes(captured.gm, ctx, passes, keep_snapshots=keep_snapshots)
        fill_fake_values(gm, ctx)
        check_graph_runs(gm, ctx)
        annotate_module_paths(gm)
        return CompiledGraph(gm=gm, history=history, ctx=ctx, run=graph_runner(gm, ctx))

    if strategy.optimizer is not None:
        from ..runtime.engine import TrainingEngine

        return TrainingEngine(model, strategy, build)
    return CompiledModel(model, strategy, build)


def _world() -> dict[str, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    return {"rank": 0, "world_size": 1}
