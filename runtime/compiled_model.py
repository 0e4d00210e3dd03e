"""CompiledModel: runs the transformed graph for the current mode, on the model's own tensors."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import attrs
import torch
import torch.fx as fx

from ..compiler import cost_model
from ..compiler import inspect as graph_inspect
from ..compiler.context import CompileContext
from ..compiler.errors import StratoError
from ..compiler.pass_manager import PassRecord
from ..compiler.strategy import Strategy


@attrs.define
class CompiledGraph:
    """One mode's transformed graph, the history of passes that made it, and their context."""

    gm: fx.GraphModule
    history: list[PassRecord]
    ctx: CompileContext
    run: Callable | None = None
    """What executes the graph: gm itself, or torch.compile(gm) (see `graph_runner`)."""


def graph_runner(gm: fx.GraphModule, ctx: CompileContext) -> Callable:
    """gm, or for eval graphs under Strategy(inference_backend='inductor') torch.compile(gm),
    which compiles on its first call."""
    if ctx.training or ctx.strategy.inference_backend != "inductor":
        return gm
    on_cpu = all(t.device.type == "cpu" for t in [*gm.parameters(), *gm.buffers()])
    compilers = (os.environ.get("CXX", ""), "g++", "clang++", "c++")
    if on_cpu and not any(shutil.which(c) for c in compilers if c):
        raise StratoError(
            "Strategy.inference_backend='inductor': inductor compiles CPU graphs to C++, and no "
            "C++ compiler (g++, clang++, c++ or $CXX) is on PATH; install one, or use "
            "inference_backend='fx'."
        )
    # Dynamo re-checks every module attribute and tensor of the graph on each call (0.3 ms
    # a decode step of the 134M benchmark model); the graph is Strato's and its tensors are
    # registered once, so only the inputs are guarded. Changing a parameter's shape or
    # dtype after the first call therefore goes unnoticed: compile again instead.
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    options = {"guard_filter_fn": skip} if skip is not None else None
    return torch.compile(gm, backend="inductor", options=options)


class CompiledModel(torch.nn.Module):
    """The compiled model: call it like the original.

    It shares the original model's parameters, buffers and submodules (the same dicts),
    so `parameters()`, `state_dict()` and module paths are the model's own, with no
    prefix and no copies. Each mode (train/eval) has its own graph, since a captured
    graph bakes in dropout and batch-norm behaviour; the second is built on first use.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        strategy: Strategy,
        build_graph: Callable[[bool], CompiledGraph],
    ) -> None:
        super().__init__()
        # Share the model's state dicts, so everything nn.Module derives from them
        # (names, state_dict, hooks on submodules) is the model's own.
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._modules = model._modules
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "strategy", strategy)
        object.__setattr__(self, "_build_graph", build_graph)
        object.__setattr__(self, "_graphs", {})
        self.training = model.training
        self._graph_for(self.training)

    # ------------------------------------------------------------------ running
    def _graph_for(self, training: bool) -> CompiledGraph:
        if training not in self._graphs:
            self._graphs[training] = self._build_graph(training)
        return self._graphs[training]

    def forward(self, *args, **kwargs):
        graph = self._graph_for(self.training)
        return (graph.gm if graph.run is None else graph.run)(*args, **kwargs)

    def train(self, mode: bool = True) -> CompiledModel:
        self.model.train(mode)
        self.training = mode
        return self

    # ------------------------------------------------------------------ inspecting
    @property
    def graph(self) -> fx.GraphModule:
        """The transformed GraphModule for the current mode."""
        return self._graph_for(self.training).gm

    @property
    def history(self) -> list[PassRecord]:
        """One record per pass that built the current mode's graph."""
        return self._graph_for(self.training).history

    @property
    def context(self) -> CompileContext:
        """The compile context of the current mode: strategy, records of every pass."""
        return self._graph_for(self.training).ctx

    def print_graph(self) -> str:
        """Each node with its op, output shape/dtype and owning module path."""
        return graph_inspect.print_graph(self.graph)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **options):
        """Token ids [batch, prompt + new] continuing `input_ids` with a KV cache, from compiled
        prefill and decode graphs of a Hugging Face causal LM under this strategy; greedy by
        default, as transformers' `generate(do_sample=False)`. Options (attention_mask,
        temperature, top_k, top_p, eos_token_id, pad_token_id, generator, seed): see
        `strato.runtime.generate.generate`."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **options)

    def kernels(self) -> list[dict]:
        """The fused regions of the current mode's graph, one entry each: 'name', 'kind',
        'kernel' (the custom op; equal regions share one), 'nodes' (the ATen nodes it
        replaced), 'inputs', 'outputs', 'source' (the Triton source). Empty unless fuse=True."""
        return [dict(r) for r in self.context.records.get("fuse", {}).get("regions", [])]

    def diff(self, pass_name: str) -> str:
        """What the named pass changed in the current mode's graph (a unified diff)."""
        return graph_inspect.diff(self.history, pass_name)

    def explain(self) -> cost_model.Explanation:
        """Per-rank estimate of parameter, gradient, optimizer-state and activation bytes."""
        graph = self._graph_for(self.training)
        return cost_model.estimate(graph.gm, graph.ctx)

    def __repr__(self) -> str:
        return f"CompiledModel({type(self.model).__name__}, {self.strategy!r})"
