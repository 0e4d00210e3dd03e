"""`strato.Mesh`: how the ranks of a run are arranged, as named dimensions.

The grid order is the field order (outermost first): rank r sits at the coordinates of r
in a row-major grid of these sizes, so the last dimension's groups are runs of
consecutive ranks (on one node, where communication is cheapest). A later parallelism
(`pipeline`, `tensor`, `expert`) registers its dimension by adding one field here, at
its place in the grid, with default size 1; runtime/mesh.py builds the process groups.
"""

from __future__ import annotations

import math

import attrs

from .errors import StrategyError, did_you_mean


def _check_size(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1):
        raise StrategyError(
            f"Mesh.{attribute.name}: expected a size >= 1, or -1 for the rest of the ranks, "
            f"got {value!r}."
        )


@attrs.frozen(init=False)
class Mesh:
    """Named dimensions whose sizes multiply to the world size (one may be -1: the rest).
    Without torch.distributed (a plain `python script.py`) every size resolves to 1, so
    the script written for many ranks also runs as one process."""

    pipeline: int = attrs.field(default=1, validator=_check_size)
    """Pipeline stages (strato.Pipeline): ranks along it run different stage graphs of the
    model and pass activations / their gradients point to point. Outermost, so each stage's
    data-parallel ranks are consecutive. 1 (the default) takes `Pipeline.stages`."""

    replicate: int = attrs.field(default=1, validator=_check_size)
    """Replicas: ranks along it hold the same shards and all-reduce their (sharded)
    gradients; with ZeRO this is the outer level of hybrid sharding (HSDP)."""

    shard: int = attrs.field(default=-1, validator=_check_size)
    """Ranks that ZeRO shards parameters, gradients and optimizer states over (parameters
    are gathered within this group only); -1 (the default, unless another size is -1):
    all ranks the other dimensions leave."""

    tensor: int = attrs.field(default=1, validator=_check_size)
    """Tensor parallelism (strato.TensorParallel): ranks along it hold different column /
    row blocks of the same layers and all-reduce activations every block. Innermost, so a
    tensor group is consecutive ranks (one node). 1 (the default) takes
    `TensorParallel.size`."""

    def __init__(self, **sizes: int) -> None:
        names = self.dimension_names()
        for name in sizes:
            if name not in names:
                raise StrategyError(
                    f"Mesh: unknown dimension {name!r}.{did_you_mean(name, names)} "
                    f"Dimensions: {', '.join(names)}."
                )
        if "shard" not in sizes and -1 in sizes.values():
            sizes = {**sizes, "shard": 1}  # another dimension takes the rest
        self.__attrs_init__(**sizes)  # type: ignore[attr-defined]
        rest = [name for name in names if getattr(self, name) == -1]
        if len(rest) > 1:
            raise StrategyError(
                f"Mesh: only one size may be -1 (the rest of the ranks); {' and '.join(rest)} both are."
            )

    @classmethod
    def dimension_names(cls) -> tuple[str, ...]:
        """Every dimension a Mesh has, in grid order (outermost first)."""
        return tuple(f.name for f in attrs.fields(cls))

    def sizes(self, world_size: int | None) -> dict[str, int]:
        """Each dimension's size on `world_size` ranks (the -1 resolved); raises when the
        sizes cannot multiply to the world size. None (no process group): all sizes 1."""
        sizes = {name: getattr(self, name) for name in self.dimension_names()}
        if world_size is None:
            return {name: 1 for name in sizes}
        fixed = math.prod(size for size in sizes.values() if size != -1)
        shown = " x ".join(f"{name}={size}" for name, size in sizes.items())
        rest = [name for name, size in sizes.items() if size == -1]
        if rest:
            if world_size % fixed:
                raise StrategyError(
                    f"Strategy.mesh: {shown}: the fixed sizes multiply to {fixed}, which does not "
                    f"divide the world size {world_size}; choose sizes whose product divides it."
                )
            sizes[rest[0]] = world_size // fixed
        elif fixed != world_size:
            raise StrategyError(
                f"Strategy.mesh: {shown} = {fixed} ranks, but the world size is {world_size}; "
                "make the sizes multiply to the world size, or set one of them to -1 (the rest)."
            )
        return sizes


def check_mesh(instance, attribute, value) -> None:
    if not isinstance(value, Mesh):
        raise StrategyError(
            f"Strategy.mesh: expected strato.Mesh(replicate=..., shard=...), got {value!r}."
        )
