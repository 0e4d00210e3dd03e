"""Expert parallelism: rewrite each captured `strato.nn.MoE` layer into its expert-parallel form.

Capture inlines the layer's eager forward (runtime/moe.py) into ATen ops owned by the
layer's module path (`meta['strato_module']`). With `Strategy(moe=strato.ExpertParallel(
size=P))` this pass replaces each such region of the training graph by one `call_module`
of an `ExpertParallelMoE` (gate -> top-k -> capacity or dropless -> all-to-all over the
`expert` group -> this rank's experts as one grouped GEMM -> all-to-all back -> combine),
fed by the region's input and the layer's three parameters as graph values, so the ZeRO
and data-parallel passes after it treat them like any other parameter. The expert groups
are carved from the data-parallel ranks (runtime/mesh.py `expert_groups`).

Over several ranks each stacked expert weight then keeps only this rank's E/P experts (a
layout `box` on dim 0, registered so checkpoints, full_state_dict and consolidate reshard
it; `ctx.records['moe_dispatch']['expert_params']` names them): per-rank expert bytes drop
to 1/P. The data-parallel and ZeRO passes reduce their gradients over `expert_replicate`
only (the ranks holding the same experts) and ZeRO shards them over that group; every other
parameter follows the data-parallel dimensions as before.

Eval graphs are rewritten the same way (every rank holds only its experts, so evaluation
is collective, as under ZeRO-3: run it on every rank), with the eval capacity factor. A
single process keeps the local layer. Decisions go to ctx.records['moe_dispatch'].
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import torch
import torch.fx as fx

from ..compiler.context import CompileContext
from ..compiler.errors import PassError, StrategyError
from ..compiler.layout import register_step
from ..compiler.pass_manager import graph_pass
from ..runtime import tensor_parallel as tp_runtime
from ..runtime.expert_parallel import (
    ExpertParallelMoE,
    expert_box,
    hf_block_settings,
    layer_settings,
    shared_expert_weights,
    whole_shape,
)
from ..runtime.moe import MoE
from .annotate import fill_fake_values, getattr_path

EXPERT = "expert"
"""The group the all-to-alls run over (carved from the data-parallel ranks)."""
EXPERT_REPLICATE = "expert_replicate"
"""The group holding the same experts: expert gradients are reduced (and ZeRO-sharded) here."""
EXPERT_ROLES = ("w_in", "w_out")
"""The roles of MoELayer.params stacked over experts (dim 0), sharded over the expert group."""

_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


@attrs.frozen
class MoELayer:
    """A layer the pass dispatches: a strato.nn.MoE or a recognised Hugging Face block."""

    kind: str
    """'strato.nn.MoE' or the Hugging Face class name."""
    settings: dict[str, Any]
    """Routing settings for ExpertParallelMoE (runtime/expert_parallel.py)."""
    params: dict[str, torch.Tensor]
    """'gate' [E, d], 'w_in', 'w_out' (then a shared expert's SHARED_ROLES): the
    parameters the layer reads, in the order ExpertParallelMoE takes them."""
    transposed: tuple[str, ...] = ()
    """Roles stored as [E, out, in] (Hugging Face), handed over transposed."""


def moe_layers(model: torch.nn.Module, training: bool = True) -> dict[str, MoELayer]:
    """Module path -> layer, for every strato.nn.MoE and every Hugging Face sparse MoE block
    built the Mixtral or Qwen2-MoE way (runtime/expert_parallel.py `hf_block_settings`), with the
    routing of the training or eval mode."""
    found: dict[str, MoELayer] = {}
    for path, m in model.named_modules():
        if any(_inside(path, outer) for outer in found):
            continue
        if isinstance(m, MoE):
            params = {"gate": m.gate, "w_in": m.w_in, "w_out": m.w_out}
            found[path] = MoELayer("strato.nn.MoE", layer_settings(m, training), params)
        elif (settings := hf_block_settings(m, path)) is not None:
            params = {"gate": m.gate.weight, "w_in": m.experts.gate_up_proj,
                      "w_out": m.experts.down_proj}  # fmt: skip
            if settings["shared_expert"]:  # computed densely on every rank
                params.update(shared_expert_weights(m, settings["d_model"]))
            found[path] = MoELayer(type(m).__name__, settings, params, ("w_in", "w_out"))
    return found


_MOE_CLASS = re.compile(r"(moe|experts?)(block|layer)?$")


def unrecognised_moe_blocks(model: torch.nn.Module, layers: dict[str, MoELayer]) -> list[str]:
    """Modules outside `layers` whose class names end like mixture-of-experts blocks
    ('...SparseMoeBlock', '...Experts'), as 'path (ClassName)'."""
    return [
        f"{path} ({type(m).__name__})"
        for path, m in model.named_modules()
        if _MOE_CLASS.search(type(m).__name__.lower())
        and not any(_inside(path, layer) for layer in layers)
    ]


def _inside(module_path: str | None, layer: str) -> bool:
    return module_path is not None and (module_path == layer or module_path.startswith(layer + "."))


def _region(graph: fx.Graph, layer: str) -> list[fx.Node]:
    return [
        n
        for n in graph.nodes
        if n.op in ("call_function", "call_method", "call_module")
        and _inside(n.meta.get("strato_module"), layer)
    ]


def _inputs_closure(roots: list[fx.Node], inside: set[fx.Node]) -> set[fx.Node]:
    """`roots` and every node of `inside` they are computed from."""
    seen: set[fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack += [a for a in node.all_input_nodes if a in inside]
    return seen


def _rewrite_layer(
    gm: fx.GraphModule, path: str, layer: MoELayer, group, dtype: torch.dtype | None
) -> dict:
    graph = gm.graph
    nodes = _region(graph, path)
    if not nodes:
        raise PassError(
            f"moe_dispatch: {layer.kind} {path!r} has no ops in the training graph (is it "
            "called in forward?); remove it, or compile without Strategy.moe."
        )
    inside = set(nodes)
    # Values computed from the model's inputs or weights; the rest are constants (an
    # arange, a zeros) that capture may share between layers.
    data: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr") or any(a in data for a in node.all_input_nodes):
            data.add(node)
    params = {id(p): role for role, p in layer.params.items()}
    reads: dict[str, fx.Node] = {}
    inputs: list[fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in inside:
                continue
            if arg.op == "get_attr":
                role = params.get(id(getattr_path(gm, arg.target)))
                if role is None:
                    raise PassError(
                        f"moe_dispatch: {layer.kind} {path!r} reads {arg.target!r}, which is "
                        "none of its routing or expert weights."
                    )
                reads.setdefault(role, arg)
            elif (
                isinstance(arg.meta.get("val"), torch.Tensor) and arg in data and arg not in inputs
            ):
                inputs.append(arg)
    used_outside = [n for n in nodes if any(u not in inside for u in n.users)]
    # Values of the layer's input or weights leave it; the rest, sizes and constants that
    # capture shares with later code (the next layer's capacity is the same symbolic
    # expression, its expert index the same arange), stay with what they are computed from.
    outputs = [n for n in used_outside if n in data and isinstance(n.meta.get("val"), torch.Tensor)]
    kept = _inputs_closure([n for n in used_outside if n not in outputs], inside)
    if len(inputs) != 1 or len(outputs) != 1 or len(reads) != len(layer.params):
        raise PassError(
            f"moe_dispatch: {layer.kind} {path!r} was captured with {len(inputs)} tensor "
            f"inputs and {len(outputs)} outputs used outside it ({[n.name for n in outputs]}; "
            f"expected 1 and 1: forward(x) -> y), reading parameters {sorted(reads)}; call the "
            "layer on one tensor."
        )
    (x,), (out,) = inputs, outputs
    name = "moe_dispatch_" + path.replace(".", "_")
    gm.add_submodule(name, ExpertParallelMoE(layer.settings, group, dtype))
    with graph.inserting_before(out):
        weights = [
            graph.call_function(torch.transpose, (reads[role], 1, 2))
            if role in layer.transposed
            else reads[role]
            for role in layer.params
        ]
        call = graph.call_module(name, (x, *weights))
    call.meta.update(
        {k: out.meta[k] for k in ("val", "nn_module_stack", "stack_trace") if k in out.meta}
    )
    call.meta["strato_module"] = path
    call.meta["strato_moe"] = {
        "layer": path,
        "collective": "all_to_all",
        "mesh_dim": EXPERT,
        "experts": [
            gm.get_submodule(name).first_expert,
            layer.settings["num_experts"] // group.size,
        ],
    }
    out.replace_all_uses_with(call)
    for node in reversed(nodes):
        if node not in kept:
            graph.erase_node(node)
    return {"replaced_nodes": len(nodes) - len(kept), "module": name}


@graph_pass(
    name="moe_dispatch",
    requires="shapes",
    provides="moe_dispatch",
    before=(
        "mixed_precision", "fuse", "pipeline_cut", "zero1", "zero2", "zero3", "data_parallel",
        "recompute",
    ),
)  # fmt: skip
def moe_dispatch(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Expert parallelism over `Strategy.moe.size` ranks for every strato.nn.MoE layer."""
    layers = moe_layers(ctx.model, ctx.training)
    others = unrecognised_moe_blocks(ctx.model, layers)
    if others:
        raise StrategyError(
            f"Strategy.moe: {type(ctx.model).__name__} has {', '.join(others[:3])}, a mixture-"
            "of-experts block moe_dispatch does not recognise (it dispatches strato.nn.MoE and "
            "Mixtral / Qwen2-MoE-style Hugging Face blocks: a top-k router without jitter, "
            "stacked bias-free SwiGLU experts, optionally a gated SwiGLU shared expert); "
            "build it with strato.nn.MoE, or drop Strategy.moe."
        )
    if not layers:
        raise StrategyError(
            f"Strategy.moe: {type(ctx.model).__name__} has no strato.nn.MoE layer to split "
            "over experts; build the experts with strato.nn.MoE, or drop Strategy.moe."
        )
    distributed = ctx.mesh.world_size > 1
    size = ctx.strategy.moe.size if distributed else 1  # one process holds every expert
    for path, layer in layers.items():
        experts = layer.settings["num_experts"]
        if experts % ctx.strategy.moe.size:
            raise StrategyError(
                f"Strategy.moe: ExpertParallel(size={ctx.strategy.moe.size}) does not divide "
                f"the {experts} experts of {path!r} ({layer.kind}); choose a size "
                "that divides num_experts."
            )
    record = {
        "expert_size": size,
        "layers": {
            path: {
                "kind": layer.kind,
                "num_experts": layer.settings["num_experts"],
                "experts_per_rank": layer.settings["num_experts"] // size,
                "top_k": layer.settings["top_k"],
                "d_model": layer.settings["d_model"],
                "dropless": not layer.settings["drop_tokens"],
                "shared_expert": bool(layer.settings.get("shared_expert")),
            }
            for path, layer in layers.items()
        },
    }
    if size == 1:
        why = "a single process holds every expert" if distributed else "expert size 1"
        ctx.record("moe_dispatch", **record, rewritten=False, reason=why)
        return gm
    group, replicas = ctx.mesh.expert_groups(size)
    dtype = _LOW_PRECISION.get(ctx.strategy.precision)
    for path, layer in layers.items():
        record["layers"][path].update(_rewrite_layer(gm, path, layer, group, dtype))
    expert_params = _shard_experts(ctx, layers, group, replicas)
    for node in gm.graph.nodes:  # expert weights changed shape: every fake value again
        if node.op != "placeholder":
            node.meta.pop("val", None)
    gm.graph.lint()
    gm.recompile()
    fill_fake_values(gm, ctx)
    ctx.record(
        "moe_dispatch",
        **record,
        rewritten=True,
        expert_group=list(group.ranks),
        expert_replicate_group=list(replicas.ranks),
        expert_params=expert_params,
        compute_dtype=str(dtype or "float32").removeprefix("torch."),
        collectives=[
            {
                "op": "all_to_all",
                "dim": EXPERT,
                "what": "kept tokens to their experts and back (forward; gradients in backward)",
            },
            {"op": "all_to_all", "dim": EXPERT, "what": "kept tokens per expert (int64 splits)"},
        ],
    )
    return gm


def _shard_experts(ctx: CompileContext, layers: dict[str, MoELayer], group, replicas) -> dict:
    """Leave each stacked expert weight holding this rank's experts only (rows [first,
    first + E/P) of dim 0) and register that box in the layout map; returns the record's
    'expert_params'. A second graph of the same model finds them already cut."""
    names = {id(p): n for n, p in ctx.model.named_parameters()}
    # Without ZeRO the first replica writes each expert box; ZeRO then cuts the box into
    # flat shards over `expert_replicate`, disjoint, each written by its owner.
    writes = bool(ctx.strategy.zero) or replicas.rank == 0
    out = {}
    for path, layer in layers.items():
        count = layer.settings["num_experts"] // group.size
        first = group.rank * count
        for role in EXPERT_ROLES:
            param = layer.params[role]
            name = names[id(param)]
            whole = whole_shape(param)
            step = expert_box(whole, first, count)
            tp_runtime.shard_parameter(param, [step])
            register_step(
                ctx,
                "moe_dispatch",
                name,
                torch.empty(whole, dtype=param.dtype, device="meta"),
                step,
                holds_full=False,
                writes=writes,
            )
            out[name] = {"layer": path, "experts": [first, count], "shape": list(whole),
                         "group": EXPERT_REPLICATE}  # fmt: skip
    return out
