"""ZeRO stage 3 at run time: gathers of each unit's full parameters, prefetch, and the
saved-tensor handles that let backward gather a unit again instead of keeping it.

Parameters hold only their shard. `strato::zero_gather` nodes gather a unit for forward
(prefetching the next `prefetch` units of the pass's recorded forward order
asynchronously); while forward runs, autograd saves gathered parameters as handles and
backward gathers them again; the gather's backward reduce-scatters gradients straight
into the shards' gradient buffer. Gathers are also issued ahead across the boundaries:
forward's last release starts the units backward needs first, and the update starts the
next forward's first units (it updates them before the rest, so their gathers overlap
the rest of the update). Prefetched gathers are dropped where parameters change outside
an update (checkpoint load).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import torch

from . import collectives, saved_tensors
from .zero_ops import UNIT_ATTR

if TYPE_CHECKING:
    from .zero import Group, ZeroManager


class Stage3Units:
    """Gathers, prefetch and saved-tensor handles for the stage-3 units of one model."""

    def __init__(
        self, manager: ZeroManager, units: list[Group], order: list[int], prefetch: int
    ) -> None:
        self.manager = manager
        self.units = units
        self.order = order
        """Unit indices in the order forward first uses them (the pass's forward_order)."""
        self.prefetch = prefetch
        self.live: dict[int, tuple[int, int]] = {}
        """storage pointer of a gathered full parameter -> (unit index, parameter index)."""
        self.in_flight: dict[int, tuple[torch.Tensor, Any]] = {}
        """unit index -> (gather buffer, work) of gathers issued ahead of use."""
        self.backward_full: dict[int, list[torch.Tensor]] = {}
        self.forward_full: dict[int, list[torch.Tensor]] = {}
        self.backward_order: list[int] = []
        self.saved_units: list[int] = []
        self.gathered = 0
        """Units gathered in this forward so far."""
        self.reductions: list[tuple[Group, torch.Tensor, Any]] = []
        self._hooks_pushed = False
        self._callback_queued = False
        for i, unit in enumerate(units):
            handle = UnitHandle(self, i)
            for p in unit.params:
                setattr(p, UNIT_ATTR, handle)

    # -------------------------------------------------------------- gathering
    def _issue(self, i: int) -> tuple[torch.Tensor, Any]:
        unit = self.units[i]
        send = torch.cat([p.detach().reshape(-1) for p in unit.params])
        if send.device != self.manager.comm_device:
            send = send.to(self.manager.comm_device)
        out = torch.empty(unit.shards * unit.shard_numel, dtype=send.dtype, device=send.device)
        work = collectives.all_gather_into_tensor(out, send, group=unit.shard_group, async_op=True)
        return out, work

    def _gather(self, i: int, order: list[int]) -> list[torch.Tensor]:
        """Full parameters of unit i; issue the next `prefetch` gathers of `order` ahead."""
        out, work = self.in_flight.pop(i, None) or self._issue(i)
        if i in order:
            pos = order.index(i)
            for j in order[pos + 1 : pos + 1 + self.prefetch]:
                if j not in self.in_flight:
                    self.in_flight[j] = self._issue(j)
        work.wait()
        unit = self.units[i]
        rows = out.view(unit.shards, unit.shard_numel)
        fulls = []
        for numel, shape, offset, shard in zip(
            unit.numels, unit.shapes, unit.offsets, unit.shard_numels
        ):
            # One copy out of the rank-major buffer; the padding (< N elements) stays behind.
            full = torch.empty(rows.shape[0], shard, dtype=out.dtype, device=self.manager.device)
            full.copy_(rows[:, offset : offset + shard])
            fulls.append(full.view(-1)[:numel].view(shape))
        return fulls

    def forward_order(self) -> list[int]:
        return self.order

    def gather_for_forward(self, i: int, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        unit = self.units[i]
        if len(shards) != len(unit.params) or any(a is not b for a, b in zip(shards, unit.params)):
            raise RuntimeError(
                f"strato::zero_gather: the graph gathers another parameter set than unit "
                f"{unit.name!r} of the runtime; recompile this graph with the same strategy."
            )
        fulls = self._gather(i, self.forward_order())
        self.gathered += 1
        if self._hooks_pushed:  # (grad mode is off inside the op: ask the hooks instead)
            # Held until zero_release, so no other tensor can reuse these addresses while
            # the pack hook still maps them to this unit.
            self.forward_full[i] = fulls
            for k, full in enumerate(fulls):
                self.live[full.untyped_storage().data_ptr()] = (i, k)
        return fulls

    def release_after_forward(self, i: int) -> None:
        self.forward_full.pop(i, None)
        for ptr in [ptr for ptr, (u, _) in self.live.items() if u == i]:
            del self.live[ptr]
        if self._hooks_pushed and not self.forward_full and self.gathered == len(self.units):
            # Forward has gathered every unit and holds none now: start the gathers backward
            # needs first, so they overlap the loss and the start of backward.
            self.prefetch_units(list(reversed(self.saved_units))[: self.prefetch])

    def prefetch_units(self, indices: list[int]) -> None:
        """Start the gathers of units `indices` (their next _gather takes them)."""
        for j in indices:
            if j not in self.in_flight:
                self.in_flight[j] = self._issue(j)

    def drop_prefetched(self) -> None:
        """Land and drop gathers issued ahead but never used (before parameters change)."""
        for _, work in self.in_flight.values():
            work.wait()
        self.in_flight.clear()

    # -------------------------------------------------------------- saved tensors
    def begin_forward(self) -> None:
        if self._hooks_pushed:  # a forward that raised left them pushed
            saved_tensors.pop_default_hooks("zero3")
        self.live.clear()
        self.forward_full.clear()
        self.saved_units = []
        self.gathered = 0
        saved_tensors.push_default_hooks("zero3", self._pack, self._unpack)
        self._hooks_pushed = True

    def end_forward(self) -> None:
        if self._hooks_pushed:
            saved_tensors.pop_default_hooks("zero3")
            self._hooks_pushed = False
        self.live.clear()
        self.forward_full.clear()
        self.backward_order = list(reversed(self.saved_units))

    def _pack(self, tensor: torch.Tensor) -> Any:
        if not self.live or tensor.layout != torch.strided:
            return tensor
        hit = self.live.get(tensor.untyped_storage().data_ptr())
        if hit is None:
            return tensor
        if hit[0] not in self.saved_units:
            self.saved_units.append(hit[0])
        return ("strato-zero", *hit, tuple(tensor.shape), tensor.stride(), tensor.storage_offset())

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not (isinstance(packed, tuple) and packed and packed[0] == "strato-zero"):
            return packed
        _, i, k, shape, stride, offset = packed
        if i not in self.backward_full:
            self.backward_full[i] = self._gather(i, self.backward_order)
        return self.backward_full[i][k].as_strided(shape, stride, offset)

    # -------------------------------------------------------------- gradients
    def reduce_gradients(self, i: int, grads: list[torch.Tensor | None]) -> None:
        self.backward_full.pop(i, None)
        unit = self.units[i]
        self.reductions.append(self.manager.launch_reduce_scatter(unit, grads))
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish_backward)

    def finish_backward(self) -> None:
        """End of a backward (queued on the autograd engine): land the reductions."""
        self._callback_queued = False
        for unit, out in self.manager.land_reductions(self.reductions):
            self.manager.accumulate_shard_grad(unit, out)
        self.reductions = []
        self.backward_full.clear()
        self.drop_prefetched()


@attrs.define(eq=False)
class UnitHandle:
    """What a shard Parameter points to (zero_ops.UNIT_ATTR): its unit in the runtime."""

    units: Stage3Units
    index: int

    def gather_for_forward(self, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.units.gather_for_forward(self.index, shards)

    def release_after_forward(self) -> None:
        self.units.release_after_forward(self.index)

    def reduce_gradients(self, grads: list[torch.Tensor | None]) -> None:
        self.units.reduce_gradients(self.index, grads)

    def begin_forward(self) -> None:
        self.units.begin_forward()

    def end_forward(self) -> None:
        self.units.end_forward()
