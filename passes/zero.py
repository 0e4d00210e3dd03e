"""ZeRO stages 1, 2 and 3: decide how parameters, gradients and optimizer states are sharded.

Every stage shards each trainable parameter the same way: flattened, padded to a multiple
of the world size N, and cut into N equal shards; rank r owns elements [r*s, (r+1)*s).
Parameters are grouped for communication, and the group's collective buffer is laid out
rank-major ([N, S], each parameter's shard at a fixed offset of the S columns), so one
all-gather or reduce-scatter serves the whole group.

- zero1 / zero2: parameters go into *buckets* in the order their gradients become ready
  (reverse first use). Stage 1 reduce-scatters the buckets at the accumulation boundary,
  stage 2 as soon as a bucket's gradients are complete in backward; after the update each
  bucket's shards are all-gathered back into the full parameters, in forward order
  (`gather_order`), and left in flight: a `strato::zero_await_bucket` node before the
  bucket's first use in forward lands it, so the gathers overlap the next forward.
- zero3: parameters are grouped into *units* (one per numbered layer, e.g. 'blocks.3', else
  per top-level module), ordered by first use. Each unit's parameter reads become one
  `strato::zero_gather` node before the first use and one `strato::zero_release` node
  after the last use in forward; the gather's backward reduce-scatters into the shards.
  Parameters smaller than `Strategy.zero_small_param_threshold` elements stay whole on
  every rank and are handled like stage 2.

Decisions go to ctx.records['zero'] and node.meta['strato_zero']; runtime/zero.py reads them.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx as fx

from ..compiler.context import CompileContext
from ..compiler.layout import register_flat_shards
from ..compiler.pass_manager import graph_pass
from ..runtime import zero_ops
from ..runtime.buckets import shard_numel
from ..runtime.expert_parallel import expert_params
from .annotate import getattr_path
from .pipeline_cut import stage_local_params

_LAYER = re.compile(r"^(.*?\.\d+)(\.|$)")
SHARD, REPLICATE = "shard", "replicate"
"""The mesh dimensions ZeRO shards over and replicates across (runtime/mesh.py)."""
EXPERT_REPLICATE = "expert_replicate"
"""Where expert weights (sharded over the expert group by moe_dispatch) are sharded and
reduced instead: the ranks holding the same experts (runtime/mesh.py `expert_groups`)."""


def unit_name(param_name: str) -> str:
    """The stage-3 unit of a parameter: its first numbered layer ('blocks.3'), else its
    top-level module ('tok_emb'), else the root ('')."""
    match = _LAYER.match(param_name)
    if match:
        return match.group(1)
    head, _, rest = param_name.partition(".")
    return head if rest else ""


def _parameter_uses(gm: fx.GraphModule, model: torch.nn.Module) -> dict[str, list[fx.Node]]:
    """get_attr nodes reading each trainable parameter, by the parameter's first name
    (tied weights: several targets, one parameter), in graph order."""
    first_name = {id(p): n for n, p in model.named_parameters()}
    uses: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr_path(gm, node.target)
        if isinstance(value, torch.nn.Parameter) and value.requires_grad:
            name = first_name.get(id(value))
            if name is not None:
                uses.setdefault(name, []).append(node)
    return uses


def _first_use_order(gm: fx.GraphModule, uses: dict[str, list[fx.Node]]) -> list[str]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    big = len(order)

    def first(name: str) -> int:
        return min((order[u] for node in uses[name] for u in node.users), default=big)

    return sorted(uses, key=first)


def _layout(
    names: list[str], params: dict[str, torch.Tensor], world_size: int, group: str = SHARD
) -> dict:
    """Rank-major collective layout of a group: each parameter's shard offset in S columns,
    over `world_size` shards along mesh group `group`."""
    offsets, offset = {}, 0
    for name in names:
        offsets[name] = offset
        offset += shard_numel(params[name].numel(), world_size)
    return {"params": list(names), "offsets": offsets, "shard_numel": offset, "group": group,
            "shards": world_size}  # fmt: skip


def _buckets(
    names: list[str],
    params: dict[str, torch.Tensor],
    shards: dict[str, tuple[str, int]],
    bucket_numel: int,
) -> list[dict]:
    """Consecutive parameters (in gradient-ready order) until a bucket holds bucket_numel;
    a bucket holds parameters of one shard group (`shards`: name -> (group, size))."""
    buckets: list[list[str]] = []
    size = 0
    for name in names:
        if not buckets or size >= bucket_numel or shards[buckets[-1][0]] != shards[name]:
            buckets.append([])
            size = 0
        buckets[-1].append(name)
        size += params[name].numel()
    return [
        {"name": f"bucket{i}", **_layout(b, params, shards[b[0]][1], shards[b[0]][0])}
        for i, b in enumerate(buckets)
    ]


def _settings(ctx: CompileContext) -> dict[str, Any]:
    strategy = ctx.strategy
    bucket_mb = float(getattr(strategy, "zero_bucket_mb", 4.0))
    return {
        "prefetch": int(getattr(strategy, "zero_prefetch", 1)),
        "bucket_numel": max(1, int(bucket_mb * 2**20 / 4)),
        "small_param_threshold": int(getattr(strategy, "zero_small_param_threshold", 0)),
        "offload": _offload_record(getattr(strategy, "offload", None)),
    }


def _offload_record(offload: Any) -> dict | None:
    if offload is None:
        return None
    if isinstance(offload, str):
        return {"kind": offload}
    return {"kind": "nvme", "path": str(getattr(offload, "path", ""))}


def plan_zero(gm: fx.GraphModule, ctx: CompileContext, stage: int) -> fx.GraphModule:
    """Record the sharding layout for `stage`; for stage 3 also rewrite parameter reads."""
    settings = _settings(ctx)
    n = ctx.mesh.size(SHARD)  # shards: ranks along `shard`; replicas along `replicate`
    replicas = ctx.mesh.size(REPLICATE)
    uses = _parameter_uses(gm, ctx.model)
    local = stage_local_params(ctx)  # a pipeline rank plans its stages' parameters only
    if local is not None:
        uses = {name: nodes for name, nodes in uses.items() if name in local}
    params = {name: nodes[0] for name, nodes in uses.items()}
    tensors = {name: getattr_path(gm, node.target) for name, node in params.items()}
    # Trainable parameters the graph never reads are recorded too (no aliases); the runtime
    # keeps them out of the optimizer, since they never get a gradient (as in eager).
    for name, p in ctx.model.named_parameters():
        if p.requires_grad and name not in tensors and (local is None or name in local):
            tensors[name] = p
    forward_order = _first_use_order(gm, uses) + [t for t in tensors if t not in uses]
    # Expert shards (moe_dispatch) are sharded over the ranks holding the same experts.
    experts = [t for t in tensors if t in expert_params(ctx.records)]
    expert_group = ctx.mesh.group(EXPERT_REPLICATE) if experts else None
    shards = {t: (SHARD, n) for t in tensors}
    if expert_group is not None:
        shards.update({t: (EXPERT_REPLICATE, expert_group.size) for t in experts})

    if stage == 3:
        threshold = settings["small_param_threshold"]
        gathered = [t for t in forward_order if t in uses and tensors[t].numel() >= threshold]
    else:
        gathered = []
    persistent = [t for t in forward_order if t not in gathered]
    buckets = _buckets(list(reversed(persistent)), tensors, shards, settings["bucket_numel"])

    unit_params: dict[tuple[str, str], list[str]] = {}
    for name in gathered:
        unit_params.setdefault((unit_name(name), shards[name][0]), []).append(name)
    units = [
        {
            "name": (unit or "<root>") + (" experts" if group == EXPERT_REPLICATE else ""),
            "index": i,
            **_layout(names, tensors, shards[names[0]][1], group),
        }
        for i, ((unit, group), names) in enumerate(unit_params.items())
    ]
    for bucket in buckets:
        for name in bucket["params"]:
            for node in uses.get(name, []):
                node.meta["strato_zero"] = {
                    "param": name,
                    "bucket": bucket["name"],
                    "offset": bucket["offsets"][name],
                    "shard_numel": shard_numel(tensors[name].numel(), bucket["shards"]),
                }
    if units:
        _insert_gathers(gm, units, uses, tensors)
    gather_order, await_gathers = _insert_bucket_waits(gm, buckets, uses)
    ctx.record(
        "zero",
        stage=stage,
        world_size=ctx.world_size,
        shard_dim=SHARD,
        shard_size=n,
        replicate_dim=REPLICATE,
        replicate_size=replicas,
        **settings,
        params={
            name: {
                "shape": list(t.shape),
                "numel": t.numel(),
                "dtype": str(t.dtype).removeprefix("torch."),
                "shard_numel": shard_numel(t.numel(), shards[name][1]),
                "group": shards[name][0],
                "sharded_parameter": name in gathered,
                "aliases": [node.target for node in uses.get(name, [])],
            }
            for name, t in tensors.items()
        },
        buckets=buckets,
        gather_order=gather_order,
        await_gathers=await_gathers,
        units=units,
        forward_order=[u["name"] for u in units],
        # The engine reads this: once the manager shards them, parameters cannot be captured.
        shards_parameters=bool(units),
        stage_local=local is not None,
        collectives=_collectives(stage, bool(units), bool(buckets), replicas)
        + _expert_collectives(stage, experts, gathered),
    )
    # Checkpoints, full_state_dict and resharding read where each tensor lives from here.
    register_flat_shards(
        ctx,
        f"zero{stage}",
        {t: (p, t not in gathered) for t, p in tensors.items() if t not in experts},
        ctx.mesh.group(SHARD).rank,
        n,
        writes=ctx.mesh.group(REPLICATE).rank == 0,  # replicas hold the same shards
    )
    if expert_group is not None:  # disjoint shards of this rank's experts: each writes its own
        register_flat_shards(
            ctx,
            f"zero{stage}",
            {t: (tensors[t], t not in gathered) for t in experts},
            expert_group.rank,
            expert_group.size,
        )
    return gm


def _expert_collectives(stage: int, experts: list[str], gathered: list[str]) -> list[dict]:
    """The expert weights' collectives, over the ranks holding the same experts."""
    if not experts:
        return []
    what = "expert " + ("unit " if any(t in gathered for t in experts) else "bucket ")
    out = [{"op": "reduce_scatter", "dim": EXPERT_REPLICATE, "what": what + "gradients"}]
    if any(t in gathered for t in experts):
        out.append({"op": "all_gather", "dim": EXPERT_REPLICATE, "what": "expert unit parameters"})
    if stage < 3 or any(t not in gathered for t in experts):
        out.append({"op": "all_gather", "dim": EXPERT_REPLICATE, "what": "updated expert shards"})
    return out


def _collectives(stage: int, has_units: bool, has_buckets: bool, replicas: int) -> list[dict]:
    """What the step communicates over which mesh dimension (printed by `engine.mesh`)."""
    out = []
    if has_units:
        out += [
            {
                "op": "all_gather",
                "dim": SHARD,
                "what": "stage-3 unit parameters (forward, backward)",
            },
            {"op": "reduce_scatter", "dim": SHARD, "what": "stage-3 unit gradients"},
        ]
    if has_buckets:
        when = "at the boundary" if stage == 1 else "during backward"
        out += [
            {"op": "reduce_scatter", "dim": SHARD, "what": f"gradient buckets ({when})"},
            {"op": "all_gather", "dim": SHARD, "what": "updated bucket shards (after the update)"},
        ]
    if replicas > 1:
        out.append({"op": "all_reduce", "dim": REPLICATE, "what": "reduced gradient shards"})
    out.append({"op": "all_reduce", "dim": SHARD, "what": "gradient norm / found-inf (scalars)"})
    return out


def _insert_bucket_waits(
    gm: fx.GraphModule, buckets: list[dict], uses: dict[str, list[fx.Node]]
) -> tuple[list[int], bool]:
    """Put a `strato::zero_await_bucket` before each bucket's first use in forward; return
    the bucket indices in that order (buckets forward never reads last) and whether any
    wait was inserted."""
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    first: dict[int, tuple[int, fx.Node, fx.Node]] = {}
    for index, bucket in enumerate(buckets):
        reads = [
            (order[user], user, node)
            for name in bucket["params"]
            for node in uses.get(name, [])
            for user in node.users
        ]
        if reads:
            first[index] = min(reads, key=lambda r: r[0])
    for index, (_, user, read) in first.items():
        # The read of the first-used parameter precedes its user, so it can be the argument
        # through which the runtime is found.
        with graph.inserting_before(user):
            wait = graph.call_function(torch.ops.strato.zero_await_bucket.default, ([read], index))
        wait.meta["strato_zero"] = {
            "bucket": buckets[index]["name"],
            "lands": "the bucket's parameter all-gather started by the last update",
            "collective": "all_gather",
            "mesh_dim": SHARD,
        }
    used = sorted(first, key=lambda i: first[i][0])
    return used + [i for i in range(len(buckets)) if i not in first], bool(first)


def _insert_gathers(
    gm: fx.GraphModule,
    units: list[dict],
    uses: dict[str, list[fx.Node]],
    tensors: dict[str, torch.Tensor],
) -> None:
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    for unit in units:
        names, world_size, along = unit["params"], unit["shards"], unit["group"]
        across = [REPLICATE] if along == SHARD else []  # expert shards have no replicas
        shard_nodes = [uses[name][0] for name in names]
        users = [u for name in names for node in uses[name] for u in node.users]
        first_user = min(users, key=order.__getitem__)
        shapes = zero_ops.encode_shapes([tuple(tensors[name].shape) for name in names])
        with graph.inserting_before(first_user):
            gather = graph.call_function(
                torch.ops.strato.zero_gather.default, (shard_nodes, unit["index"], shapes)
            )
            fulls = [graph.call_function(operator.getitem, (gather, i)) for i in range(len(names))]
        gather.meta["strato_zero"] = {
            "unit": unit["name"],
            "params": names,
            "collective": "all_gather",
            "mesh_dim": along,
            "backward": "all_gather (recompute) + reduce_scatter into the shards over "
            f"{along!r}" + "".join(f", then all_reduce over {d!r}" for d in across),
            "backward_mesh_dims": [along, *across],
        }
        for name, full, shard_node in zip(names, fulls, shard_nodes):
            val = shard_node.meta.get("val")
            full.meta["val"] = val
            full.meta["strato_zero"] = {"param": name, "unit": unit["name"]}
            for node in uses[name]:
                node.replace_all_uses_with(
                    full, delete_user_cb=lambda user, g=gather: user is not g
                )
            if val is not None:
                shard_node.meta["val"] = val.new_empty((shard_numel(val.numel(), world_size),))
            shard_node.meta["strato_zero"] = {
                "param": name,
                "unit": unit["name"],
                "offset": unit["offsets"][name],
                "shard_numel": shard_numel(tensors[name].numel(), world_size),
            }
        for name in names:  # the other reads of a tied parameter are now unused
            for node in uses[name][1:]:
                if not node.users:
                    graph.erase_node(node)
        gather.meta["val"] = [f.meta.get("val") for f in fulls]
        order = {node: i for i, node in enumerate(graph.nodes)}
        last_user = max(
            (u for f in fulls for u in f.users), key=order.__getitem__, default=fulls[-1]
        )
        anchor = last_user if last_user.op != "output" else last_user.prev
        with graph.inserting_after(anchor):
            release = graph.call_function(
                torch.ops.strato.zero_release.default, (shard_nodes, unit["index"])
            )
        release.meta["strato_zero"] = {"unit": unit["name"], "frees": names}
        order = {node: i for i, node in enumerate(graph.nodes)}
    all_shards = [uses[name][0] for unit in units for name in unit["params"]]
    first_gather = next(n for n in graph.nodes if n.target is torch.ops.strato.zero_gather.default)
    with graph.inserting_before(first_gather):
        begin = graph.call_function(torch.ops.strato.zero_forward_begin.default, (all_shards,))
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        end = graph.call_function(torch.ops.strato.zero_forward_end.default, (all_shards,))
    begin.meta["strato_zero"] = {"saved_parameters": "as handles; backward gathers again"}
    end.meta["strato_zero"] = {"saved_parameters": "stored normally again"}


@graph_pass(name="zero1", requires="shapes", provides="zero1", conflicts=("zero2", "zero3"))
def zero_stage1(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """ZeRO stage 1: shard optimizer states (record the bucket layout)."""
    return plan_zero(gm, ctx, 1)


@graph_pass(name="zero2", requires="shapes", provides="zero2", conflicts=("zero1", "zero3"))
def zero_stage2(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """ZeRO stage 2: shard optimizer states and gradients (reduce-scatter buckets in backward)."""
    return plan_zero(gm, ctx, 2)


@graph_pass(name="zero3", requires="shapes", provides="zero3", conflicts=("zero1", "zero2"))
def zero_stage3(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """ZeRO stage 3: shard parameters too; parameter reads become gather/release nodes."""
    return plan_zero(gm, ctx, 3)


ZERO_PASSES = {1: zero_stage1, 2: zero_stage2, 3: zero_stage3}

DATA_PARALLEL_BUCKET_BYTES = 25 * 2**20
"""Gradient bytes per data-parallel all-reduce bucket (DDP's default)."""


@graph_pass(
    name="data_parallel",
    requires="shapes",
    provides="data_parallel",
    conflicts=("zero1", "zero2", "zero3"),
)
def data_parallel(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """ZeRO stage 0: record the gradient all-reduce buckets over the whole mesh
    (replicate x shard), in gradient-ready order (reverse first use), same-dtype runs of
    at most DATA_PARALLEL_BUCKET_BYTES; runtime/data_parallel.py follows them."""
    uses = _parameter_uses(gm, ctx.model)
    local = stage_local_params(ctx)  # a pipeline rank reduces its stages' parameters only
    if local is not None:
        uses = {name: nodes for name, nodes in uses.items() if name in local}
    tensors = {name: getattr_path(gm, nodes[0].target) for name, nodes in uses.items()}
    for name, p in ctx.model.named_parameters():
        if p.requires_grad and name not in tensors and (local is None or name in local):
            tensors[name] = p  # never read: never gets a gradient
    order = _first_use_order(gm, uses) + [t for t in tensors if t not in uses]
    dims = [REPLICATE, SHARD]
    experts = expert_params(ctx.records)  # reduced over the ranks holding the same experts
    group_of = {name: EXPERT_REPLICATE if name in experts else ",".join(dims) for name in tensors}
    buckets: list[list[str]] = []
    size = 0
    for name in reversed(order):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        full = size + nbytes > DATA_PARALLEL_BUCKET_BYTES
        last = buckets[-1][0] if buckets else None
        if (
            last is None
            or full
            or tensors[last].dtype != t.dtype
            or group_of[last] != group_of[name]
        ):
            buckets.append([])
            size = 0
        buckets[-1].append(name)
        size += nbytes
    ctx.record(
        "data_parallel",
        mesh_dims=dims,
        size=ctx.mesh.size(*dims),
        bucket_bytes=DATA_PARALLEL_BUCKET_BYTES,
        params=list(tensors),
        stage_local=local is not None,
        buckets=[
            {
                "name": f"bucket{i}",
                "params": names,
                "numel": sum(tensors[n].numel() for n in names),
                "dtype": str(tensors[names[0]].dtype).removeprefix("torch."),
                "group": group_of[names[0]],
            }
            for i, names in enumerate(buckets)
        ],
        collectives=[
            {
                "op": "all_reduce",
                "dim": ",".join(dims),
                "what": "gradient buckets, during backward (+1 has-gradient flag per parameter)",
            },
            *[
                {"op": "all_reduce", "dim": EXPERT_REPLICATE, "what": "expert gradient buckets"}
                for _ in range(bool(experts))
            ],
        ],
    )
    return gm
