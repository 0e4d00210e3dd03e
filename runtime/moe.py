"""Mixture-of-experts: the `strato.nn.MoE` layer (gate, top-k routing, capacity, auxiliary
losses, experts as one grouped GEMM); its expert-parallel form is runtime/expert_parallel.py.

The layer's eager forward is the reference: every expert local, no communication. It is
written with static shapes (sorting and offsets instead of per-expert boolean indexing),
so `strato.compile` captures it as plain ATen ops plus one `strato::moe_losses` node. The
`moe_dispatch` pass (passes/moe_dispatch.py) replaces each captured layer by an
`ExpertParallelMoE` call that routes the same way, sends each kept (token, choice) to the
rank holding its expert (all-to-all over the mesh's `expert` group), runs the local
experts as one grouped GEMM and sends the results back.

Routing follows DeepSpeed's `top1gating`/`top2gating` (deepspeed/moe/sharded_moe.py),
generalised to k choices: softmax over the gate logits (fp32); choice j is the j-th
largest probability; capacity = max(min_capacity, ceil(k * tokens * capacity_factor /
experts)) per expert; slots are given first choices before second choices, and within a
choice in token order (DeepSpeed's cumsum priority), so a dropped assignment is always a
later choice or a later token; with k >= 2 the kept weights are renormalised to sum to 1
(top-1 keeps the raw probability, as Switch). Dropless (`drop_tokens=False`) keeps every
assignment. Load-balancing loss (GShard/Switch): E * sum_e mean_t(p_te) * frac_t(first
choice == e); router z-loss (ST-MoE): mean_t logsumexp(logits_t)^2.

The auxiliary losses reach the training loss through their gradient: `strato::moe_losses`
returns the expert output unchanged and, in backward, hands `aux_loss_weight * aux +
z_loss_weight * z` the gradient `loss_grad_scale()` (1 in eager; the engine sets it to
1/grad_accumulation x the fp16 loss scale while it backpropagates), so the gradients are
those of `loss + weighted aux losses`, for any loss (a Hugging Face `labels` loss too),
without the model returning them. The loss the model returns does not include them;
`engine.stats()["moe"]` reports them per layer, with tokens per expert and dropped tokens.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import warnings
from fractions import Fraction
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from ..compiler.errors import StratoError

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")
"""Expert activations; 'swiglu' doubles the first weight's columns: silu(x W_gate) * (x W_up)."""


class MoEError(StratoError, ValueError):
    """An MoE layer was built with settings it cannot take (names the argument)."""


# ---------------------------------------------------------------------- grouped GEMM


def _grouped_mm_function():
    """torch's grouped GEMM (F.grouped_mm from torch 2.10, torch._grouped_mm before), or
    None where this torch has neither."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


GROUPED_MM = _grouped_mm_function()
_warned_loop = False


def _grouped_mm_impl(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return GROUPED_MM(x, weight, offs=offs)


def _grouped_mm_fake(x, weight, offs):
    return x.new_empty(x.shape[0], weight.shape[-1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    x, weight, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = GROUPED_MM(grad, weight.transpose(-2, -1), offs=offs)  # rows past offs[-1]: undefined
    grad_w = GROUPED_MM(x.t(), grad, offs=offs)  # an expert without rows gets zeros
    return grad_x, grad_w, None


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows [offs[e-1], offs[e]) of `x` [N, d] times `weight[e]` [d, f], as one [N, f]
    (rows past offs[-1] are undefined: callers mask them). One grouped GEMM where torch
    has it (its rows must be 16-byte aligned: d and f are zero-padded to that, exactly);
    otherwise one matmul per expert, with a warning saying why."""
    if GROUPED_MM is not None and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        align = 16 // x.element_size()
        d, f = weight.shape[-2:]
        pad_d, pad_f = -d % align, -f % align
        weight = weight.to(x.dtype)
        if pad_d or pad_f:
            x = F.pad(x, (0, pad_d))
            weight = F.pad(weight, (0, pad_f, 0, pad_d))
        out = grouped_mm_op(x.contiguous(), weight.contiguous(), offs.to(torch.int32))
        return out[:, :f] if pad_f else out
    global _warned_loop
    if not _warned_loop:
        _warned_loop = True
        reason = (
            "this torch has no F.grouped_mm / torch._grouped_mm"
            if GROUPED_MM is None
            else f"grouped GEMM does not take {x.dtype}"
        )
        warnings.warn(f"strato.nn.MoE: {reason}; experts run one matmul each.", stacklevel=2)
    return expert_loop_mm(x, weight, offs)


def expert_loop_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The per-expert loop grouped_mm replaces (the fallback, and bench/moe.py's baseline)."""
    out = x.new_zeros(x.shape[0], weight.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ weight[e].to(x.dtype)
        start = end
    return out


def expert_mlp(
    x: torch.Tensor,
    offs: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str,
    loop: bool = False,
) -> torch.Tensor:
    """The experts over rows already grouped by expert (`offs`: end row of each group)."""
    mm = expert_loop_mm if loop else grouped_mm
    h = mm(x, w_in, offs)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[activation](h)
    return mm(h, w_out, offs)


# ---------------------------------------------------------------------- routing


@attrs.frozen
class Routing:
    """Where each token's k choices go: one row per token, one column per choice."""

    experts: torch.Tensor
    """[T, k] int64: the expert of each choice (descending probability)."""
    weights: torch.Tensor
    """[T, k]: the combine weight of each choice (0 where dropped)."""
    kept: torch.Tensor
    """[T, k] bool: the choice got a slot within its expert's capacity."""
    aux_loss: torch.Tensor
    """Load-balancing loss (scalar, fp32)."""
    z_loss: torch.Tensor
    """Router z-loss (scalar, fp32)."""


def expert_capacity(tokens: Any, num_experts: int, top_k: int, factor: float, minimum: int):
    """Slots per expert: max(minimum, ceil(top_k * tokens * factor / num_experts)), in
    integer arithmetic so a symbolic token count stays symbolic under capture."""
    ratio = Fraction(factor).limit_denominator(10**6)
    capacity = -(-(tokens * top_k * ratio.numerator) // (num_experts * ratio.denominator))
    return (
        torch.sym_max(capacity, minimum)
        if not isinstance(capacity, int)
        else max(capacity, minimum)
    )


def route(
    logits: torch.Tensor, top_k: int, capacity: Any | None, normalize: bool | None = None
) -> Routing:
    """Softmax top-k routing of `logits` [T, E] (see the module docstring); `capacity`
    None is dropless. `normalize`: renormalise the kept weights (default: when top_k > 1,
    as DeepSpeed; Hugging Face Mixtral always does)."""
    logits = logits.float()
    num_experts = logits.shape[-1]
    gates = logits.softmax(dim=-1)
    probs, experts = torch.topk(gates, top_k, dim=-1)  # [T, k]
    # Slot of each (choice, token) in its expert: first choices of all tokens, then second...
    choices = torch.arange(num_experts, device=logits.device)
    masks = (experts.t().unsqueeze(-1) == choices).long()  # [k, T, E]
    flat = masks.reshape(-1, num_experts)
    slots = ((flat.cumsum(dim=0) - 1) * flat).sum(dim=-1).view(top_k, -1).t()  # [T, k]
    kept = slots < capacity if capacity is not None else torch.ones_like(slots, dtype=torch.bool)
    weights = probs * kept
    if (top_k > 1) if normalize is None else normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(
            min=torch.finfo(gates.dtype).eps
        )
    first_choice = masks[0].float().mean(dim=0)
    aux = (gates.mean(dim=0) * first_choice).sum() * num_experts
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return Routing(experts=experts, weights=weights, kept=kept, aux_loss=aux, z_loss=z)


@attrs.frozen
class Dispatch:
    """The kept (token, choice) assignments of a routing, sorted by expert."""

    order: torch.Tensor
    """[T*k] assignment indices (token-major), kept ones sorted by expert, dropped last."""
    tokens: torch.Tensor
    """[T*k] the token of each sorted assignment."""
    counts: torch.Tensor
    """[E] int64 kept assignments per expert."""
    kept: torch.Tensor
    """[T*k] bool, in sorted order."""
    weights: torch.Tensor
    """[T*k] combine weights, in sorted order."""


def sort_by_expert(routing: Routing, num_experts: int) -> Dispatch:
    top_k = routing.experts.shape[-1]
    kept = routing.kept.reshape(-1)
    key = torch.where(kept, routing.experts.reshape(-1), num_experts)  # dropped: after the last
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=key.device)
    counts = counts.scatter_add(0, key, torch.ones_like(key))[:num_experts]
    return Dispatch(
        order=order,
        tokens=order // top_k,
        counts=counts,
        kept=kept[order],
        weights=routing.weights.reshape(-1)[order],
    )


def combine_local(
    tokens: torch.Tensor,
    dispatch: Dispatch,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str,
    loop: bool = False,
) -> torch.Tensor:
    """Every expert local: gather the sorted assignments, one grouped GEMM per weight,
    weight and sum back per token (a dropped assignment adds nothing)."""
    # Dropped rows enter as zeros: the grouped GEMM leaves rows past the last offset
    # undefined, in its backward too, and nothing of them may reach the tokens.
    x = torch.where(dispatch.kept.unsqueeze(-1), tokens[dispatch.tokens], 0.0)
    out = expert_mlp(x, dispatch.counts.cumsum(0), w_in, w_out, activation, loop)
    out = torch.where(dispatch.kept.unsqueeze(-1), out, 0.0)  # rows past the last offset
    out = out * dispatch.weights.unsqueeze(-1).to(out.dtype)
    return torch.zeros_like(tokens, dtype=out.dtype).index_add(0, dispatch.tokens, out)


def routing_stats(routing: Routing, dispatch: Dispatch) -> torch.Tensor:
    """[E + 3] fp32: kept tokens per expert, dropped assignments, aux loss, z-loss."""
    dropped = (~routing.kept).sum().float()
    return torch.cat(
        [
            dispatch.counts.float(),
            dropped.reshape(1),
            routing.aux_loss.detach().reshape(1),
            routing.z_loss.detach().reshape(1),
        ]
    ).detach()


# ---------------------------------------------------------------------- losses and stats

_state = {"scale": 1.0}
"""The aux losses' backward gradient: a process global, not thread-local, since CUDA
autograd runs backward on its own device threads."""
_stats: dict[str, torch.Tensor] = {}
"""Layer key -> the last forward's routing_stats (read by layer_stats / engine.stats)."""


def loss_grad_scale() -> float:
    """The gradient the auxiliary losses get in backward (see the module docstring)."""
    return _state["scale"]


@contextlib.contextmanager
def scaled_loss_grad(scale: float):
    """Within the block, auxiliary losses backpropagate with gradient `scale` (the engine:
    1/grad_accumulation x the loss scale, the factor the main loss was multiplied by)."""
    previous = loss_grad_scale()
    _state["scale"] = scale
    try:
        yield
    finally:
        _state["scale"] = previous


def _defined_elsewhere(op_name: str):
    """The other copy of this module that already defined custom op `op_name`, if any
    (pytest's importlib mode imports the repository root a second time under its folder
    name): torch runs that copy's op, so its state and statistics are the ones to share."""
    from torch._library import custom_ops

    opdef = getattr(custom_ops, "OPDEFS", {}).get(op_name)
    name = getattr(getattr(opdef, "_init_fn", None), "__module__", None)
    return sys.modules.get(name) if name not in (None, __name__) else None


def _moe_losses_impl(
    output: torch.Tensor, loss: torch.Tensor, stats: torch.Tensor, layer: str
) -> torch.Tensor:
    """`output` unchanged (a copy); records `stats` for `layer`; backward gives `loss` (the
    weighted auxiliary losses) the gradient `loss_grad_scale()`."""
    _stats[layer] = stats.detach().to("cpu", copy=True)
    return output.clone()


def _moe_losses_fake(output, loss, stats, layer):
    return torch.empty_like(output)


def _moe_losses_setup(ctx, inputs, output) -> None:
    ctx.loss_dtype = inputs[1].dtype


def _moe_losses_backward(ctx, grad):
    scale = torch.full((), loss_grad_scale(), dtype=ctx.loss_dtype, device=grad.device)
    return grad, scale, None, None


_first = _defined_elsewhere("strato::moe_losses")
if _first is not None:
    _state, _stats, moe_losses = _first._state, _first._stats, _first.moe_losses
    grouped_mm_op = _first.grouped_mm_op
else:
    moe_losses = torch.library.custom_op("strato::moe_losses", mutates_args=())(_moe_losses_impl)
    moe_losses.register_fake(_moe_losses_fake)
    moe_losses.register_autograd(_moe_losses_backward, setup_context=_moe_losses_setup)
    # torch's own op has a CUDA-only meta function (bf16 only), so capture could not
    # trace it in fp32; this op has the shape function and backward in grouped GEMMs.
    grouped_mm_op = torch.library.custom_op("strato::grouped_mm", mutates_args=())(_grouped_mm_impl)
    grouped_mm_op.register_fake(_grouped_mm_fake)
    grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def layer_stats(key: str, num_experts: int) -> dict[str, Any] | None:
    """The last forward's routing of layer `key` on this rank: tokens per expert (kept
    assignments), dropped assignments, aux loss, z-loss; None before its first forward."""
    stats = _stats.get(key)
    if stats is None:
        return None
    values = stats.tolist()
    return {
        "tokens_per_expert": [int(v) for v in values[:num_experts]],
        "dropped_tokens": int(values[num_experts]),
        "aux_loss": values[num_experts + 1],
        "z_loss": values[num_experts + 2],
    }


# ---------------------------------------------------------------------- the layer

_keys = itertools.count()


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MoEError(f"strato.nn.MoE: {name} must be an integer >= 1, got {value!r}.")
    return value


def _positive_number(name: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise MoEError(
            f"strato.nn.MoE: {name} must be a number > 0 (slots per expert = {name} x "
            f"top_k x tokens / num_experts), got {value!r}."
        )
    return float(value)


def _weight(name: str, value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise MoEError(f"strato.nn.MoE: {name} must be a number >= 0, got {value!r}.")
    return float(value)


class MoE(nn.Module):
    """A mixture-of-experts feed-forward layer: `num_experts` MLPs d_model -> d_ff ->
    d_model, each token sent to its `top_k` best experts by a linear gate.

    forward(x [..., d_model]) -> [..., d_model], the weighted sum of the chosen experts'
    outputs (0 for a token all of whose choices were dropped: put the layer inside a
    residual, `x + moe(x)`, and dropped tokens pass through unchanged)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.d_model = _positive_int("d_model", d_model)
        self.d_ff = _positive_int("d_ff", d_ff)
        self.num_experts = _positive_int("num_experts", num_experts)
        self.top_k = _positive_int("top_k", top_k)
        if top_k > num_experts:
            raise MoEError(
                f"strato.nn.MoE: top_k={top_k} > num_experts={num_experts}; each token picks "
                "top_k different experts, so choose top_k <= num_experts."
            )
        self.capacity_factor = _positive_number("capacity_factor", capacity_factor)
        self.eval_capacity_factor = _positive_number("eval_capacity_factor", eval_capacity_factor)
        if not isinstance(min_capacity, int) or isinstance(min_capacity, bool) or min_capacity < 0:
            raise MoEError(
                f"strato.nn.MoE: min_capacity must be an integer >= 0, got {min_capacity!r}."
            )
        self.min_capacity = min_capacity
        if not isinstance(drop_tokens, bool):
            raise MoEError(
                f"strato.nn.MoE: drop_tokens must be True or False, got {drop_tokens!r}."
            )
        self.drop_tokens = drop_tokens
        self.aux_loss_weight = _weight("aux_loss_weight", aux_loss_weight)
        self.z_loss_weight = _weight("z_loss_weight", z_loss_weight)
        if activation not in ACTIVATIONS:
            raise MoEError(
                f"strato.nn.MoE: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}."
            )
        self.activation = activation
        self.stats_key = f"moe{next(_keys)}.{id(self):x}"
        """Where this layer's routing statistics are recorded (layer_stats)."""
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.gate = nn.Parameter(torch.empty(num_experts, d_model))
        """Router weight [E, d_model] (logits = x @ gate.T)."""
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, width))
        """First expert weights, stacked [E, d_model, d_ff] (x2 columns for swiglu)."""
        self.w_out = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        """Second expert weights, stacked [E, d_ff, d_model]."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate, std=0.02)
        nn.init.normal_(self.w_in, std=1 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_out, std=1 / math.sqrt(self.d_ff))

    def capacity(self, tokens: Any) -> Any | None:
        """Slots per expert for `tokens` tokens in the current mode (None: dropless)."""
        if not self.drop_tokens:
            return None
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(tokens, self.num_experts, self.top_k, factor, self.min_capacity)

    def route(self, tokens: torch.Tensor) -> Routing:
        return route(
            F.linear(tokens, self.gate.to(tokens.dtype)), self.top_k, self.capacity(tokens.shape[0])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise MoEError(
                f"strato.nn.MoE: input has {x.shape[-1]} features in its last dimension, the "
                f"layer was built with d_model={self.d_model}."
            )
        tokens = x.reshape(-1, self.d_model)
        routing = self.route(tokens)
        dispatch = sort_by_expert(routing, self.num_experts)
        out = combine_local(tokens, dispatch, self.w_in, self.w_out, self.activation)
        return self.attach_losses(out, routing, dispatch).reshape(x.shape).to(x.dtype)

    def attach_losses(
        self, out: torch.Tensor, routing: Routing, dispatch: Dispatch
    ) -> torch.Tensor:
        loss = self.aux_loss_weight * routing.aux_loss + self.z_loss_weight * routing.z_loss
        return moe_losses(out, loss, routing_stats(routing, dispatch), self.stats_key)

    def stats(self) -> dict[str, Any] | None:
        """This layer's last routing on this rank (see layer_stats)."""
        return layer_stats(self.stats_key, self.num_experts)

    def extra_repr(self) -> str:
        drop = f"capacity_factor={self.capacity_factor}" if self.drop_tokens else "dropless"
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, {drop}, activation={self.activation}"
        )


HF_STATS = "hf:"
"""Stats key prefix of a Hugging Face MoE block (its module path follows)."""


def model_stats(model: nn.Module) -> dict[str, dict[str, Any] | None]:
    """Module path -> `MoE.stats()` for every MoE layer of `model` (engine.stats()["moe"]),
    with `expert_weight_bytes`: what this rank holds of the layer's expert weights (1/P of
    them under ExpertParallel(size=P) over P ranks)."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, MoE):
            out[path] = _with_bytes(m.stats(), m.w_in, m.w_out)
        elif HF_STATS + path in _stats:  # a Hugging Face block run by ExpertParallelMoE
            stats = layer_stats(HF_STATS + path, int(_stats[HF_STATS + path].numel()) - 3)
            out[path] = _with_bytes(stats, m.experts.gate_up_proj, m.experts.down_proj)
    return out


def _with_bytes(stats: dict[str, Any] | None, *weights: torch.Tensor) -> dict[str, Any] | None:
    if stats is None:
        return None
    return {**stats, "expert_weight_bytes": sum(w.numel() * w.element_size() for w in weights)}
