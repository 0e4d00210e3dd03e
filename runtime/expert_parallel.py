"""Expert parallelism: `ExpertParallelMoE`, the all-to-all form moe_dispatch gives MoE layers,
and the expert shards it leaves on the model.

Under `ExpertParallel(size=P)` over several ranks, each stacked expert weight ([E, ...]: a
strato.nn.MoE's `w_in`/`w_out`, a Mixtral block's `gate_up_proj`/`down_proj`) keeps only
this rank's E/P experts (rows [first, first + E/P) of dim 0; the parameter remembers its
whole shape, as tensor-parallel blocks do, so a graph can be captured again). Its gradient
is reduced over `expert_replicate` (the ranks holding the same experts) only, and ZeRO
shards it over that group; every other parameter is data parallel over all ranks as before.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .moe import (
    HF_STATS,
    Dispatch,
    MoE,
    combine_local,
    expert_capacity,
    expert_mlp,
    moe_losses,
    route,
    routing_stats,
    sort_by_expert,
)


def _grouped_by_local_expert(received: torch.Tensor) -> torch.Tensor:
    """`received` [P, L]: rows from source rank r for local expert j arrive as block (r, j)
    in row-major order; the row indices that put them in (j, r) order instead."""
    counts = received.reshape(-1).tolist()
    sources, local = received.shape
    starts = list(itertools.accumulate([0, *counts[:-1]]))
    pieces = [
        torch.arange(starts[r * local + j], starts[r * local + j] + counts[r * local + j])
        for j in range(local)
        for r in range(sources)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def layer_settings(layer: MoE, training: bool = True) -> dict[str, Any]:
    """What ExpertParallelMoE needs of a strato.nn.MoE (its routing in that mode)."""
    names = ("d_model", "num_experts", "top_k", "capacity_factor", "min_capacity",
             "drop_tokens", "aux_loss_weight", "z_loss_weight", "activation", "stats_key")  # fmt: skip
    settings = {name: getattr(layer, name) for name in names}
    if not training:
        settings["capacity_factor"] = layer.eval_capacity_factor
    return settings


def whole_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of `param` in the user's model, whether or not it is sharded on this rank."""
    from .tensor_parallel import GLOBAL_ATTR

    held = getattr(param, GLOBAL_ATTR, None)
    return tuple(held[0]) if held is not None else tuple(param.shape)


def expert_box(shape: tuple[int, ...], first: int, count: int) -> dict[str, Any]:
    """The layout step (compiler/layout.py) of experts [first, first + count) of a stacked
    expert weight of whole `shape`."""
    stops = list(shape)
    stops[0] = first + count
    return {"kind": "box", "starts": [first] + [0] * (len(shape) - 1), "stops": stops}


def expert_params(records: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Parameter name -> {'experts': [first, count], 'group': 'expert_replicate'} for every
    expert weight the moe_dispatch pass sharded (empty when experts are whole)."""
    return dict(records.get("moe_dispatch", {}).get("expert_params", {}))


def broadcast_experts(model: nn.Module, records: dict[str, Any], mesh: Any) -> frozenset[str]:
    """Start the ranks holding the same experts from their first rank's expert weights (as
    the data-parallel start-up broadcast does for the rest, which must skip the returned
    names). Call on every rank."""
    from . import collectives

    names = frozenset(expert_params(records))
    if names and collectives.world_size() > 1:
        group = mesh.group("expert_replicate")
        src = collectives.global_rank(group, 0)
        with torch.no_grad():
            for name in sorted(names):
                collectives.broadcast(model.get_parameter(name).data, src=src, group=group)
    return names


SHARED_ROLES = ("shared_gate_proj", "shared_up_proj", "shared_down_proj", "shared_expert_gate")
"""A shared expert's weights (Qwen2-MoE), in the order ExpertParallelMoE takes them."""


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _bias_free_linear(m: Any, in_features: int, out_features: int | None = None) -> bool:
    return (
        isinstance(m, nn.Linear) and m.bias is None and m.in_features == in_features
        and (out_features is None or m.out_features == out_features)
    )  # fmt: skip


def shared_expert_weights(block: nn.Module, d_model: int) -> dict[str, torch.Tensor] | None:
    """A Qwen2-MoE shared expert's weights by role (SHARED_ROLES): a SwiGLU MLP
    (`shared_expert.gate_proj/up_proj/down_proj`, no biases, SiLU) every token runs, its
    output scaled by sigmoid(`shared_expert_gate`(x)) ([1, d], no bias); None when the
    block's shared expert is not built that way."""
    mlp, gate = getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None)
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    fits = (
        _bias_free_linear(parts[0], d_model) and _bias_free_linear(parts[1], d_model)
        and parts[0].out_features == parts[1].out_features
        and _bias_free_linear(parts[2], parts[0].out_features, d_model)
        and _is_silu(getattr(mlp, "act_fn", None)) and _bias_free_linear(gate, d_model, 1)
    )  # fmt: skip
    if not fits:
        return None
    weights = [p.weight for p in parts] + [gate.weight]
    return dict(zip(SHARED_ROLES, weights))


def hf_block_settings(block: nn.Module, path: str) -> dict[str, Any] | None:
    """Routing settings of a Hugging Face sparse MoE block built the Mixtral or Qwen2-MoE
    way (a top-k router `gate.weight` [E, d]; stacked SwiGLU `experts.gate_up_proj`
    [E, 2f, d] / `experts.down_proj` [E, d, f] with SiLU; top-k weights renormalised unless
    the router's `norm_topk_prob` is False; dropless; optionally a shared expert, see
    `shared_expert_weights`), or None when `block` is not one."""
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    weight = getattr(gate, "weight", None)
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    shapes_fit = (
        isinstance(weight, torch.Tensor) and weight.dim() == 2
        and isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3
        and isinstance(down, torch.Tensor) and down.dim() == 3
        and whole_shape(gate_up)[0] == whole_shape(down)[0] == weight.shape[0]
    )  # fmt: skip
    if not shapes_fit or not hasattr(gate, "top_k"):
        return None
    if getattr(block, "jitter_noise", 0) or getattr(experts, "has_bias", False):
        return None
    if not _is_silu(getattr(experts, "act_fn", None)):
        return None
    shared = hasattr(block, "shared_expert")
    if shared and shared_expert_weights(block, weight.shape[1]) is None:
        return None
    return {"d_model": weight.shape[1], "num_experts": weight.shape[0], "top_k": int(gate.top_k),
            "drop_tokens": False, "normalize": bool(getattr(gate, "norm_topk_prob", True)),
            "aux_loss_weight": 0.0, "z_loss_weight": 0.0, "activation": "swiglu",
            "shared_expert": shared, "stats_key": HF_STATS + path}  # fmt: skip


class ExpertParallelMoE(nn.Module):
    """One MoE layer of a training graph under expert parallelism (the `moe_dispatch`
    pass puts it where the layer's captured ops were): route as the layer does, send each
    kept (token, choice) to the rank of the expert group holding its expert (all-to-all,
    variable sizes), run this rank's experts as one grouped GEMM, send the results back,
    combine. Called with the layer's input and its three parameters (graph values, so
    ZeRO-3 gathers them as usual): the expert weights as this rank holds them (its
    experts only, as moe_dispatch shards them), or whole stacks, of which it reads its
    experts' slice."""

    def __init__(
        self, settings: dict[str, Any], group: Any, compute_dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        self.settings = dict(settings)
        """The layer's routing settings (`layer_settings`)."""
        self.group = group
        """The expert group (runtime/mesh.py `expert_groups`)."""
        self.local_experts = settings["num_experts"] // group.size
        self.first_expert = group.rank * self.local_experts
        self.compute_dtype = compute_dtype
        """Expert and gate GEMMs run in this dtype (the strategy's bf16/fp16), routing in fp32."""

    def extra_repr(self) -> str:
        last = self.first_expert + self.local_experts - 1
        return f"experts {self.first_expert}..{last} of {self.settings['num_experts']}, group {list(self.group.ranks)}"

    def forward(self, x, gate, w_in, w_out, *shared):
        """`shared`: a shared expert's weights (SHARED_ROLES), when the layer has one."""
        s = self.settings
        tokens = x.reshape(-1, s["d_model"])
        dtype = self.compute_dtype or tokens.dtype
        capacity = None
        if s["drop_tokens"]:
            capacity = expert_capacity(
                tokens.shape[0],
                s["num_experts"],
                s["top_k"],
                s["capacity_factor"],
                s["min_capacity"],
            )
        logits = F.linear(tokens.to(dtype), gate.to(dtype))
        routing = route(logits, s["top_k"], capacity, s.get("normalize"))
        dispatch = sort_by_expert(routing, s["num_experts"])
        if _is_fake(x):  # compile-time shape propagation (the grouped GEMM's shape function
            # takes this rank's experts or all of them alike)
            out = combine_local(tokens.to(dtype), dispatch, w_in, w_out, s["activation"])
        else:
            out = self._exchange(tokens.to(dtype), dispatch, w_in.to(dtype), w_out.to(dtype))
        loss = s["aux_loss_weight"] * routing.aux_loss + s["z_loss_weight"] * routing.z_loss
        out = moe_losses(out, loss, routing_stats(routing, dispatch), s["stats_key"])
        if shared:  # every token, on every rank: sigmoid(x g) * down(silu(x W_g) * (x W_u))
            gate_proj, up_proj, down_proj, scale = (w.to(dtype) for w in shared)
            h = tokens.to(dtype)
            dense = F.linear(F.silu(F.linear(h, gate_proj)) * F.linear(h, up_proj), down_proj)
            out = out + torch.sigmoid(F.linear(h, scale)) * dense
        return out.reshape(x.shape).to(x.dtype)

    def _exchange(self, tokens, dispatch: Dispatch, w_in, w_out) -> torch.Tensor:
        from . import collectives

        group, local = self.group, self.local_experts
        counts = dispatch.counts
        kept = int(counts.sum())
        # Kept assignments per (destination rank, its local expert), then per source rank.
        received = collectives.all_to_all_single(
            counts, [local] * group.size, [local] * group.size, group, kind="all_to_all_splits"
        ).view(group.size, local)
        send_splits = counts.view(group.size, local).sum(dim=1).tolist()
        recv_splits = received.sum(dim=1).tolist()
        sent = dispatch.tokens[:kept]
        arrived = collectives.AllToAll.apply(tokens[sent], recv_splits, send_splits, group)
        order = _grouped_by_local_expert(received)
        whole = w_in.shape[0] == self.settings["num_experts"] and group.size > 1
        experts = slice(self.first_expert, self.first_expert + local) if whole else slice(None)
        out = expert_mlp(
            arrived[order], received.sum(dim=0).cumsum(0), w_in[experts], w_out[experts],
            self.settings["activation"],
        )  # fmt: skip
        back = out[torch.argsort(order)]  # rows in arrival order again
        returned = collectives.AllToAll.apply(back, send_splits, recv_splits, group)
        returned = returned * dispatch.weights[:kept].unsqueeze(-1).to(returned.dtype)
        return torch.zeros_like(tokens, dtype=returned.dtype).index_add(0, sent, returned)


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(tensor)
