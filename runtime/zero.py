"""ZeRO stages 1-3 at run time: the state manager over sharded buffers, bucketed
reduce-scatter / all-gather, stage-3 units (runtime/zero_units.py) and optimizer-state
offload (runtime/offload.py).

Everything follows the layout the zero pass recorded in ctx.records['zero'] (see
passes/zero.py): each trainable parameter is flattened, padded to a multiple of N and cut
into N shards; a *group* (stage-1/2 bucket or stage-3 unit) communicates its parameters'
shards in one rank-major [N, S] buffer. Optimizer math is torch's, run on the shards:
the optimizer holds one tensor per parameter (this rank's shard), so its state is 1/N.

- Stage 1: full gradients accumulate locally; on the boundary micro-step each bucket is
  reduce-scattered (asynchronously, as soon as backward completes it) and this rank's
  slice written back into the full gradient.
- Stage 2: a bucket is reduce-scattered (asynchronously) as soon as backward has produced
  all its gradients on the boundary micro-step; full gradients are dropped, each rank keeps
  its shard gradients only.
- Stage 1/2 after the update: each bucket's updated shards are all-gathered into the full
  parameters, in forward order; where the graph has `strato::zero_await_bucket` nodes the
  gathers are left in flight when step() returns and each lands before its bucket's first
  use in the next forward (`synchronize()` lands them all: checkpoints, eval forwards and
  `full_parameters` call it; so must code that reads the parameters directly).
- Stage 3 (runtime/zero_units.py): parameters hold only their shard and are gathered per
  unit around their use. Stage-3 gradients are reduce-scattered on every micro-step, so
  accumulation never needs full gradients.
- Offload: the optimizer's tensors (its copy of the shards and its states) live on CPU, or
  in memory-mapped files under NVMe(path); the update runs there, and the updated shards
  are copied back. With stage 3 the parameter shards themselves live there too.
"""

from __future__ import annotations

import weakref
from typing import Any

import attrs
import torch

from ..compiler.context import CompileContext
from ..compiler.strategy import Strategy
from . import collectives
from .buckets import GradientReducer, broadcast_model, owned_range, shard_numel
from .expert_parallel import broadcast_experts
from .grad_norm import clip_grad_norm_, found_nonfinite, grad_counting
from .mesh import MeshGroup
from .offload import offload_store
from .optim import param_groups
from .train_state import ShardedState, apply_state, collect_state
from .zero_ops import BUCKET_ATTR
from .zero_units import Stage3Units


@attrs.define(eq=False)
class Group:
    """A bucket or unit: parameters communicated together in one [N, S] buffer."""

    name: str
    names: list[str]
    params: list[torch.nn.Parameter]
    numels: list[int]
    shapes: list[tuple[int, ...]]
    offsets: list[int]
    shard_numels: list[int]
    shard_numel: int
    shard_group: MeshGroup
    """The ranks the group's parameters are sharded over: its gathers and reduce-scatters
    run here (`shard`; `expert_replicate` for expert weights)."""
    replicate_group: MeshGroup | None
    """The ranks holding the same shards (reduced shards are all-reduced here), or None."""
    grad_shard: torch.Tensor | None = None
    """Reduced gradient shards (stage 2/3): [S], this rank's part of every parameter."""

    @property
    def shards(self) -> int:
        return self.shard_group.size

    def owned(self, numel: int) -> tuple[int, int]:
        """[lo, hi) of a parameter's flat elements this rank owns (may be empty)."""
        return owned_range(numel, self.shards, self.shard_group.rank)


def _group(
    spec: dict,
    params: dict[str, torch.nn.Parameter],
    groups: tuple[MeshGroup, MeshGroup | None],
) -> Group:
    names = spec["params"]
    ps = [params[name] for name in names]
    numels = [p.numel() for p in ps]
    return Group(
        name=spec["name"],
        names=list(names),
        params=ps,
        numels=numels,
        shapes=[tuple(p.shape) for p in ps],
        offsets=[spec["offsets"][name] for name in names],
        shard_numels=[shard_numel(k, groups[0].size) for k in numels],
        shard_numel=spec["shard_numel"],
        shard_group=groups[0],
        replicate_group=groups[1],
    )


def ring_sent_bytes(payload: dict[str, int], world_size: int) -> dict[str, int]:
    """Bytes one rank sends under ring algorithms, from collectives.comm_bytes() payloads
    (all_gather: local input; reduce_scatter and all_reduce: the full input)."""
    n = world_size
    if n <= 1:
        return {k: 0 for k in payload}
    factor = {
        "all_gather": n - 1,
        "reduce_scatter": (n - 1) / n,
        "all_reduce": 2 * (n - 1) / n,
        "broadcast": 1,
    }
    return {k: int(round(v * factor.get(k, 1))) for k, v in payload.items()}


# ---------------------------------------------------------------------- the manager


class ZeroManager:
    """The StateManager for ZeRO stages 1-3 (contract: runtime/state_manager.py)."""

    sharded = True

    def __init__(
        self,
        strategy: Strategy,
        model: torch.nn.Module,
        compiled_ctx: CompileContext,
        optimizer_config: Any,
        process_group: Any | None = None,
    ) -> None:
        record = compiled_ctx.records.get("zero")
        if record is None:
            raise RuntimeError(
                "ZeRO: the training graph has no 'zero' record; the zero pass did not run "
                "(was it disabled with Strategy(disable=...)?)."
            )
        self.record = record
        self.stage = int(record["stage"])
        self.model = model
        mesh = compiled_ctx.mesh
        self.shard_group = mesh.group(record["shard_dim"])
        """The ranks this rank shards with: gathers and reduce-scatters run here."""
        self.replicate_group = mesh.group(record["replicate_dim"])
        """The ranks holding the same shards: reduced gradient shards are all-reduced here."""
        self.shards, self.shard_rank = self.shard_group.size, self.shard_group.rank
        if self.shards != record["shard_size"] or mesh.world_size != collectives.world_size():
            raise RuntimeError(
                f"ZeRO: the graph was compiled for {record['shard_size']} shards on "
                f"{record['world_size']} ranks but runs with {self.shards} on "
                f"{collectives.world_size()}; initialise torch.distributed before strato.compile."
            )
        self.data_parallel_size = self.shards * self.replicate_group.size
        """Ranks whose gradients are averaged (shards x replicas)."""
        named = dict(model.named_parameters())
        self.device = next(iter(named.values())).device if named else torch.device("cpu")
        """Where the parameters (and gradient shards) live."""
        self.comm_device = self.shard_group.device
        """Where the collective buffers live (the mesh decides: CUDA for NCCL, CPU for gloo)."""
        not_fp32 = [n for n, p in named.items() if p.requires_grad and p.dtype != torch.float32]
        if not_fp32:
            raise ValueError(
                f"ZeRO: parameter {not_fp32[0]!r} is {named[not_fp32[0]].dtype}; ZeRO shards fp32 "
                "master weights. Keep the model in fp32 and use Strategy(precision='bf16')."
            )
        self.store = offload_store(record["offload"], collectives.rank())
        weakref.finalize(self, self.store.close)
        if collectives.world_size() > 1:
            # Every rank starts from its data-parallel group's first rank's weights (within the
            # group: ranks along other dimensions, e.g. tensor, hold other pieces; expert
            # shards from the first rank holding the same experts).
            experts = broadcast_experts(model, compiled_ctx.records, mesh)
            group = mesh.group(record["replicate_dim"], record["shard_dim"])
            broadcast_model(model, group, skip=experts)

        def groups(spec: dict) -> tuple[MeshGroup, MeshGroup | None]:
            if spec.get("group") == "expert_replicate":  # expert weights (moe_dispatch)
                return mesh.group("expert_replicate"), None
            return self.shard_group, self.replicate_group

        self.buckets = [_group(b, named, groups(b)) for b in record["buckets"]]
        units = [_group(u, named, groups(u)) for u in record["units"]]
        self.group_of = {name: g for g in [*self.buckets, *units] for name in g.names}
        """Parameter name -> the bucket or unit it is communicated in."""
        self.unused = {n for n, info in record["params"].items() if not info["aliases"]}
        # Group settings (weight decay by shape/kind...) come from the whole parameters.
        self._groups = param_groups(model, optimizer_config)
        if units:
            self._shard_parameters(units)
        index_of = {unit.name: i for i, unit in enumerate(units)}
        order = [index_of[name] for name in record["forward_order"]]
        self.units = Stage3Units(self, units, order, int(record["prefetch"])) if units else None
        self.grad_groups = [*self.buckets, *units] if self.stage >= 2 else units
        for group in self.grad_groups:
            group.grad_shard = torch.zeros(group.shard_numel, device=self.device)
        self._build_optimizer(optimizer_config)
        self.gather_order = list(record["gather_order"])
        self.defer_gathers = bool(record["await_gathers"])
        self._pending_gathers: dict[int, tuple[Group, torch.Tensor, Any]] = {}
        if self.defer_gathers:
            for bucket in self.buckets:
                for p in bucket.params:
                    setattr(p, BUCKET_ATTR, self)
        self.reducer = GradientReducer([b.params for b in self.buckets], self._launch_bucket)
        self.counting = grad_counting(compiled_ctx.records, model, mesh)
        """Which gradient shards this rank counts in the global norm (runtime/grad_norm.py)."""

    # ------------------------------------------------------------------ setup
    def _shard_parameters(self, units: list[Group]) -> None:
        """Stage 3: each unit parameter keeps only this rank's (padded) shard."""
        with torch.no_grad():
            for unit in units:
                for p, numel, s in zip(unit.params, unit.numels, unit.shard_numels):
                    lo, hi = unit.owned(numel)
                    shard = torch.zeros(s, dtype=p.dtype, device=p.device)
                    shard[: hi - lo] = p.detach().reshape(-1)[lo:hi]
                    if self.store.kind is not None:  # parameter shards offloaded too
                        shard = self.store.place(shard, f"param.{unit.name}")
                    p.data = shard

    def _build_optimizer(self, optimizer_config: Any) -> None:
        """The torch optimizer over one tensor per parameter: this rank's shard."""
        self.masters: dict[str, torch.Tensor] = {}
        self.device_views: dict[str, torch.Tensor] = {}
        unit_names = {n for u in (self.units.units if self.units else []) for n in u.names}
        named = dict(self.model.named_parameters())
        for name, p in named.items():
            if not p.requires_grad or name in self.unused or name not in self.record["params"]:
                continue
            if name in unit_names:
                view = p.data  # already the shard (maybe offloaded)
            else:
                lo, hi = self.group_of[name].owned(p.numel())
                view = p.data.view(-1)[lo:hi]
            # The update runs where the states live: the shard itself when it already
            # lives there (no offload, CPU tensors under 'cpu', stage-3 offloaded shards).
            if (
                self.store.kind is None
                or (self.store.kind == "cpu" and view.device.type == "cpu")
                or (self.store.kind == "nvme" and name in unit_names)
            ):
                master = view
            else:
                master = self.store.place(view.detach(), f"master.{name}")
            self.masters[name] = torch.nn.Parameter(master, requires_grad=True)
            self.device_views[name] = view
        if not self.masters:
            raise ValueError("ZeRO: the model has no trainable parameters the graph uses.")
        self.optimizer_config = optimizer_config
        groups = []
        for group in self._groups:
            names = [n for n in group["names"] if n in self.masters]
            if names:
                groups.append({**group, "names": names, "params": [self.masters[n] for n in names]})
        self.optimizer = optimizer_config.build(groups)

    # ------------------------------------------------------------------ collectives
    def _send_buffer(self, group: Group, tensors: list[torch.Tensor | None]) -> torch.Tensor:
        """Rank-major [N, S] buffer: row r holds shard r of every tensor (zero-padded)."""
        n = group.shards
        # Every column is written below (shards are back to back), so no zero-fill first.
        buf = torch.empty(n, group.shard_numel, device=self.comm_device)
        for t, numel, offset, s in zip(tensors, group.numels, group.offsets, group.shard_numels):
            columns = buf[:, offset : offset + s]
            if t is None:
                columns.zero_()
                continue
            flat = t.detach().reshape(-1)
            if s * n == numel:
                columns.copy_(flat.view(n, s))
            else:  # zero-padded to n * s elements, then laid out rank-major
                padded = flat.new_zeros(s * n)
                padded[:numel] = flat
                columns.copy_(padded.view(n, s))
        return buf

    def launch_reduce_scatter(
        self, group: Group, grads: list[torch.Tensor | None]
    ) -> tuple[Group, torch.Tensor, Any]:
        """Start the reduce-scatter of a group's gradients over the shard group."""
        send = self._send_buffer(group, grads)
        out = torch.empty(group.shard_numel, device=self.comm_device)
        work = collectives.reduce_scatter_tensor(
            out, send.view(-1), group=group.shard_group, async_op=True
        )
        return group, out, work

    def land_reductions(
        self, launched: list[tuple[Group, torch.Tensor, Any]]
    ) -> list[tuple[Group, torch.Tensor]]:
        """Wait for reduce-scatters over `shard`, then sum each reduced shard across
        `replicate` (every all-reduce started before the first is waited for)."""
        across = []
        for group, out, work in launched:
            work.wait()
            if group.replicate_group is not None:
                work = collectives.all_reduce(out, group=group.replicate_group, async_op=True)
            across.append((group, out, work))
        for _, _, work in across:
            work.wait()
        return [(group, out) for group, out, _ in across]

    def accumulate_shard_grad(self, group: Group, reduced: torch.Tensor) -> None:
        assert group.grad_shard is not None
        group.grad_shard.add_(reduced.to(self.device), alpha=1.0 / self.data_parallel_size)

    # ------------------------------------------------------------------ gradients
    def prepare_micro_step(self, is_boundary: bool) -> None:
        self.reducer.prepare_micro_step(is_boundary)

    def _launch_bucket(self, index: int) -> tuple[Group, torch.Tensor, Any]:
        bucket = self.buckets[index]
        launched = self.launch_reduce_scatter(bucket, [p.grad for p in bucket.params])
        if self.stage >= 2:  # stage 2 keeps only the reduced shard
            for p in bucket.params:
                p.grad = None
        return launched

    def finish_backward(self) -> None:
        for group, out in self.land_reductions(self.reducer.finish()):
            if self.stage == 1:
                self._write_back_owned(group, out)
            else:
                self.accumulate_shard_grad(group, out)
        if self.units is not None and self.units.reductions:
            self.units.finish_backward()
        self._attach_grads()

    def _write_back_owned(self, bucket: Group, reduced: torch.Tensor) -> None:
        """Stage 1: this rank's averaged slice goes back into the full gradient."""
        with torch.no_grad():
            reduced = reduced.to(self.device).div_(self.data_parallel_size)
            for p, offset in zip(bucket.params, bucket.offsets):
                lo, hi = bucket.owned(p.numel())
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.view(-1)[lo:hi].copy_(reduced[offset : offset + hi - lo])

    def _attach_grads(self) -> None:
        """Point each optimizer tensor's .grad at this rank's reduced gradient shard."""
        shard_of = {}
        for group in self.grad_groups:
            assert group.grad_shard is not None
            for name, offset, numel, s in zip(
                group.names, group.offsets, group.numels, group.shard_numels
            ):
                shard_of[name] = (group.grad_shard, offset, numel, s)
        for name, master in self.masters.items():
            if name in shard_of:
                buf, offset, numel, s = shard_of[name]
                length = master.numel()
                grad = buf[offset : offset + length].view_as(master)
            else:  # stage 1: the owned slice of the full gradient
                p = self._param(name)
                lo, hi = self.group_of[name].owned(p.numel())
                grad = p.grad.view(-1)[lo:hi] if p.grad is not None else torch.zeros_like(master)
            if grad.device != master.device:
                grad = grad.to(master.device)
            master.grad = grad

    def _param(self, name: str) -> torch.nn.Parameter:
        return self.model.get_parameter(name)

    def _grads(self) -> dict[str, torch.Tensor | None]:
        return {name: m.grad for name, m in self.masters.items()}

    def unscale_(self, inv_scale: float) -> bool:
        grads = [g for g in self._grads().values() if g is not None]
        if grads:
            torch._foreach_mul_(grads, inv_scale)
        return found_nonfinite(self._grads(), self.counting)

    def clip_grad_norm_(self, max_norm: float | None) -> float:
        return clip_grad_norm_(self._grads(), self.counting, max_norm)

    # ------------------------------------------------------------------ update
    def step(self, lr_factor: float) -> None:
        """Update this rank's shards. Stages 1/2 step bucket by bucket, in forward order, and
        start each bucket's all-gather as soon as its shards are updated, so it overlaps
        the next bucket's update (and, left in flight, the next forward). Stage 3 updates
        the units the next forward gathers first before the rest, and starts those gathers."""
        self.synchronize()  # a gather still in flight would overwrite this update
        self._drop_prefetched()
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor
        grads = {name: master.grad for name, master in self.masters.items()}
        in_buckets = {name for bucket in self.buckets for name in bucket.names}
        rest = [name for name in self.masters if name not in in_buckets]
        gathers = {}
        for index in self.gather_order:  # every rank gathers every bucket, stepped or not
            bucket = self.buckets[index]
            self._step_only(bucket.names, grads)
            gathers[index] = self._launch_gather(bucket)
        if self.units is not None and self.units.prefetch:
            head = self.units.forward_order()[: self.units.prefetch]
            names = [name for i in head for name in self.units.units[i].names]
            if self._step_only(names, grads):
                self._write_back(names)
            self.units.prefetch_units(head)
            stepped = set(names)
            rest = [name for name in rest if name not in stepped]
        if self._step_only(rest, grads):
            self._write_back(rest)
        for master, grad in zip(self.masters.values(), grads.values()):
            master.grad = grad
        self._offload_new_state()
        # Measured while gradients and states are all alive (the per-step high-water mark).
        self._step_breakdown = self.model_state_breakdown()
        self._pending_gathers = gathers
        if not self.defer_gathers:
            self.synchronize()

    def await_bucket(self, index: int) -> None:
        """Land bucket `index`'s parameter all-gather if it is in flight (the graph's
        `strato::zero_await_bucket` calls this before the bucket's first use)."""
        pending = self._pending_gathers.pop(index, None)
        if pending is not None:
            bucket, out, work = pending
            work.wait()
            self._scatter_gathered(bucket, out)

    def synchronize(self) -> None:
        """Land every parameter all-gather in flight: afterwards the parameters hold the
        values of the last update on every rank."""
        for index in list(self._pending_gathers):
            self.await_bucket(index)

    def _drop_prefetched(self) -> None:
        """Land and drop stage-3 gathers issued ahead (the next forward's first units, or a
        forward's for its backward that never ran): the parameters are about to change."""
        if self.units is not None:
            self.units.drop_prefetched()

    def _step_only(self, names: list[str], grads: dict[str, torch.Tensor | None]) -> bool:
        """One optimizer step over the masters `names` (torch skips tensors without .grad)."""
        chosen = set(names)
        any_grad = False
        for name, master in self.masters.items():
            master.grad = grads[name] if name in chosen else None
            any_grad = any_grad or master.grad is not None
        if any_grad:
            self.optimizer.step()
        return any_grad

    def _write_back(self, names: list[str]) -> None:
        """Copy updated masters that live elsewhere (offload) back into the parameters."""
        with torch.no_grad():
            for name in names:
                if name not in self.masters:  # frozen or unused by the graph
                    continue
                master, view = self.masters[name], self.device_views[name]
                if view.data_ptr() != master.data_ptr():
                    view.copy_(master.detach())

    def _launch_gather(self, bucket: Group) -> tuple[Group, torch.Tensor, Any]:
        """Start the all-gather of a bucket's updated shards."""
        self._write_back(bucket.names)
        send = torch.empty(bucket.shard_numel, device=self.comm_device)
        with torch.no_grad():
            for p, offset, s in zip(bucket.params, bucket.offsets, bucket.shard_numels):
                lo, hi = bucket.owned(p.numel())
                send[offset : offset + hi - lo].copy_(p.detach().reshape(-1)[lo:hi])
                send[offset + hi - lo : offset + s].zero_()  # padding of the last shard
        out = torch.empty(bucket.shards * bucket.shard_numel, device=self.comm_device)
        work = collectives.all_gather_into_tensor(
            out, send, group=bucket.shard_group, async_op=True
        )
        return bucket, out, work

    def _scatter_gathered(self, bucket: Group, out: torch.Tensor) -> None:
        """Write a bucket's gathered shards [N, S] into the full parameters."""
        rows = out.view(bucket.shards, bucket.shard_numel)
        n = bucket.shards
        with torch.no_grad():
            for p, numel, offset, s in zip(
                bucket.params, bucket.numels, bucket.offsets, bucket.shard_numels
            ):
                if s * n == numel:  # one strided copy straight into the parameter
                    p.data.view(n, s).copy_(rows[:, offset : offset + s])
                else:
                    p.data.view(-1).copy_(rows[:, offset : offset + s].reshape(-1)[:numel])

    def _offload_new_state(self) -> None:
        """Move optimizer states torch just created into the offload store (first step)."""
        if self.store.kind is None:
            return
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.dim() > 0
                    and getattr(value, "_strato_offloaded", False) is False
                    and (self.store.kind == "nvme" or value.device.type != "cpu")
                ):
                    placed = self.store.place(value, f"state.{key}")
                    placed._strato_offloaded = True  # type: ignore[attr-defined]
                    state[key] = placed

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None
        for master in self.masters.values():
            master.grad = None
        for group in self.grad_groups:
            assert group.grad_shard is not None
            group.grad_shard.zero_()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, layouts: dict[str, Any], aliases: dict[str, str]) -> ShardedState:
        """This rank's pieces: its parameter shards (owned ranges) and optimizer shards."""
        self.synchronize()
        return collect_state(self.model, self.optimizer, layouts, aliases)

    def load_state_dict(self, state: ShardedState) -> None:
        """Pieces already resharded to this rank's layout (runtime/engine_state.py)."""
        self.synchronize()  # (a gather landing later would overwrite what is loaded)
        self._drop_prefetched()
        with torch.no_grad():
            apply_state(self.model, self.optimizer, state)
            # The optimizer's copies must match the loaded parameters.
            for name, master in self.masters.items():
                view = self.device_views[name]
                if view.data_ptr() != master.data_ptr():
                    master.data.copy_(view)
        self._offload_new_state()

    # ------------------------------------------------------------------ accounting
    def model_state_breakdown(self) -> dict[str, dict[str, int]]:
        """Bytes held for parameters, gradients and optimizer states, by where they live
        ('memory' for device/CPU tensors, 'nvme' for memory-mapped files); each storage once."""
        seen: set[int] = set()
        out: dict[str, dict[str, int]] = {}

        def add(kind: str, t: torch.Tensor | None, where: str | None = None) -> None:
            if t is None or t.numel() == 0:
                return
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                return
            seen.add(storage.data_ptr())
            place = where or "memory"
            out.setdefault(kind, {}).setdefault(place, 0)
            out[kind][place] += storage.nbytes()

        nvme = self.store.kind == "nvme"
        for p in self.model.parameters():
            add("parameters", p.data, "nvme" if nvme and self.units and p.dim() == 1 else None)
        for master in self.masters.values():
            add("parameters", master.data, "nvme" if nvme else None)
        for p in self.model.parameters():
            add("gradients", p.grad)
        for group in self.grad_groups:
            add("gradients", group.grad_shard)
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    add("optimizer_state", value, "nvme" if nvme and value.dim() > 0 else None)
        return out

    def model_state_bytes(self) -> int:
        """Measured at the last update (gradients and states alive), else now."""
        breakdown = getattr(self, "_step_breakdown", None) or self.model_state_breakdown()
        return sum(v for kinds in breakdown.values() for v in kinds.values())

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter in full (stage 3: all-gathered; call on all ranks)."""
        self.synchronize()
        out = {}
        for name, p in self.model.named_parameters():
            out[name] = p.detach().clone()
        if self.units is not None:
            for i, unit in enumerate(self.units.units):
                for name, full in zip(unit.names, self.units._gather(i, [])):
                    out[name] = full
        return out

    def close(self) -> None:
        self.synchronize()
        self._drop_prefetched()
        self.store.close()


def make_zero_manager(
    strategy: Strategy,
    model: torch.nn.Module,
    compiled_ctx: CompileContext,
    optimizer_config: Any,
    process_group: Any | None,
) -> ZeroManager:
    """The ZeRO StateManager (called by runtime/state_manager.make_state_manager); its
    process groups come from `compiled_ctx.mesh`, so `process_group` must be None."""
    if process_group is not None:
        raise ValueError(
            "ZeRO: process groups come from Strategy.mesh (ctx.mesh); pass process_group=None."
        )
    return ZeroManager(strategy, model, compiled_ctx, optimizer_config, process_group)
