"""Per-rank memory and communication estimates, read from the graph and the compile context.

Passes that change what a rank holds (sharding, offload, quantization) record it in
`ctx.records`; this module only reads those records and node metadata.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.fx as fx

from .context import CompileContext


def tensor_bytes(value: Any) -> int:
    """Bytes of a tensor (fake or real) or of every tensor inside a tuple/list; 0 if symbolic."""
    if isinstance(value, torch.Tensor):
        try:
            return int(value.numel()) * value.element_size()
        except Exception:  # a symbolic size: count it by its hint where one exists
            numel = value.numel()
            hint = getattr(getattr(numel, "node", None), "hint", None)
            return int(hint) * value.element_size() if hint is not None else 0
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    return 0


def unique_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters by their first name; tied weights count once."""
    return dict(model.named_parameters())


@attrs.frozen
class Explanation:
    """Per-rank estimate of what a compiled model holds and sends; renders as a table."""

    parameter_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    activation_bytes: int
    world_size: int = 1
    rank: int = 0
    comm_bytes_per_step: dict[str, int] = attrs.field(factory=dict)
    """Bytes this rank sends per optimizer step (ring algorithms), by collective kind."""
    comm_bytes_per_dim: dict[str, dict[str, int]] = attrs.field(factory=dict)
    """The same bytes by mesh dimension ('shard', 'replicate', 'replicate,shard'), then kind."""
    notes: tuple[str, ...] = ()

    @property
    def model_state_bytes(self) -> int:
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_state_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_state_bytes + self.activation_bytes

    def rows(self) -> list[tuple[str, int]]:
        rows = [
            ("parameters", self.parameter_bytes),
            ("gradients", self.gradient_bytes),
            ("optimizer state", self.optimizer_state_bytes),
            ("activations", self.activation_bytes),
            ("total", self.total_bytes),
        ]
        rows += [(f"comm/step: {kind}", n) for kind, n in sorted(self.comm_bytes_per_step.items())]
        rows += [
            (f"  over {dim}: {kind}", n)
            for dim, kinds in sorted(self.comm_bytes_per_dim.items())
            for kind, n in sorted(kinds.items())
        ]
        return rows

    def __str__(self) -> str:
        title = f"Per-rank estimate (rank {self.rank} of {self.world_size})"
        width = max(len(name) for name, _ in self.rows())
        lines = [title, "-" * len(title)]
        for name, n in self.rows():
            lines.append(f"{name:<{width}}  {n:>14,d} B  {format_bytes(n):>10}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def activation_bytes(gm: fx.GraphModule, training: bool) -> int:
    """Training: bytes of every intermediate a backward may keep (an upper bound).
    Inference: the peak of live intermediates, walking the graph in order."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    if training:
        return sum(tensor_bytes(n.meta.get("val")) for n in nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in nodes}
    live, peak = 0, 0
    frees: dict[int, int] = {}
    for n in gm.graph.nodes:
        live -= frees.pop(order[n], 0)
        if n in last_use:
            size = tensor_bytes(n.meta.get("val"))
            live += size
            peak = max(peak, live)
            frees[last_use[n] + 1] = frees.get(last_use[n] + 1, 0) + size
    return peak


def saved_activation_bytes(
    gm: fx.GraphModule, ctx: CompileContext, upper_bound: int
) -> tuple[int, list[str]]:
    """Bytes autograd keeps for backward after one forward of the example inputs (measured
    on fake tensors, recompute regions under their policies), with one note per region."""
    from ..runtime.saved_tensors import measure_graph

    try:
        kept = measure_graph(gm, ctx)
    except Exception as exc:  # e.g. an op without a fake implementation
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return upper_bound, [f"activations: every intermediate counted (fake run failed: {reason})"]
    notes = []
    record = ctx.records.get("recompute")
    if record and record.get("regions"):
        notes.append(f"recompute: {record['reason']}")
        for region in record["regions"]:
            how = (
                f"recomputes {region['recompute_flops']:,d} FLOPs in backward "
                f"(~{region.get('recompute_seconds', 0.0) * 1e3:.1f} ms estimated)"
                + (f", {region['how']}" if region.get("how") else "")
            )
            if region.get("grad_in_forward") and region["policy"] != "none":
                how = "runs its backward in forward (ends in the loss): keeps input gradients"
            notes.append(
                f"  {region['submodule']} ({region['module']}, {region['policy']}): keeps "
                f"{format_bytes(region['kept_bytes'])} of {format_bytes(region['kept_bytes_without'])}"
                f", {how}"
            )
        for name, why in record.get("left_out", {}).items():
            notes.append(f"  {name} is not a region: {why}")
    elif record:
        notes.append(f"recompute: none ({record['reason']})")
    return kept.total, notes


def estimate(gm: fx.GraphModule, ctx: CompileContext) -> Explanation:
    """Estimate per-rank bytes from the graph, the model and what passes recorded."""
    params = unique_parameters(ctx.model)
    param_bytes = sum(tensor_bytes(p) for p in params.values())
    grad_bytes = (
        sum(tensor_bytes(p) for p in params.values() if p.requires_grad) if ctx.training else 0
    )
    notes: list[str] = []
    if "precision" in ctx.records:  # how precision='auto' was resolved, or why bf16 is slow here
        choice = ctx.records["precision"]
        arrow = f"{choice['requested']} -> " if choice["requested"] != choice["precision"] else ""
        notes.append(f"precision {arrow}{choice['precision']}: {choice['reason']}")
    optimizer = getattr(ctx.strategy, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "state_bytes"):
        opt_bytes = sum(optimizer.state_bytes(p) for p in params.values() if p.requires_grad)
    else:
        opt_bytes = 0
        if ctx.training:
            notes.append("no optimizer in the strategy: optimizer state counted as 0")
    quantized = ctx.records.get("quantize", {})
    if "bytes_before" in quantized:  # the quantize pass swapped float weights for packed ones
        param_bytes += quantized["bytes_after"] - quantized["bytes_before"]
        notes.append(
            f"quantize ({quantized['scheme']}): {len(quantized['layers'])} linear weights "
            f"{format_bytes(quantized['bytes_before'])} -> {format_bytes(quantized['bytes_after'])}"
        )
    comm: dict[str, int] = {}
    comm_by_dim: dict[str, dict[str, int]] = {}
    if "data_parallel" in ctx.records and ctx.training:
        from .zero_config import explain_data_parallel

        dp = explain_data_parallel(ctx.records["data_parallel"])
        comm, comm_by_dim = dp["comm_bytes_per_step"], dp["comm_bytes_per_dim"]
        notes += dp["notes"]
    if "zero" in ctx.records:  # ZeRO: what this rank holds after sharding, what it sends
        from .zero_config import explain_zero

        zero = explain_zero(ctx.records["zero"], optimizer)
        param_bytes, opt_bytes = zero["parameter_bytes"], zero["optimizer_state_bytes"]
        grad_bytes = zero["gradient_bytes"] if ctx.training else 0
        comm, comm_by_dim = zero["comm_bytes_per_step"], zero["comm_bytes_per_dim"]
        notes += zero["notes"]
    activations = activation_bytes(gm, ctx.training)
    if ctx.training:
        activations, activation_notes = saved_activation_bytes(gm, ctx, activations)
        notes += activation_notes
    return Explanation(
        parameter_bytes=param_bytes,
        gradient_bytes=grad_bytes,
        optimizer_state_bytes=opt_bytes,
        activation_bytes=activations,
        world_size=ctx.world_size,
        rank=ctx.rank,
        comm_bytes_per_step=comm,
        comm_bytes_per_dim=comm_by_dim,
        notes=tuple(notes),
    )
