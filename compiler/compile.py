"""`strato.compile`: capture, plan and run the passes, hand the graph to the runtime."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..passes.annotate import check_graph_runs, fill_fake_values
from ..runtime.calls import BoundCall, bind_call, capture_defaults
from ..runtime.compiled_model import CompiledGraph, CompiledModel, graph_runner
from ..runtime.mesh import build_mesh
from ..runtime.tensor_parallel import whole_parameters
from .capture import annotate_module_paths, capture
from .context import CompileContext
from .hardware import resolve_precision
from .pass_manager import plan_passes, run_passes
from .pipeline import pipeline
from .pipeline_parallel import mesh_with_pipeline
from .strategy import Strategy, check_batch_sizes


def compile(
    model: torch.nn.Module,
    strategy: Strategy | Mapping[str, Any] | str | Path | None = None,
    *,
    example_inputs: tuple | Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    keep_snapshots: bool = False,
) -> CompiledModel:
    """Compile `model` under `strategy`; the result is called like the model.

    The graph for the model's current mode (train/eval) is built now; the other mode's
    graph is captured from the same example inputs the first time it is used. Input sizes
    are symbolic where the model allows; a call with other arguments than the example
    (an attention mask, labels...) is captured again on first use (runtime/compiled_model.py).
    With `strategy.optimizer` set the result is a `TrainingEngine` (runtime/engine.py):
    a CompiledModel that also has backward/step/save_checkpoint/load_checkpoint/lr/stats.
    `strategy` may be a file: a Strato YAML/JSON or a DeepSpeed JSON config
    (`Strategy.from_file`). precision='auto' is resolved here, for the model's device.
    """
    if strategy is None:
        strategy = Strategy()
    elif isinstance(strategy, Mapping):
        strategy = Strategy.from_dict(strategy)
    elif isinstance(strategy, str | Path):
        strategy = Strategy.from_file(strategy, model=model)
    elif not isinstance(strategy, Strategy):
        raise TypeError(
            "strategy must be a strato.Strategy, a dict or a strategy/DeepSpeed file path, got "
            f"{type(strategy).__name__}"
        )
    strategy, precision = resolve_precision(strategy, model)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    example_kwargs = dict(example_kwargs or {})
    defaults = capture_defaults(model)
    for name, value in defaults.items():
        if name not in example_kwargs:
            warnings.warn(
                f"strato: {type(model).__name__} returns a KV-cache object by default, which "
                f"no graph can return; capturing with {name}={value!r} (outputs carry "
                "past_key_values=None; use compiled.generate to decode with a cache).",
                stacklevel=2,
            )
    example = bind_call(model, example_inputs, example_kwargs, defaults)
    passes = plan_passes(pipeline(strategy), strategy.disable)
    if strategy.optimizer is not None or strategy.tensor_parallel is not None:
        # Training (or tensor-parallel serving) under torchrun: join the process group
        # before capture, so passes see the real rank and world size.
        from ..runtime.distributed import init_from_env

        init_from_env()
    # One mesh (and its process groups) per compile, shared by the train and eval graphs.
    mesh = build_mesh(mesh_with_pipeline(strategy.mesh, strategy.pipeline))
    if strategy.optimizer is not None:
        check_batch_sizes(strategy, mesh.sizes)  # over the data-parallel ranks of the mesh

    def build(training: bool, call: BoundCall | None = None) -> CompiledGraph:
        """The graph of `call` (the example's by default) in the given mode."""
        call = call or example
        ctx = CompileContext(
            strategy=strategy,
            model=model,
            example_args=call.args,
            example_kwargs=call.kwargs,
            training=training,
            mesh=mesh,
            **_world(),
        )
        ctx.record("precision", **precision.record())
        # Fused kernels bake sequence sizes into their layouts: batch-only symbolic sizes,
        # other lengths capture again (CompiledModel).
        dynamic = "batch" if strategy.fuse else "all"
        with whole_parameters(model):  # tensor-parallel blocks: capture sees whole shapes
            captured = capture(model, call.args, call.kwargs, training=training, dynamic=dynamic)
        ctx.capture_method = captured.method
        gm, history = run_passes(captured.gm, ctx, passes, keep_snapshots=keep_snapshots)
        fill_fake_values(gm, ctx)
        check_graph_runs(gm, ctx)
        annotate_module_paths(gm)
        return CompiledGraph(
            gm=gm, history=history, ctx=ctx, run=graph_runner(gm, ctx), call=call.signature
        )

    if strategy.optimizer is not None:
        from ..runtime.engine import TrainingEngine

        return TrainingEngine(model, strategy, build)
    return CompiledModel(model, strategy, build)


def _world() -> dict[str, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    return {"rank": 0, "world_size": 1}
