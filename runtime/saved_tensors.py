"""The saved-tensor policy: what autograd keeps for backward inside recompute regions.

One place decides it for every region the recompute pass outlined. `RecomputeRegion` runs
'full' and 'selective' from the region's graph (`region_replay.Replayed`: the forward runs
without autograd and keeps the region's inputs and, under 'selective', its matmul/attention
outputs; backward replays the rest with the same RNG state, so dropout replays the same
mask). Regions the replay cannot take (in-place ops, a kept op without a formula) run
under torch.utils.checkpoint (`run_region`: non-reentrant, RNG preserved; 'selective' with
torch's selective-checkpoint contexts). `offload` moves what is kept to host memory.

`kept_bytes` measures what a forward leaves alive for backward: every storage an ATen op
created during the forward and still alive after it (autograd's saved tensors, the inputs
checkpoint holds for recomputation, selective checkpoint's cache), which is also what
`saved_tensors_hooks` sees when nothing is recomputed. On fake tensors it is the estimate
`explain()` prints, on real ones the measurement tests compare it with.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)
from torch.utils.flop_counter import flop_registry

from .region_replay import Replayed, ReplayProgram, replay_program

aten = torch.ops.aten

SAVED_BY_SELECTIVE = {
    aten.mm.default,
    aten.addmm.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten.convolution.default,
}
"""Ops whose outputs selective recomputation keeps: linear layers and fused attention.
Batched matmuls (an unfused attention core: QKᵀ, probabilities x V) are recomputed, as in
Megatron's selective recomputation: their T x T outputs cost more memory than FLOPs."""


def _selective_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if func in SAVED_BY_SELECTIVE:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_default_hooks: list[str] = []
"""Owners of the saved-tensor default hooks pushed through `push_default_hooks`, innermost last."""


def push_default_hooks(owner: str, pack: Callable, unpack: Callable) -> None:
    """Make (pack, unpack) autograd's saved-tensor hooks until `pop_default_hooks(owner)`; the
    one place that pushes them for a whole forward (ZeRO-3's parameter handles). Regions
    push checkpoint's hooks on top, so inside a recomputed region checkpoint decides."""
    torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)
    _default_hooks.append(owner)


def pop_default_hooks(owner: str) -> None:
    if not _default_hooks or _default_hooks[-1] != owner:
        raise RuntimeError(
            f"saved-tensor hooks of {owner!r} popped while {_default_hooks or 'none'} are pushed "
            "(innermost last): hooks must be popped in the reverse order of pushing"
        )
    torch._C._autograd._pop_saved_tensors_default_hooks()
    _default_hooks.pop()


_current_region: list[str] = []
"""Module path of the region whose forward is running (measurement attributes bytes to it)."""


class RecomputeRegion(torch.nn.Module):
    """One outlined recompute region: its body graph, run under the region's policy."""

    def __init__(self, path: str, policy: str, offload: bool) -> None:
        super().__init__()
        self.path = path
        """The module the region is (`blocks.3`)."""
        self.policy = policy
        self.offload = offload
        self.body: torch.nn.Module | None = None
        self.model_tensor_inputs: tuple[int, ...] = ()
        """Positions of the body's inputs that are the model's parameters/buffers: the
        recomputation reads them as they are (ZeRO-3 finds its shards by the Parameter
        objects), and checkpoint does not save them."""
        self.grad_in_forward = False
        """The region's one output is the scalar loss (the pass checked): under 'full' and
        'selective' its backward runs in forward and only its input gradients are kept."""
        self._programs: dict[tuple[str, int], tuple[ReplayProgram | None, str]] = {}
        """(policy, id(body)) -> its replay program (or None) and why not, built on first use."""

    def forward(self, *args):
        _current_region.append(self.path)
        try:
            if self.grad_in_forward and self.policy != "none" and torch.is_grad_enabled():
                return _GradInForward.apply(self.body, self.offload, *args)
            program = self.program() if torch.is_grad_enabled() else None
            if program is not None:
                return Replayed.apply(program, self.model_tensor_inputs, self.offload, *args)
            fixed = {i: args[i] for i in self.model_tensor_inputs}
            moving = [a for i, a in enumerate(args) if i not in fixed]

            def body(*values):
                it = iter(values)
                return self.body(*(fixed[i] if i in fixed else next(it) for i in range(len(args))))

            return run_region(body, tuple(moving), self.policy, self.offload)
        finally:
            _current_region.pop()

    def program(self) -> ReplayProgram | None:
        """The region's forward/replay graphs under its policy ('full', 'selective'), or None
        where it runs under torch.utils.checkpoint (`replay_program` says why)."""
        if self.policy == "none":
            return None
        key = (self.policy, id(self.body))
        if key not in self._programs:
            self._programs[key] = replay_program(self.body, self.policy)
        return self._programs[key][0]

    def replay_note(self) -> str:
        """How the region recomputes: replayed from its graph, or why under checkpoint."""
        if self.policy == "none":
            return ""
        self.program()
        why = self._programs[(self.policy, id(self.body))][1]
        return "replayed from its graph" if not why else f"torch.utils.checkpoint ({why})"

    def extra_repr(self) -> str:
        grad = ", grad_in_forward" if self.grad_in_forward else ""
        return f"{self.path!r}, policy={self.policy!r}, offload={self.offload}{grad}"


class _GradInForward(torch.autograd.Function):
    """A region whose only output is the loss: forward computes the loss and, at once, its
    gradients with respect to the region's inputs (activations and parameters); backward
    scales them by the incoming gradient (the loss is the graph's end, so that is exact:
    1, or a loss-scale / accumulation factor). Nothing is recomputed; what stays for
    backward is the input gradients instead of the region's activations (a language
    model's vocabulary-sized logits and log-probabilities)."""

    @staticmethod
    def forward(ctx, body, offload, *args):
        leaves = [
            a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in args
        ]
        wrt = [i for i, a in enumerate(leaves) if isinstance(a, torch.Tensor) and a.requires_grad]
        with torch.enable_grad():
            (loss,) = body(*leaves)
            grads = torch.autograd.grad(loss, [leaves[i] for i in wrt], allow_unused=True)
        if offload:
            grads = tuple(g.to("cpu", non_blocking=True) if g is not None else g for g in grads)
        ctx.grads = dict(zip(wrt, grads))
        ctx.devices = {i: args[i].device for i in wrt}
        ctx.inputs = len(args)
        return (loss.detach(),)

    @staticmethod
    def backward(ctx, grad_loss):
        out = [None] * ctx.inputs
        for i, g in ctx.grads.items():
            if g is not None:
                out[i] = g.to(ctx.devices[i]) * grad_loss
        return (None, None, *out)


def run_region(body: Callable, args: tuple, policy: str, offload: bool = False) -> Any:
    """Run one recompute region's forward under its policy. With `offload`, what autograd
    saves outside checkpoint's own hooks (the region's inputs; everything under 'none')
    goes to host memory, as DeepSpeed's cpu_checkpointing does."""
    if not torch.is_grad_enabled():
        return body(*args)
    if policy == "none":
        with torch.autograd.graph.save_on_cpu() if offload else contextlib.nullcontext():
            return body(*args)
    context_fn = None
    if policy == "selective":
        context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    kwargs = {"context_fn": context_fn} if context_fn is not None else {}
    store = torch.autograd.graph.save_on_cpu() if offload else contextlib.nullcontext()
    with store:
        return checkpoint(body, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def op_flops(func, args, kwargs, out) -> int:
    """FLOPs of one ATen call: torch's flop formulas for matmul-like ops, else output numel."""
    formula = flop_registry.get(func._overloadpacket)
    if formula is not None:
        return int(formula(*args, **(kwargs or {}), out_val=out))
    return sum(
        _numel(t) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
    )


def _numel(t: torch.Tensor) -> int:
    try:
        return int(t.numel())
    except Exception:
        return 0


MATMUL_FLOPS_PER_S = 5e10
"""Throughput of the ops selective keeps (matmuls, attention), one CPU thread (AVX2 fp32
mm measured 53 GFLOP/s). With the two below it ranks recompute plans; only ratios matter."""
BYTES_PER_S = 8e9
"""Bytes other ops read and write per second (elementwise, norms, softmax: 5-34 GB/s here)."""
SECONDS_PER_OP = 8e-6
"""Overhead of one recomputed ATen op: dispatch in the replay and its autograd record."""


@attrs.frozen
class OpCost:
    """What one class of a region's ops costs to run once: FLOPs, bytes touched, calls."""

    flops: int = 0
    bytes: int = 0
    ops: int = 0

    def __add__(self, other: OpCost) -> OpCost:
        return OpCost(self.flops + other.flops, self.bytes + other.bytes, self.ops + other.ops)

    def seconds(self, matmul: bool) -> float:
        """Run time: FLOPs at matmul speed for kept ops, bytes at memory speed for the rest."""
        work = self.flops / MATMUL_FLOPS_PER_S if matmul else self.bytes / BYTES_PER_S
        return work + self.ops * SECONDS_PER_OP


def _storage_bytes(tensors) -> int:
    return sum(
        t.untyped_storage().nbytes()
        for t in tensors
        if isinstance(t, torch.Tensor) and t.layout == torch.strided
    )


class _CreatedStorages(TorchDispatchMode):
    """Weak references to the storages ATen ops create, with their bytes and region, and the
    cost (`OpCost`) of each region's ops selective recomputation keeps and of the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.created: dict[int, tuple[StorageWeakRef, int, str]] = {}
        self.costs: dict[tuple[str, bool], OpCost] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        region = _current_region[-1] if _current_region else ""
        # Views and in-place results live in an input's storage: created before (or never).
        ins = [
            t
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        ]
        inputs = {t.untyped_storage()._cdata for t in ins if t.layout == torch.strided}
        made = []
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                storage = t.untyped_storage()
                if storage._cdata not in inputs:
                    made.append(t)
                    ref = StorageWeakRef(storage)
                    self.created.setdefault(ref.cdata, (ref, storage.nbytes(), region))
        if region:
            key = (region, func in SAVED_BY_SELECTIVE)
            moved = _storage_bytes(ins) + _storage_bytes(made) if made else 0  # views: none
            cost = OpCost(op_flops(func, args, kwargs, out), moved, 1)
            self.costs[key] = self.costs.get(key, OpCost()) + cost
        return out


@attrs.frozen
class Kept:
    """What a forward leaves alive for backward: bytes overall and by region, op costs by region."""

    total: int
    by_region: dict[str, int]
    """Region module path -> bytes of kept storages created inside it ('' : outside any)."""
    region_costs: dict[tuple[str, bool], OpCost]
    """(region, op kept by selective) -> what the region's forward ops of that class cost."""

    def recomputed(self, region: str, policy: str) -> OpCost:
        """Ops backward runs again for `region` under `policy` (from a policy-none run):
        'full' all, 'selective' those it does not keep, 'none' nothing."""
        cheap = self.region_costs.get((region, False), OpCost())
        if policy == "full":
            return cheap + self.region_costs.get((region, True), OpCost())
        return cheap if policy == "selective" else OpCost()

    def flops(self, region: str, policy: str) -> int:
        """FLOPs backward spends recomputing `region` under `policy`."""
        return self.recomputed(region, policy).flops

    def recompute_seconds(self, region: str, policy: str) -> float:
        """Estimated time backward spends recomputing `region` under `policy`."""
        if policy == "none":
            return 0.0
        kept = self.region_costs.get((region, True), OpCost())
        seconds = self.region_costs.get((region, False), OpCost()).seconds(matmul=False)
        if policy == "full":
            return seconds + kept.seconds(matmul=True)
        return seconds + kept.ops * SECONDS_PER_OP  # each kept output's stand-in in the replay


def kept_bytes(forward: Callable[[], Any], keep: Callable[[Any], Any] = lambda out: out) -> Kept:
    """The storages created by `forward()` still alive while only `keep(output)` (the loss,
    say) and the autograd graph hanging from it remain, not counting the kept tensors' own."""
    mode = _CreatedStorages()
    with mode:
        out = forward()
    kept = keep(out)
    del out
    gc.collect()
    own = {
        StorageWeakRef(t.untyped_storage()).cdata
        for t in torch.utils._pytree.tree_leaves(kept)
        if isinstance(t, torch.Tensor)
    }
    by_region: dict[str, int] = {}
    for key, (ref, nbytes, region) in mode.created.items():
        if key not in own and not ref.expired():
            by_region[region] = by_region.get(region, 0) + nbytes
    del kept
    return Kept(sum(by_region.values()), by_region, dict(mode.costs))


class _FakeRun(fx.Interpreter):
    """Runs a graph on fake tensors, parameters and buffers faked (requires_grad kept)."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode) -> None:
        super().__init__(gm)
        self.mode = mode
        self.fakes: dict[str, torch.Tensor] = {}

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if not isinstance(value, torch.Tensor):
            return value
        if target not in self.fakes:
            fake = self.mode.from_tensor(value)
            if value.requires_grad and not fake.requires_grad:
                fake.requires_grad_(True)
            self.fakes[target] = fake
        return self.fakes[target]


def measure_graph(gm: fx.GraphModule, ctx) -> Kept:
    """`kept_bytes` of one training forward of `gm` on fake copies of the example inputs."""
    from ..passes.annotate import _placeholder_values

    leaves = _placeholder_values(gm, ctx)
    if leaves is None:
        raise ValueError("the example inputs do not fit the graph's placeholders")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_leaves = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in leaves]
    with mode, torch.enable_grad():
        return kept_bytes(lambda: _FakeRun(gm, mode).run(*fake_leaves))
