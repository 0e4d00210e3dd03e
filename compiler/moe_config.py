"""Expert-parallel settings a Strategy holds (`Strategy.moe`): how many ranks share the
experts of each `strato.nn.MoE` layer. The layer's own settings (experts, top_k,
capacity, loss weights) live on the layer (runtime/moe.py)."""

from __future__ import annotations

from typing import Any

import attrs

from .errors import StrategyError


def _check_size(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise StrategyError(
            f"ExpertParallel.size: expected an integer >= 1 (ranks that split each layer's "
            f"experts between them), got {value!r}."
        )


@attrs.frozen
class ExpertParallel:
    """Expert parallelism: each MoE layer's experts are split over `size` ranks carved from
    the data-parallel ranks (replicate x shard), tokens travel to their experts by
    all-to-all (pass `moe_dispatch`). A single process runs every expert locally."""

    size: int = attrs.field(default=1, validator=_check_size)
    """Ranks in an expert group: each holds num_experts / size experts of every layer
    (size must divide num_experts and the data-parallel ranks); 1 keeps every expert on
    every rank (no all-to-all)."""


def check_moe(instance, attribute, value: Any) -> None:
    if value is not None and not isinstance(value, ExpertParallel):
        raise StrategyError(
            f"Strategy.moe: expected strato.ExpertParallel(size=...) or None, got {value!r}."
        )
