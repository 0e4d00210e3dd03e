"""`strato.Pipeline`: pipeline-parallel settings a Strategy holds.

The model's training graph is cut at module boundaries into `stages` x `virtual_stages`
stage graphs (passes/pipeline_cut.py); ranks along the mesh's `pipeline` dimension each run
their stages' actions of a schedule (runtime/pipeline/schedules.py) over `microbatches`
micro-batches per `train_step`. (compiler/pipeline.py is something else: the pass list.)
"""

from __future__ import annotations

import attrs

from .errors import StrategyError, did_you_mean

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble")
"""gpipe: every forward, then every backward; 1f1b: one forward one backward in the steady
state (at most P micro-batches' activations alive per stage); interleaved: 1F1B over
virtual_stages chunks per rank (smaller bubble, more messages); zero_bubble: ZB-H1, 1F1B
with each backward split into its input-gradient part (B) and weight-gradient part (W), the
W parts filling the bubble."""


def _check_positive_int(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise StrategyError(f"Pipeline.{attribute.name}: must be an integer >= 1, got {value!r}.")


def _check_schedule(instance, attribute, value) -> None:
    if value not in SCHEDULES:
        raise StrategyError(
            f"Pipeline.schedule: unknown schedule {value!r}.{did_you_mean(str(value), SCHEDULES)} "
            f"Schedules: {', '.join(SCHEDULES)}."
        )


def _convert_cuts(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    cuts = tuple(value)
    for cut in cuts:
        if not isinstance(cut, str) or not cut:
            raise StrategyError(
                f"Pipeline.cuts: expected module names (e.g. ['layers.2']), got {cut!r}."
            )
    return cuts


@attrs.frozen(kw_only=True)
class Pipeline:
    """Pipeline parallelism: the training graph cut into stages, run as a schedule of
    micro-batch forwards and backwards over the mesh's `pipeline` dimension."""

    stages: int = attrs.field(default=2, validator=_check_positive_int)
    """Pipeline ranks P: the size of the mesh's `pipeline` dimension (set from here when
    strato.Mesh does not give it). In a single process all stages run in that process."""

    microbatches: int = attrs.field(default=4, validator=_check_positive_int)
    """Micro-batches M per `train_step`: each rank's batch is split along dim 0 into M equal
    parts (Strategy.grad_accumulation must be 1 or M). The bubble is about (P-1)/(M+P-1)."""

    schedule: str = attrs.field(default="1f1b", validator=_check_schedule)
    """'gpipe', '1f1b', 'interleaved' (needs virtual_stages >= 2) or 'zero_bubble' (ZB-H1)."""

    virtual_stages: int = attrs.field(default=1, validator=_check_positive_int)
    """Stage graphs per rank v for 'interleaved' (P x v stages; rank r runs stages r, r+P,
    ...); 1 for the other schedules."""

    cuts: tuple[str, ...] | None = attrs.field(default=None, converter=_convert_cuts)
    """Module names where a new stage begins (['layers.2'] cuts before layers.2): exactly
    P x v - 1 of them, in model order. None: the cut pass balances estimated FLOPs and
    activation bytes over the numbered layers."""

    def __attrs_post_init__(self) -> None:
        if self.schedule == "interleaved" and self.virtual_stages < 2:
            raise StrategyError(
                "Pipeline.virtual_stages: schedule 'interleaved' runs several stage chunks per "
                f"rank; give virtual_stages >= 2 (got {self.virtual_stages})."
            )
        if self.schedule != "interleaved" and self.virtual_stages != 1:
            raise StrategyError(
                f"Pipeline.virtual_stages={self.virtual_stages} needs schedule='interleaved' "
                f"(schedule {self.schedule!r} runs one stage per rank)."
            )
        if self.schedule == "interleaved" and self.microbatches % self.stages:
            raise StrategyError(
                f"Pipeline.microbatches: the interleaved schedule sends micro-batches in rounds "
                f"of stages={self.stages}; microbatches={self.microbatches} is not a multiple "
                "of it."
            )
        if self.schedule in ("1f1b", "zero_bubble", "interleaved") and (
            self.microbatches < self.stages
        ):
            raise StrategyError(
                f"Pipeline.microbatches: schedule {self.schedule!r} with microbatches="
                f"{self.microbatches} < stages={self.stages} never reaches its steady state "
                "(every stage waits most of the step, and 1F1B saves no memory over GPipe); "
                f"use microbatches >= {self.stages} (ideally 4x more), or schedule='gpipe'."
            )
        if self.cuts is not None and len(self.cuts) != self.stage_count - 1:
            raise StrategyError(
                f"Pipeline.cuts: {len(self.cuts)} cut(s) {list(self.cuts)} for "
                f"{self.stage_count} stages (stages x virtual_stages); give exactly "
                f"{self.stage_count - 1}, or None to balance automatically."
            )

    @property
    def stage_count(self) -> int:
        """Stage graphs in all: stages x virtual_stages."""
        return self.stages * self.virtual_stages


def check_pipeline(instance, attribute, value) -> None:
    if value is not None and not isinstance(value, Pipeline):
        raise StrategyError(
            f"Strategy.pipeline: expected strato.Pipeline(stages=..., microbatches=...) or None, "
            f"got {value!r}."
        )
    if value is None:
        return
    if instance.grad_accumulation not in (1, value.microbatches):
        raise StrategyError(
            f"Strategy.grad_accumulation={instance.grad_accumulation} with Pipeline("
            f"microbatches={value.microbatches}): a pipelined step accumulates over its "
            "micro-batches; leave grad_accumulation at 1 or set it equal to microbatches."
        )
    if instance.zero == 3:
        raise StrategyError(
            "Strategy.zero=3 with Strategy.pipeline: ZeRO-3 gathers each layer's parameters "
            "around one whole forward and backward of the graph, while a pipeline stage runs "
            "many micro-batches' forwards before their backwards (DeepSpeed refuses it too); "
            "use zero=1 or zero=2 with a pipeline."
        )
    mesh_size = instance.mesh.pipeline
    if mesh_size not in (1, value.stages):
        raise StrategyError(
            f"Strategy.pipeline: Pipeline(stages={value.stages}) but strato.Mesh(pipeline="
            f"{mesh_size}); the pipeline dimension holds one rank per stage: make them equal "
            "(or leave Mesh.pipeline out)."
        )


def mesh_with_pipeline(mesh, pipeline: Pipeline | None):
    """`mesh` with its `pipeline` size set to the stage count when the Mesh left it at 1."""
    if pipeline is None or mesh.pipeline == pipeline.stages:
        return mesh
    return attrs.evolve(mesh, pipeline=pipeline.stages)
