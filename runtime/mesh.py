"""The mesh of one run: `strato.Mesh` resolved on the ranks that run it.

Built once per `strato.compile` (`build_mesh`), on torch's DeviceMesh
(`init_device_mesh`, which works with gloo and NCCL), and held in the compile context as
`ctx.mesh`. It is the only place that knows ranks and groups: passes read sizes from
it, every collective node names its mesh dimension in `node.meta`, and the runtime asks
`mesh.group(dim)` for the process group (a `MeshGroup`, which also says on which device
that group's collectives take their tensors). A single process has every size 1 and no
process groups; a collective over a group of one rank is a local no-op.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import attrs
import torch
import torch.distributed as dist

from ..compiler.errors import StrategyError, did_you_mean
from ..compiler.mesh_config import Mesh

EXPERT_GROUPS = ("expert", "expert_replicate")
"""Groups carved from the data-parallel ranks for expert parallelism (`expert_groups`)."""


@attrs.frozen(eq=False)
class MeshGroup:
    """This rank's group along some mesh dimensions: the ranks whose other coordinates
    equal this rank's. Collectives (runtime/collectives.py) take it as their `group`."""

    name: str
    """The dimension names joined by ',' (e.g. 'shard', or 'replicate,shard')."""
    ranks: tuple[int, ...]
    """Global ranks of the group, in group order."""
    rank: int
    """This rank's index in `ranks`."""
    device: torch.device
    """Where this group's collectives take their tensors: CUDA for NCCL, CPU for gloo."""
    process_group: Any | None = None
    """The torch ProcessGroup (None: the default group, or a group of one rank)."""

    @property
    def size(self) -> int:
        return len(self.ranks)


def collective_device(process_group: Any | None = None) -> torch.device:
    """The one decision of where a group's collective tensors live: NCCL takes CUDA
    tensors (this process's current device), every other backend (gloo) CPU tensors."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@attrs.define(eq=False)
class ProcessMesh:
    """`strato.Mesh` on this run's ranks: sizes, this rank's coordinates, its groups."""

    config: Mesh
    sizes: dict[str, int]
    """Dimension -> size, in grid order (outermost first); they multiply to world_size."""
    rank: int
    device: torch.device
    """Where collectives over this mesh take their tensors (see collective_device)."""
    device_mesh: Any | None = None
    """torch's DeviceMesh (None in a single process)."""
    uses: tuple[tuple[str, str, str], ...] = ()
    """(dimension, collective, what it moves) for each collective the compiled graphs
    issue, from the passes' records (filled by `with_uses`; printed by str())."""
    _groups: dict[str, MeshGroup] = attrs.field(factory=dict, repr=False)

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes.values())

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(self.sizes)

    def coordinates(self, rank: int) -> dict[str, int]:
        """Rank -> its index along each dimension (row-major grid)."""
        coords = {}
        for name in reversed(self.dims):
            rank, coords[name] = divmod(rank, self.sizes[name])
        return {name: coords[name] for name in self.dims}

    def ranks_along(self, dims: tuple[str, ...], rank: int) -> tuple[int, ...]:
        """The ranks that share `rank`'s coordinates outside `dims` (its group along them)."""
        mine = self.coordinates(rank)
        return tuple(
            r
            for r in range(self.world_size)
            if all(c == mine[d] for d, c in self.coordinates(r).items() if d not in dims)
        )

    def _names(self, dims: tuple[str, ...]) -> tuple[str, ...]:
        for dim in dims:
            if dim not in self.sizes:
                raise StrategyError(
                    f"mesh: no dimension {dim!r}.{did_you_mean(dim, self.dims)} "
                    f"This mesh has {', '.join(self.dims)}."
                )
        return tuple(d for d in self.dims if d in dims)  # grid order

    def size(self, *dims: str) -> int:
        """Ranks in a group along `dims` (their sizes multiplied)."""
        return math.prod(self.sizes[d] for d in self._names(dims))

    def group(self, *dims: str) -> MeshGroup:
        """This rank's group along `dims` (one dimension, or several flattened into one
        group). Groups not built with the mesh are created here: call on every rank.
        'expert' / 'expert_replicate' are the groups `expert_groups` carved."""
        if len(dims) == 1 and dims[0] in EXPERT_GROUPS:
            if dims[0] not in self._groups:
                raise StrategyError(
                    f"mesh: no {dims[0]!r} group: expert parallelism is carved from the "
                    "data-parallel ranks by Strategy(moe=strato.ExpertParallel(size=...))."
                )
            return self._groups[dims[0]]
        names = self._names(dims)
        key = ",".join(names)
        if key not in self._groups:
            ranks = self.ranks_along(names, self.rank)
            process_group = None
            if len(ranks) > 1 and len(ranks) < self.world_size:
                assert self.device_mesh is not None
                sub = self.device_mesh[names]
                process_group = (sub._flatten() if len(names) > 1 else sub).get_group()
            self._groups[key] = MeshGroup(
                name=key,
                ranks=ranks,
                rank=ranks.index(self.rank),
                device=self.device,
                process_group=process_group,
            )
        return self._groups[key]

    def expert_groups(self, size: int) -> tuple[MeshGroup, MeshGroup]:
        """Expert parallelism, carved from the data-parallel ranks (replicate x shard) as in
        DeepSpeed and torchtitan, not a dimension of its own: this rank's data-parallel
        group (in group order) cut into runs of `size` ranks is its `expert` group (ranks
        holding different experts: the all-to-all runs here); the ranks at its place in
        every run are its `expert_replicate` group (ranks holding the same experts).
        Process groups are created the first time: call on every rank."""
        data_dims = tuple(d for d in ("replicate", "shard") if d in self.sizes)
        data_parallel = self.size(*data_dims)
        if data_parallel % size:
            raise StrategyError(
                f"Strategy.moe: ExpertParallel(size={size}) does not divide the "
                f"{data_parallel} data-parallel ranks (replicate x shard of {self.world_size} "
                "ranks) it is carved from; choose a size that divides them."
            )
        carved = self._groups.get("expert")
        if carved is not None:
            if carved.size != size:
                raise StrategyError(
                    f"Strategy.moe: this mesh already has expert groups of {carved.size} "
                    f"ranks; ExpertParallel(size={size}) cannot be carved as well."
                )
            return carved, self._groups["expert_replicate"]
        runs, strided = [], []
        for ranks in sorted({self.ranks_along(data_dims, r) for r in range(self.world_size)}):
            runs += [ranks[i : i + size] for i in range(0, len(ranks), size)]
            strided += [ranks[i::size] for i in range(size)]
        for name, groups in (("expert", runs), ("expert_replicate", strided)):
            mine = None
            for ranks in groups:  # every rank creates every group, in the same order
                process_group = None
                if 1 < len(ranks) < self.world_size:
                    process_group = dist.new_group(list(ranks))
                if self.rank in ranks:
                    mine = MeshGroup(
                        name=name,
                        ranks=tuple(ranks),
                        rank=ranks.index(self.rank),
                        device=self.device,
                        process_group=process_group,
                    )
            assert mine is not None
            self._groups[name] = mine
        return self._groups["expert"], self._groups["expert_replicate"]

    def with_uses(self, records: dict[str, Any]) -> ProcessMesh:
        """This mesh annotated with the collectives the passes recorded (each pass's
        record may hold 'collectives': [{'op', 'dim', 'what'}])."""
        uses = tuple(
            (c["dim"], c["op"], c["what"])
            for record in records.values()
            if isinstance(record, dict)
            for c in record.get("collectives", ())
        )
        return attrs.evolve(self, uses=uses, groups=self._groups)

    def __str__(self) -> str:
        shown = " x ".join(f"{d}={s}" for d, s in self.sizes.items())
        backend = dist.get_backend() if self.device_mesh is not None else "single process"
        lines = [f"Mesh {shown} over {self.world_size} ranks ({backend}, {self.device.type})"]
        *outer, last = self.dims
        lines.append(f"  rank grid [{', '.join(self.dims)}]:")
        width = max(len(str(self.world_size - 1)), len(f"{last}=0"))
        header = " " * (len(self._row_label(outer, ())) + 2) if outer else "    "
        cols = "  ".join(f"{last}={i}".rjust(width) for i in range(self.sizes[last]))
        lines.append(f"  {header}{cols}")
        for index in itertools.product(*(range(self.sizes[d]) for d in outer)):
            start = sum(
                i * math.prod(self.sizes[d] for d in self.dims[k + 1 :])
                for k, i in enumerate(index)
            )
            row = "  ".join(str(start + j).rjust(width) for j in range(self.sizes[last]))
            lines.append(f"  {self._row_label(outer, index)}  {row}" if outer else f"    {row}")
        lines.append("  groups (collectives over them):")
        # Each dimension that has more than one rank or carries a collective, then every
        # combination a collective runs over (data parallel: replicate,shard), then the world.
        used_keys = [dim for dim, _, _ in self.uses if dim not in EXPERT_GROUPS]
        keys = [d for d in self.dims if self.sizes[d] > 1 or d in used_keys]
        keys += [k for k in dict.fromkeys(used_keys) if k not in keys]
        world = ",".join(self.dims)
        keys += [world] * (world not in keys and len(self.dims) > 1)
        for key in keys:
            names = tuple(key.split(","))
            groups = sorted({self.ranks_along(names, r) for r in range(self.world_size)})
            shown = " ".join(str(list(g)) for g in groups)
            used = [f"{op} {what}" for dim, op, what in self.uses if dim == key]
            lines.append(f"    {key}: {shown}")
            lines += [f"      {use}" for use in used] or ["      (no collectives)"]
        for key in EXPERT_GROUPS:  # carved from the data-parallel ranks, when they were
            if key in self._groups:
                used = [f"{op} {what}" for dim, op, what in self.uses if dim == key]
                lines.append(f"    {key} (this rank's): {list(self._groups[key].ranks)}")
                lines += [f"      {use}" for use in used] or ["      (no collectives)"]
        coords = ", ".join(f"{d}={c}" for d, c in self.coordinates(self.rank).items())
        lines.append(f"  this rank: {self.rank} ({coords})")
        return "\n".join(lines)

    def _row_label(self, outer: list[str], index: tuple[int, ...]) -> str:
        if not index:
            return " ".join(f"{d}={'0' * len(str(self.sizes[d] - 1))}" for d in outer)
        return " ".join(
            f"{d}={str(i).rjust(len(str(self.sizes[d] - 1)))}" for d, i in zip(outer, index)
        )


_device_meshes: dict[tuple, Any] = {}
"""DeviceMeshes already built in this process, by (default group, sizes): compiling again
with the same layout reuses their process groups instead of creating more."""


def build_mesh(config: Mesh | None = None) -> ProcessMesh:
    """Resolve `config` (default: one `shard` dimension over every rank) on the current
    process group; a single process (no group initialised) gets every size 1, whatever
    sizes `config` asks for."""
    config = config if config is not None else Mesh()
    distributed = dist.is_available() and dist.is_initialized()
    sizes = config.sizes(dist.get_world_size() if distributed else None)
    if not distributed:
        return ProcessMesh(config=config, sizes=sizes, rank=0, device=torch.device("cpu"))
    device = collective_device()
    key = (id(dist.group.WORLD), tuple(sizes.items()), device.type)
    if key not in _device_meshes:
        from torch.distributed.device_mesh import init_device_mesh

        _device_meshes[key] = init_device_mesh(
            device.type, tuple(sizes.values()), mesh_dim_names=tuple(sizes)
        )
    mesh = ProcessMesh(
        config=config,
        sizes=sizes,
        rank=dist.get_rank(),
        device=device,
        device_mesh=_device_meshes[key],
    )
    for name in mesh.dims:  # the process groups every dimension has, built now
        mesh.group(name)
    return mesh
