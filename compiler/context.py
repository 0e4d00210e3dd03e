"""The compile context: what every pass may read, and where passes record decisions."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from ..runtime.mesh import ProcessMesh, build_mesh
from .strategy import Strategy


@attrs.define
class CompileContext:
    """Shared state of one compilation, handed to every pass.

    Passes read the strategy and example inputs here, and write what they decided
    into `records` (by pass name) or into node `meta`: the runtime and the cost model
    read those, never re-deriving a decision.
    """

    strategy: Strategy
    model: torch.nn.Module
    """The user's model: read-only for passes (parameters are the single source of truth)."""
    example_args: tuple = ()
    example_kwargs: dict = attrs.field(factory=dict)
    training: bool = True
    """The mode this graph was captured in (train or eval)."""
    rank: int = 0
    world_size: int = 1
    mesh: ProcessMesh = attrs.field(
        default=attrs.Factory(lambda self: build_mesh(self.strategy.mesh), takes_self=True)
    )
    """The ranks as named dimensions (runtime/mesh.py): passes read group sizes here and
    name the dimension each collective node runs over; the runtime resolves it to a group."""
    records: dict[str, Any] = attrs.field(factory=dict)
    """Per-pass decisions, keyed by pass name: e.g. which parameters a sharding pass split."""
    capture_method: str = ""
    """How the graph was captured: 'export' or 'symbolic_trace'."""

    def record(self, pass_name: str, **values: Any) -> None:
        """Merge `values` into this pass's record."""
        self.records.setdefault(pass_name, {}).update(values)
