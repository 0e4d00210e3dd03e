"""CompiledModel: runs the transformed graph for the current mode, on the model's own tensors."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable

import attrs
import torch
import torch.fx as fx

from ..compiler import cost_model
from ..compiler import inspect as graph_inspect
from ..compiler.context import CompileContext
from ..compiler.errors import InputError, StratoError
from ..compiler.pass_manager import PassRecord
from ..compiler.strategy import Strategy
from . import tensor_parallel
from .calls import (
    BoundCall,
    CallSignature,
    bind_call,
    capture_defaults,
    check_sequence_length,
    check_tensors,
    position_limit,
)

MAX_RECAPTURES = 8
"""Graphs per mode captured again for calls the example's graph cannot take (other
arguments, a dimension export had to fix), kept most recent first; the example's stays."""


@attrs.define
class CompiledGraph:
    """One mode's transformed graph, the history of passes that made it, and their context."""

    gm: fx.GraphModule
    history: list[PassRecord]
    ctx: CompileContext
    run: Callable | None = None
    """What executes the graph: gm itself, or torch.compile(gm) (see `graph_runner`)."""
    call: CallSignature | None = None
    """The signature of the call it was captured from (runtime/calls.py)."""


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

    Calls bind like calls of the model (runtime/calls.py): positional or keyword, left-out
    arguments take the model's defaults. Sizes are symbolic where the model allows; a call
    with other arguments than the example, or a size the graph had to fix, is captured
    again once (a warning says why) and kept, at most MAX_RECAPTURES per mode.
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
        object.__setattr__(self, "_recaptured", {True: [], False: []})
        object.__setattr__(self, "_call_defaults", capture_defaults(model))
        object.__setattr__(self, "_position_limit", position_limit(model))
        self.training = model.training
        self._graph_for(self.training)

    # ------------------------------------------------------------------ running
    def _graph_for(self, training: bool) -> CompiledGraph:
        if training not in self._graphs:
            self._graphs[training] = self._build_graph(training)
        return self._graphs[training]

    def forward(self, *args, **kwargs):
        call = bind_call(self.model, args, kwargs, self._call_defaults)
        check_sequence_length(self.model, call, self._position_limit)
        tensor_parallel.check_call_inputs(self, call)  # the same on every tensor rank
        graphs = [self._graph_for(self.training), *self._recaptured[self.training]]
        fitting = [g for g in graphs if g.call is None or g.call == call.signature]
        reason = ""
        for graph in fitting:
            try:
                return _run(graph, call)
            except _GuardFailed as failed:
                reason = f"the graph fixed {failed} (the model lets no symbolic size through)"
        if not fitting:
            captured = [g.call for g in graphs if g.call is not None]
            check_tensors(call.signature, captured)
            reason = f"this call has {call.signature.difference(captured[0])}"
        try:
            return _run(self._capture_again(call, reason), call)
        except _GuardFailed as failed:
            raise InputError(
                f"{type(self.model).__name__}: even a graph captured for this call requires "
                f"{failed}; check the inputs' sizes against each other and the model's limits."
            ) from None

    def _capture_again(self, call: BoundCall, reason: str) -> CompiledGraph:
        """Capture the current mode's graph for `call`, keep it, say why in one line."""
        name, mode = type(self.model).__name__, "training" if self.training else "eval"
        sharding = self._sharding_pass()
        if sharding:
            raise InputError(
                f"{name}: {reason}, which needs a new capture of the {mode} graph; pass "
                f"{sharding!r} has left each parameter holding only its shard (ZeRO-3), so the "
                "model cannot be captured again. Give strato.compile example inputs with the "
                "same arguments as this call (example_kwargs), or call it like the example."
            )
        warnings.warn(f"strato: capturing {name}'s {mode} graph again: {reason}", stacklevel=3)
        graph = self._build_graph(self.training, call)
        kept = self._recaptured[self.training]
        kept.insert(0, graph)
        del kept[MAX_RECAPTURES:]
        return graph

    def _sharding_pass(self) -> str:
        """The pass that shards parameters across ranks (ZeRO-3), or ''."""
        for graph in self._graphs.values():
            for pass_name, record in graph.ctx.records.items():
                if isinstance(record, dict) and record.get("shards_parameters"):
                    return pass_name
        return ""

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


class _GuardFailed(Exception):
    """A graph's input check failed (export's guards): the call needs another graph."""


def _run(graph: CompiledGraph, call: BoundCall):
    """Run `graph` on `call`; export's input checks that fail raise _GuardFailed with the
    failed condition, which names the input and dimension (e.g. input_ids.size()[1] == 16)."""
    run = graph.gm if graph.run is None else graph.run
    try:
        return run(*call.args, **call.kwargs)
    except AssertionError as exc:
        text = str(exc)
        if not text.startswith("Guard failed"):
            raise
        raise _GuardFailed(text.removeprefix("Guard failed:").strip()) from None
