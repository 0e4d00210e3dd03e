"""One torch.library custom op per fused region structure, named after its kernel.

`fused_op(region)` registers `strato::<kind>_<digest>(Tensor[] inputs) -> Tensor[]`
once per process: the forward runs the generated Triton kernel or the region's torch
reference (see `kernel_backend`), the fake impl runs the reference on fake tensors,
and the backward runs the generated backward kernel or recomputes the reference ops
under autograd. Regions with the same structure (e.g. every layer's residual-add +
LayerNorm) share one op and one kernel. A region with random dropout also returns the
seed its masks came from, so its backward can recompute them.

An exported artifact carries each fused op's region (its JSON form) and kernel source;
`register_exported` registers the op in a fresh process from them, after checking that
the source is exactly the one this Strato renders for that region (so an artifact can
never bring code of its own to run).
"""

from __future__ import annotations

import types

import torch

from ..codegen.cache import load_kernel_module
from ..codegen.generate import kernel_source
from ..codegen.region import Region, run_reference
from .backend import kernel_backend

_ops: dict[str, torch._ops.OpOverload] = {}
_modules: dict[str, types.ModuleType] = {}
_sources: dict[str, str] = {}
_regions: dict[str, Region] = {}


def op_name(region: Region) -> str:
    return f"{region.kind}_{region.digest()}"


def fused_op(region: Region) -> torch._ops.OpOverload:
    """The custom op running `region`; its kernel is rendered and loaded through the
    on-disk cache now, so template errors surface at compile time."""
    name = op_name(region)
    source = kernel_source(region)
    _modules[name] = load_kernel_module(source, name)
    _sources[name] = source
    _regions[name] = region
    if name not in _ops:
        _ops[name] = _register(name, region)
    return _ops[name]


def fused_source(region: Region) -> str:
    """The generated Triton source of `region`'s kernel (after `fused_op`)."""
    return _sources[op_name(region)]


def fused_region(name: str) -> Region | None:
    """The region of the fused op `strato::<name>` registered in this process, if any."""
    return _regions.get(name)


class KernelMismatchError(ValueError):
    """An exported kernel is not what this Strato generates for its region."""


def register_exported(name: str, region: Region, source: str) -> torch._ops.OpOverload:
    """Register `strato::<name>` from an artifact's region and kernel source.

    The op name must be the region's structural name and the source the one rendered
    here for it; anything else (an edited kernel, another Strato's templates) raises
    KernelMismatchError before any of it is imported."""
    if op_name(region) != name:
        raise KernelMismatchError(
            f"its region's structure names the op {op_name(region)!r}, not {name!r}"
        )
    if kernel_source(region) != source:
        raise KernelMismatchError(
            f"the source differs from the kernel this Strato generates for region "
            f"{region.name!r} (edited, or exported by another Strato version)"
        )
    return fused_op(region)


def _aliases(out: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    ptr = out.untyped_storage().data_ptr()
    return any(x.untyped_storage().data_ptr() == ptr for x in inputs)


def _register(name: str, region: Region) -> torch._ops.OpOverload:
    random = region.n_dropout > 0

    # A region with random dropout returns one more output: the int64 seed its masks were
    # drawn from (drawn from torch's CPU generator, so torch.manual_seed governs it), which
    # the backward reads to recompute the same masks.
    @torch.library.custom_op(f"strato::{name}", mutates_args=(), tags=_tags(random))
    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        seed = int(torch.randint(0, 2**31 - 1, ())) if random else 0
        if kernel_backend(inputs[0].device) == "triton":
            outs = _modules[name].forward(inputs, seed)
        else:
            outs = run_reference(region, inputs, seed)
            # Outputs may not alias the inputs or each other (identity ops can).
            outs = [o.clone() if _aliases(o, inputs + outs[:k]) else o for k, o in enumerate(outs)]
        return outs + ([torch.tensor(seed, dtype=torch.int64)] if random else [])

    @run.register_fake
    def _(inputs):
        outs = [o.clone() for o in run_reference(region, inputs)]
        return outs + ([torch.empty((), dtype=torch.int64, device="cpu")] if random else [])

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[0], *(output[-1:] if random else []))

    def backward(ctx, grads):
        inputs = list(ctx.saved_tensors)
        seed = int(inputs.pop()) if random else 0
        grads = list(grads)[: len(region.outputs)]
        if kernel_backend(inputs[0].device) == "triton":
            grads_in = _modules[name].backward(inputs, grads, seed)
        else:
            grads_in = reference_backward(region, inputs, grads, seed)
        return [g if x.is_floating_point() else None for g, x in zip(grads_in, inputs)]

    run.register_autograd(backward, setup_context=setup_context)
    return torch.ops.strato.__getattr__(name).default


def _tags(random: bool) -> tuple:
    return (torch.Tag.nondeterministic_seeded,) if random else ()


def reference_backward(
    region: Region,
    inputs: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    seed: int | None = None,
) -> list[torch.Tensor | None]:
    """Gradients of the region's inputs by recomputing its reference ops under autograd."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        outs = run_reference(region, leaves, seed)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt = [x for x in leaves if x.requires_grad]
        found = torch.autograd.grad(
            [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True
        )
    by_leaf = dict(zip(map(id, wrt), found))
    return [
        (by_leaf.get(id(x)) if by_leaf.get(id(x)) is not None else torch.zeros_like(x))
        if x.requires_grad
        else None
        for x in leaves
    ]
