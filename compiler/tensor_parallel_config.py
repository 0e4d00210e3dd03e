"""`strato.TensorParallel`: Megatron-style tensor parallelism settings a Strategy holds.

`Strategy(tensor_parallel=strato.TensorParallel(size=2))` shards the attention and MLP
blocks the `tensor_parallel` pass finds (passes/tensor_parallel.py) over the mesh's
`tensor` dimension; `plan` names by module glob what the matcher does not find.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .errors import StrategyError, did_you_mean

STYLES = ("column", "row", "vocab", "replicate")
"""How a planned module is split: 'column' (a linear's output features), 'row' (its input
features; the output is all-reduced), 'vocab' (an embedding's rows), 'replicate' (kept
whole on every rank, even where the matcher would shard it)."""


def _check_size(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise StrategyError(f"TensorParallel.size: expected an integer >= 1, got {value!r}.")


def _check_bool(instance, attribute, value) -> None:
    if not isinstance(value, bool):
        raise StrategyError(
            f"TensorParallel.{attribute.name}: expected true or false, got {value!r}."
        )


def _convert_plan(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    try:
        plan = tuple((str(glob), style) for glob, style in items)
    except (TypeError, ValueError) as exc:
        raise StrategyError(
            "TensorParallel.plan: expected a mapping of module globs to 'column', 'row', "
            f"'vocab' or 'replicate' ({{'layers.*.mlp.up': 'column'}}), got {value!r}."
        ) from exc
    for glob, style in plan:
        if style not in STYLES:
            raise StrategyError(
                f"TensorParallel.plan[{glob!r}]: unknown style {style!r}; choose one of "
                f"{', '.join(map(repr, STYLES))}.{did_you_mean(str(style), STYLES)}"
            )
    return plan


@attrs.frozen(kw_only=True)
class TensorParallel:
    """Shard attention heads, MLP features and the vocabulary over `size` ranks (the mesh's
    `tensor` dimension): column-parallel projections in, row-parallel out, one all-reduce
    per block in forward and one in backward."""

    size: int = attrs.field(validator=_check_size)
    """Ranks each layer is split over; must divide the world size, the attention heads, the
    KV heads, the MLP width and the vocabulary. Sets `Mesh.tensor` unless the mesh gives it."""

    sequence_parallel: bool = attrs.field(default=False, validator=_check_bool)
    """Megatron sequence parallelism: between blocks (norms, dropout, residuals) activations
    are split along the sequence, and each block's all-reduce becomes an all-gather before
    it and a reduce-scatter after it (same bytes, 1/size of the activations kept)."""

    vocab_parallel: bool = attrs.field(default=True, validator=_check_bool)
    """Split the token embedding and the LM head over the vocabulary (vocab-parallel
    embedding; the logits stay split until they are gathered for a graph output)."""

    check_inputs: bool = attrs.field(default=True, validator=_check_bool)
    """Verify that every rank of a tensor group was given the same inputs, on every
    train_step, call and generate (one all-gather of 16 bytes per rank), and raise on every
    rank naming the input that differs: ranks fed different batches would otherwise train
    silently wrong. False skips it when the data loader guarantees equal batches."""

    plan: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_convert_plan)
    """Module globs (fnmatch over module paths, `layers.*.mlp.up`) to 'column', 'row',
    'vocab' or 'replicate', applied before (and over) what the matcher finds; a glob that
    matches no module is an error listing near matches. Accepts a dict."""


def check_tensor_parallel(instance, attribute, value) -> None:
    """Strategy.tensor_parallel: a TensorParallel or None; its size becomes the mesh's
    `tensor` size unless the mesh states another (then both are named)."""
    if value is None:
        if instance.mesh.tensor not in (1, -1):
            raise StrategyError(
                f"Strategy.mesh: Mesh.tensor={instance.mesh.tensor} but no tensor_parallel is "
                "set, so those ranks would train unsynchronised replicas; add "
                f"tensor_parallel=strato.TensorParallel(size={instance.mesh.tensor})."
            )
        return
    if not isinstance(value, TensorParallel):
        raise StrategyError(
            f"Strategy.tensor_parallel: expected strato.TensorParallel(size=...) or None, got {value!r}."
        )
    mesh = instance.mesh
    if mesh.tensor not in (1, value.size):
        raise StrategyError(
            f"Strategy.tensor_parallel: TensorParallel.size={value.size} but Mesh.tensor="
            f"{mesh.tensor}; give one of them, or make them equal."
        )
    if mesh.tensor != value.size:  # the mesh did not say: the config sets it
        object.__setattr__(instance, "mesh", attrs.evolve(mesh, tensor=value.size))
