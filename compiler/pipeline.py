"""Which built-in passes a strategy needs, in their natural order."""

from __future__ import annotations

from ..passes.annotate import annotate_metadata
from ..passes.dead_code import eliminate_dead_code
from ..passes.precision import mixed_precision
from ..passes.quantize import quantize_linears
from ..passes.simplify import simplify_inference
from .pass_manager import GraphPass, as_graph_pass
from .strategy import Strategy


def builtin_passes(strategy: Strategy) -> list[GraphPass]:
    """The built-in passes for `strategy`; later features append theirs here."""
    passes = [annotate_metadata, eliminate_dead_code, simplify_inference]
    if strategy.precision in ("bf16", "fp16"):
        passes.append(mixed_precision)
    if strategy.quantize is not None:
        passes.append(quantize_linears)
        if strategy.inference_backend == "inductor":
            from ..passes.lower_quantized import lower_quantized_linears

            passes.append(lower_quantized_linears)
    if getattr(strategy, "tensor_parallel", None) is not None:
        from ..passes.tensor_parallel import tensor_parallel  # before quantize: it sees shards

        passes.append(tensor_parallel)
    if getattr(strategy, "moe", None) is not None:
        from ..passes.moe_dispatch import moe_dispatch

        passes.append(moe_dispatch)
    if getattr(strategy, "pipeline", None) is not None and strategy.optimizer is not None:
        from ..passes.pipeline_cut import pipeline_cut  # before ZeRO: it reads the stages

        passes.append(pipeline_cut)
    if strategy.fuse:
        from ..passes.fuse import fuse_operators

        passes.append(fuse_operators)
    if getattr(strategy, "zero", 0):
        from ..passes.zero import ZERO_PASSES

        passes.append(ZERO_PASSES[strategy.zero])
    elif strategy.optimizer is not None:  # training without ZeRO: data parallel buckets
        from ..passes.zero import data_parallel

        passes.append(data_parallel)
    # Always: it also keeps the model's own checkpoint regions (ordered by its contract).
    from ..passes.recompute import recompute_activations

    passes.append(recompute_activations)
    return [as_graph_pass(p) for p in passes]


def pipeline(strategy: Strategy) -> list[GraphPass]:
    """Built-in passes followed by the user's own."""
    return builtin_passes(strategy) + list(strategy.passes)
