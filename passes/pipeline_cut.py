"""The pipeline cut: which stage runs each node of the training graph.

Contract: training graphs only; after `shapes` and `mixed_precision` (and tensor/expert
parallel rewrites), before ZeRO / data parallel / recompute. The pass decides, the
runtime splits:

- Cut points are positions in the graph's node order where a module starts: by default
  the starts of numbered layers (`blocks.3`, `model.layers.2`), chosen so the stages'
  estimated cost (FLOP share from torch's formulas on the fake-tensor shapes, plus half the
  share of activation bytes) is as even as a contiguous split allows; or the user's
  `Pipeline.cuts` module names. Stage s runs on pipeline rank s % P.
- A node computed from the inputs alone (masks, position ids, sizes, rotary tables) is
  *replicated*: every stage that needs it computes it. Every other node belongs to one
  stage (never earlier than its inputs'), and a value used by a later stage is a boundary
  tensor sent to it, residual connections crossing several cuts included. Parameters are
  read by every stage that uses them; a weight used by several stages (an embedding tied
  to the LM head) is held by each and their gradients are summed across those stages.
- `node.meta['strato_stage']` holds the stage (or 'replicated'); ctx.records['pipeline_cut']
  the stages (modules, params, cost, boundary tensors with shapes), the producers of
  each stage, the tied parameters and `requires_train_step`; the layout says which stage's
  ranks write each parameter (the first stage that uses it).
- Stage-local parameters: with more than one pipeline rank each rank holds, reduces and
  updates only the parameters its stages read (`stage_local_params`, which the ZeRO and
  data-parallel passes plan over); its layout holds none of the others, and the runner
  frees their storage (`shards_parameters` in the record).

`split_stages(gm, record)` (called by the runtime on the final graph, after ZeRO and the
other passes added their nodes) builds one GraphModule per stage from those annotations.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import torch
import torch.fx as fx

from ..compiler.context import CompileContext
from ..compiler.errors import StrategyError, did_you_mean
from ..compiler.layout import register_step
from ..compiler.pass_manager import graph_pass
from ..runtime.saved_tensors import op_flops
from .annotate import getattr_path

STAGE = "strato_stage"
REPLICATED = "replicated"
_LAYER = re.compile(r"^(.*?\.\d+)(\.|$)")
_RANDOM = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial", "randperm")
ACTIVATION_WEIGHT = 0.5
"""Weight of a stage's share of activation bytes against its share of FLOPs in balancing."""


def layer_of(module: str) -> str | None:
    """The numbered layer a module path belongs to ('model.layers.2.mlp' -> 'model.layers.2')."""
    match = _LAYER.match(module or "")
    return match.group(1) if match else None


def _compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def _replicated(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computed from the graph inputs and buffers only (no parameter, no randomness):
    every stage that needs one computes it itself instead of receiving it."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            out.add(node)
        elif node.op == "get_attr":
            value = getattr_path(gm, node.target)
            if not isinstance(value, torch.nn.Parameter):
                out.add(node)
        elif node.op in ("call_function", "call_method"):
            name = str(getattr(node.target, "__name__", node.target))
            if any(r in name for r in _RANDOM) or not node.users:
                continue
            if all(i in out for i in node.all_input_nodes):
                out.add(node)
    return out


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def _hint(size: Any) -> int:
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else 1
    return int(size)


def _bytes(value: Any) -> int:
    if not isinstance(value, torch.Tensor):
        return 0
    numel = 1
    for size in value.shape:
        numel *= _hint(size)
    return numel * value.element_size()


def _node_cost(node: fx.Node) -> tuple[float, float]:
    """(FLOPs, output bytes) of a node from its fake values (0 where they are unknown)."""
    out = node.meta.get("val")
    flops = 0.0
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        args = torch.utils._pytree.tree_map(_val, node.args)
        kwargs = torch.utils._pytree.tree_map(_val, node.kwargs)
        try:
            flops = float(_hint(op_flops(node.target, args, kwargs, out)))
        except Exception:  # a formula that cannot read these values: count it as free
            flops = 0.0
    nbytes = sum(_bytes(v) for v in torch.utils._pytree.tree_leaves(out))
    return flops, float(nbytes)


@attrs.frozen
class _Candidate:
    position: int
    """Index in the compute-node order where a stage may start."""
    module: str
    """The module starting there."""


def _layer_candidates(nodes: list[fx.Node]) -> tuple[list[_Candidate], list[str]]:
    """Starts of numbered layers after the first (each may begin a stage), and all layers.
    A layer whose nodes are interleaved with another's cannot be cut around."""
    layers: list[str] = []
    last: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, node in enumerate(nodes):
        layer = layer_of(node.meta.get("strato_module", ""))
        if layer is None:
            continue
        if layer not in first:
            first[layer] = i
            layers.append(layer)
        last[layer] = i
    for a, b in zip(layers, layers[1:]):
        if last[a] > first[b]:
            raise StrategyError(
                f"pipeline_cut: module {a!r} runs again after {b!r} started, so no stage "
                f"boundary separates them; name cuts elsewhere with Pipeline(cuts=[...])."
            )
    return [_Candidate(first[layer], layer) for layer in layers[1:]], layers


def _user_cuts(
    nodes: list[fx.Node], cuts: tuple[str, ...], model: torch.nn.Module
) -> list[_Candidate]:
    """Positions where each named module starts (a suffix like 'layers.2' names
    'model.layers.2'), in model order."""
    modules = [n.meta.get("strato_module", "") for n in nodes]
    names = sorted({name for name, _ in model.named_modules() if name})
    out = []
    for cut in cuts:
        hits = [
            i
            for i, m in enumerate(modules)
            if m == cut or m.startswith(cut + ".") or m.endswith("." + cut) or f".{cut}." in m
        ]
        if not hits:
            raise StrategyError(
                f"Pipeline.cuts: {cut!r} matches no module the training graph runs."
                f"{did_you_mean(cut, names)} Cut before numbered layers, e.g. "
                f"{[layer for layer in dict.fromkeys(filter(None, map(layer_of, modules)))][1:3]}."
            )
        if hits[0] == 0:
            raise StrategyError(
                f"Pipeline.cuts: {cut!r} starts the graph, so the stage before it would be empty; "
                "cut at a later module."
            )
        out.append(_Candidate(hits[0], cut))
    positions = [c.position for c in out]
    if positions != sorted(set(positions)):
        raise StrategyError(
            f"Pipeline.cuts: {list(cuts)} must name distinct modules in the order the model "
            "runs them."
        )
    return out


def _balance(
    costs: list[float], candidates: list[_Candidate], stage_count: int
) -> list[_Candidate]:
    """The stage_count - 1 candidates splitting `costs` (per compute node) into contiguous
    stages with the smallest largest stage (dynamic programming over candidate starts)."""
    bounds = [0] + [c.position for c in candidates] + [len(costs)]
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    seg = len(bounds) - 1  # segments between consecutive bounds

    def cost(i: int, j: int) -> float:  # segments i..j-1
        return prefix[bounds[j]] - prefix[bounds[i]]

    inf = float("inf")
    best = [[inf] * (seg + 1) for _ in range(stage_count + 1)]
    choice = [[0] * (seg + 1) for _ in range(stage_count + 1)]
    best[0][0] = 0.0
    for k in range(1, stage_count + 1):
        for j in range(k, seg + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i, j))
                if value < best[k][j]:
                    best[k][j], choice[k][j] = value, i
    picked, j = [], seg
    for k in range(stage_count, 0, -1):
        i = choice[k][j]
        if k > 1:
            picked.append(candidates[i - 1])
        j = i
    return sorted(picked, key=lambda c: c.position)


@graph_pass(
    name="pipeline_cut",
    requires="shapes",
    provides="pipeline",
    after=("mixed_precision", "tensor_parallel", "moe_dispatch"),
    before=("zero1", "zero2", "zero3", "data_parallel", "recompute"),
)
def pipeline_cut(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Assign every node of the training graph to a pipeline stage; record the stages."""
    config = ctx.strategy.pipeline
    if not ctx.training or config is None:
        return gm
    stage_count, ranks = config.stage_count, config.stages
    nodes = _compute_nodes(gm)
    replicated = _replicated(gm)
    costs = [_node_cost(n) for n in nodes]
    total_flops = sum(f for f, _ in costs) or 1.0
    total_bytes = sum(b for _, b in costs) or 1.0
    weights = [
        0.0 if n in replicated else f / total_flops + ACTIVATION_WEIGHT * b / total_bytes
        for n, (f, b) in zip(nodes, costs)
    ]
    if config.cuts is not None:
        cuts = _user_cuts(nodes, config.cuts, ctx.model)
    else:
        candidates, layers = _layer_candidates(nodes)
        if len(candidates) + 1 < stage_count:
            raise StrategyError(
                f"Pipeline: {stage_count} stages need {stage_count - 1} cuts between numbered "
                f"layers, but {type(ctx.model).__name__} runs {len(layers)} "
                f"({', '.join(layers) or 'none'}), so at most {max(len(layers), 1)} stages; use "
                "fewer stages (x virtual_stages), or name cut modules with Pipeline(cuts=[...])."
            )
        cuts = _balance(weights, candidates, stage_count)
    starts = [c.position for c in cuts]

    # Stage of each node: by position, never earlier than an input's (keeps stages a DAG).
    stage_of: dict[fx.Node, Any] = {}
    index = {n: i for i, n in enumerate(nodes)}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr") or node in replicated:
            stage_of[node] = REPLICATED
            continue
        if node.op == "output":
            stage_of[node] = stage_count - 1
            continue
        stage = sum(1 for s in starts if s <= index[node])
        inputs = [stage_of[i] for i in node.all_input_nodes if stage_of.get(i) != REPLICATED]
        stage_of[node] = max([stage, *inputs])
    for node, stage in stage_of.items():
        node.meta[STAGE] = stage

    record = _stage_record(gm, nodes, stage_of, costs, stage_count, ctx)
    record.update(
        cuts=[{"position": c.position, "module": c.module} for c in cuts],
        schedule=config.schedule,
        microbatches=config.microbatches,
        virtual_stages=config.virtual_stages,
        ranks=ranks,
        requires_train_step=True,
        collectives=[
            {
                "op": "send/recv",
                "dim": "pipeline",
                "what": "boundary activations forward, their gradients backward",
            },
            {
                "op": "all_reduce",
                "dim": "pipeline",
                "what": "gradients of weights held by several stages (tied)",
            },
            {
                "op": "broadcast",
                "dim": "pipeline",
                "what": "the micro-batch losses, from the last stage",
            },
        ],
    )
    # Multi-rank: each rank keeps only its stages' parameters (the engine builds the eval
    # graph before the runner frees the others, since the model cannot be captured after).
    record["shards_parameters"] = ctx.mesh.sizes.get("pipeline", 1) > 1
    ctx.record("pipeline_cut", **record)
    _register_layout(ctx, record)
    return gm


def stage_local_params(ctx: CompileContext) -> set[str] | None:
    """Names of the parameters this rank's pipeline stages read (tied ones included), which
    are all it holds, reduces and updates; None without a multi-rank pipeline (every rank
    holds everything). The ZeRO and data-parallel passes plan over these only."""
    record = ctx.records.get("pipeline_cut")
    if record is None or not record.get("shards_parameters"):
        return None
    mine = ctx.mesh.coordinates(ctx.mesh.rank).get("pipeline", 0)
    return {
        name
        for info in record["stages"]
        if info["stage"] % record["ranks"] == mine
        for name in info["params"]
    }


def _stage_record(
    gm: fx.GraphModule,
    nodes: list[fx.Node],
    stage_of: dict[fx.Node, Any],
    costs: list[tuple[float, float]],
    stage_count: int,
    ctx: CompileContext,
) -> dict[str, Any]:
    first_name = {id(p): n for n, p in ctx.model.named_parameters()}
    stages = [
        {
            "stage": s,
            "modules": [],
            "params": [],
            "flops": 0.0,
            "activation_bytes": 0.0,
            "nodes": 0,
            "receives": [],
        }
        for s in range(stage_count)
    ]
    for node, (flops, nbytes) in zip(nodes, costs):
        s = stage_of[node]
        if s == REPLICATED:
            continue
        info = stages[s]
        info["nodes"] += 1
        info["flops"] += flops
        info["activation_bytes"] += nbytes
        module = node.meta.get("strato_module", "")
        top = layer_of(module) or module.split(".")[0]
        if top and top not in info["modules"]:
            info["modules"].append(top)
    param_stages: dict[str, list[int]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr_path(gm, node.target)
        name = first_name.get(id(value))
        if name is None:
            continue
        users = _stages_using(node, stage_of)
        for s in users:
            if s not in param_stages.setdefault(name, []):
                param_stages[name].append(s)
    for name, p in ctx.model.named_parameters():
        if p.requires_grad:
            param_stages.setdefault(name, [0])  # never read: stage 0 keeps it
    for name, users in param_stages.items():
        users.sort()
        for s in users:
            stages[s]["params"].append(name)
    producers: dict[int, list[int]] = {s: [] for s in range(stage_count)}
    for node in gm.graph.nodes:
        s = stage_of.get(node)
        if s == REPLICATED or s is None:
            continue
        for user_stage in sorted(_stages_using(node, stage_of) - {s}):
            val = node.meta.get("val")
            stages[user_stage]["receives"].append(
                {
                    "from": s,
                    "node": node.name,
                    "shape": [_hint(d) for d in val.shape]
                    if isinstance(val, torch.Tensor)
                    else None,
                    "dtype": str(val.dtype).removeprefix("torch.")
                    if isinstance(val, torch.Tensor)
                    else type(val).__name__,
                }
            )
            if s not in producers[user_stage]:
                producers[user_stage].append(s)
    return {
        "stage_count": stage_count,
        "stages": stages,
        "param_stages": param_stages,
        "tied": {n: s for n, s in param_stages.items() if len(s) > 1},
        "producers": {s: sorted(p) for s, p in producers.items()},
    }


def _stages_using(node: fx.Node, stage_of: dict[fx.Node, Any]) -> set[int]:
    """Stages that read `node`, looking through replicated users (which run where needed)."""
    out: set[int] = set()
    seen: set[fx.Node] = set()
    todo = list(node.users)
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        s = stage_of.get(user)
        if s == REPLICATED:
            todo.extend(user.users)
        elif s is not None:
            out.add(s)
    return out


def _register_layout(ctx: CompileContext, record: dict[str, Any]) -> None:
    """A multi-rank pipeline's rank holds only its stages' parameters: the others get an
    empty box (holds none of it, writes nothing). The ranks of the first stage using a
    parameter write it (with ZeRO its shard ranks, which the zero pass registers; else
    that stage's first data-parallel rank); the other stages sharing a tied weight hold
    a copy and write nothing. In one process every parameter is whole and written."""
    mesh = ctx.mesh
    ranks = record["ranks"]
    local = not record["shards_parameters"]
    coords = mesh.coordinates(mesh.rank)
    mine = coords.get("pipeline", 0)
    first_replica = ctx.strategy.zero > 0 or all(
        coords.get(d, 0) == 0 for d in ("replicate", "shard")
    )
    params = dict(ctx.model.named_parameters())
    for name, users in record["param_stages"].items():
        tensor = params[name]
        held = local or any(s % ranks == mine for s in users)
        stops = list(tensor.shape) if held else [0] * tensor.ndim
        register_step(
            ctx,
            "pipeline_cut",
            name,
            tensor,
            {"kind": "box", "starts": [0] * tensor.ndim, "stops": stops},
            holds_full=held,
            writes=held and (local or users[0] % ranks == mine) and first_replica,
        )


# ---------------------------------------------------------------------- the split


@attrs.frozen(eq=False)
class StageGraph:
    """One stage's GraphModule and how it connects to the others."""

    stage: int
    gm: fx.GraphModule
    """Called as gm(*graph_inputs, *received): the whole graph's flat inputs, then the
    boundary tensors it receives (in `receives` order)."""
    receives: tuple[tuple[int, str], ...]
    """(producer stage, node name) of each boundary input."""
    sends: tuple[tuple[str, tuple[int, ...]], ...]
    """(node name, consumer stages) of each boundary output, in output order (non-last
    stages; the last stage returns the whole graph's output leaves)."""
    params: tuple[str, ...]
    """Parameters (first names) this stage reads."""


def split_stages(
    gm: fx.GraphModule, record: dict[str, Any], model: torch.nn.Module
) -> list[StageGraph]:
    """One StageGraph per stage from the final training graph's `strato_stage` annotations.
    Nodes a later pass added run with their latest input's stage, or, reading no staged
    value, with the next annotated node; a submodule a later pass outlined (a recompute
    region) runs in the stage its nodes were cut into."""
    stage_count = record["stage_count"]
    stage_of: dict[fx.Node, Any] = {}
    pending: list[fx.Node] = []
    for node in gm.graph.nodes:
        stage = node.meta.get(STAGE)
        if stage is None and node.op == "call_module":
            stage = _module_stage(gm, node)
        if stage is None:
            pending.append(node)
            continue
        for p in pending:
            inputs = [
                stage_of[i] for i in p.all_input_nodes if stage_of.get(i) not in (REPLICATED, None)
            ]
            # With its inputs (a region's getitem stays with the region), else where the
            # next annotated node runs (a ZeRO wait before a parameter's first use).
            stage_of[p] = max(inputs) if inputs else (stage if stage != REPLICATED else 0)
        pending = []
        stage_of[node] = stage
    for p in pending:
        stage_of[p] = stage_count - 1
    first_name = {id(p): n for n, p in model.named_parameters()}
    sends: dict[int, list[tuple[str, tuple[int, ...]]]] = {s: [] for s in range(stage_count)}
    for node in gm.graph.nodes:
        s = stage_of[node]
        if s == REPLICATED or node.op == "output":
            continue
        users = _stages_using(node, stage_of) - {s}
        if users:
            sends[s].append((node.name, tuple(sorted(users))))
    receives: dict[int, list[tuple[int, str]]] = {s: [] for s in range(stage_count)}
    for s, outs in sends.items():
        for name, users in outs:
            for u in users:
                receives[u].append((s, name))
    return [
        _stage_graph(gm, s, s == stage_count - 1, stage_of, receives[s], sends[s], first_name)
        for s in range(stage_count)
    ]


def _module_stage(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The stage of a submodule a later pass outlined (a recompute region): the one stage
    its nodes were cut into (replicated when all are), so the region runs whole there."""
    body = getattr(gm.get_submodule(str(node.target)), "body", None)
    inner = body.graph.nodes if isinstance(body, fx.GraphModule) else ()
    stages = {n.meta[STAGE] for n in inner if n.op != "placeholder" and STAGE in n.meta}
    stages.discard(REPLICATED)
    if len(stages) > 1:
        raise StrategyError(
            f"pipeline: {node.target} (module {node.meta.get('strato_module', '?')!r}) holds "
            f"nodes of stages {sorted(stages)}: a recompute region cannot cross a stage cut. "
            "Cut at a module boundary outside it with Pipeline(cuts=[...]), or recompute "
            "smaller modules (strato.Recompute(modules=[...]))."
        )
    if stages:
        return stages.pop()
    return REPLICATED if inner else None


def _stage_graph(
    gm: fx.GraphModule,
    s: int,
    last: bool,
    stage_of: dict[fx.Node, Any],
    receives: list[tuple[int, str]],
    sends: list[tuple[str, tuple[int, ...]]],
    first_name: dict[int, str],
) -> StageGraph:
    """Stage s's nodes (and the replicated ones they need) as a GraphModule over the
    whole graph's inputs and the boundary tensors it receives."""
    by_name = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for p in gm.graph.nodes:
        if p.op == "placeholder":
            env[p] = graph.placeholder(p.name)
            env[p].meta = dict(p.meta)
    for _, name in receives:
        src = by_name[name]
        env[src] = graph.placeholder(f"recv_{name}")
        env[src].meta = dict(src.meta)
    params: list[str] = []

    def copy(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        for i in node.all_input_nodes:
            copy(i)
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "get_attr":
            name = first_name.get(id(getattr_path(gm, node.target)))
            if name and name not in params:
                params.append(name)
        return env[node]

    output = None
    for node in gm.graph.nodes:
        if node.op == "output":
            output = node
        elif stage_of[node] == s:
            copy(node)
    if last:  # the whole graph's outputs
        result = torch.fx.node.map_arg(output.args[0], copy)
    else:
        result = tuple(copy(by_name[name]) for name, _ in sends)
    graph.output(result)
    return StageGraph(
        stage=s,
        gm=fx.GraphModule(gm, graph, class_name=f"Stage{s}"),
        receives=tuple(receives),
        sends=tuple(sends),
        params=tuple(params),
    )
