"""Activation recomputation: outline module regions and recompute them in backward.

Contract: runs after annotate_metadata (`shapes`), mixed_precision, fuse and the ZeRO / data-parallel
passes (their casts and ZeRO-3 gathers belong to the region, so a recomputed region casts
and gathers again in backward); training graphs only.

Regions are module boundaries (`nn_module_stack`): by default every numbered layer
(`blocks.3`), else the modules `Strategy.recompute.modules` names by glob (outermost match
wins). Each contiguous run of a region's nodes becomes one `RecomputeRegion` submodule
(`recompute_blocks_3`, a `call_module` node whose `meta['strato_recompute']` says region
and policy), which runs its body under the policy (`runtime.saved_tensors`: replayed from
its graph, `runtime.region_replay`). A `Budget` measures every region's kept bytes and ops
on fake tensors under each policy and picks, among the uniform plans and mixes, the one
with the least estimated recompute time that fits (`plan_budget`). Everything goes to
`ctx.records['recompute']`, which `explain()` prints.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import operator

import torch
import torch.fx as fx

from ..compiler.context import CompileContext
from ..compiler.errors import StrategyError, did_you_mean
from ..compiler.pass_manager import graph_pass
from ..compiler.recompute_config import Budget, Recompute
from ..runtime.saved_tensors import RecomputeRegion, measure_graph

CHECKPOINT_REGIONS = "strato_checkpoint_regions"
"""gm.meta key: module paths the model itself checkpoints, found at capture."""

TAIL = "<tail>"
"""Region name: the nodes after the last numbered layer (final norm, output projection, loss)."""

_GATHER = "strato.zero_gather.default"


def _checkpointed_module(fn) -> torch.nn.Module | None:
    """The module a checkpointed function runs: a module, its bound method, or a partial of
    either (Hugging Face passes `partial(forward, layer, **kwargs)`)."""
    while isinstance(fn, functools.partial):
        if fn.args and isinstance(fn.args[0], torch.nn.Module):
            return fn.args[0]
        fn = fn.func
    target = getattr(fn, "__self__", fn)
    return target if isinstance(target, torch.nn.Module) else None


@contextlib.contextmanager
def model_checkpoint_regions(model: torch.nn.Module):
    """While tracing, note the modules the model runs under torch.utils.checkpoint (its own
    calls or Hugging Face gradient checkpointing): the trace inlines them, this keeps them."""
    import torch.utils.checkpoint as tuc

    names = {id(m): n for n, m in model.named_modules()}
    found: list[str] = []

    def note(fn) -> None:
        path = names.get(id(_checkpointed_module(fn)))
        if path and path not in found:
            found.append(path)

    non_reentrant, reentrant = tuc._checkpoint_without_reentrant_generator, tuc.CheckpointFunction

    def noting_generator(fn, *args, **kwargs):
        note(fn)
        return non_reentrant(fn, *args, **kwargs)

    class NotingFunction:
        @staticmethod
        def apply(fn, *args):
            note(fn)
            return reentrant.apply(fn, *args)

    tuc._checkpoint_without_reentrant_generator = noting_generator
    tuc.CheckpointFunction = NotingFunction
    try:
        yield found
    finally:
        tuc._checkpoint_without_reentrant_generator = non_reentrant
        tuc.CheckpointFunction = reentrant


def module_paths(gm: fx.GraphModule) -> list[str]:
    """Every module path (and each of its prefixes) owning a call_function node, in order."""
    paths: dict[str, None] = {}
    for node in gm.graph.nodes:
        path = node.meta.get("strato_module", "") if node.op == "call_function" else ""
        parts = path.split(".") if path else []
        for k in range(1, len(parts) + 1):
            paths.setdefault(".".join(parts[:k]))
    return list(paths)


def _outermost(paths: list[str]) -> list[str]:
    return [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]


def layer_paths(gm: fx.GraphModule) -> list[str]:
    """The numbered layers (`blocks.3`, `model.layers.0`), outermost, in first-use order."""
    return _outermost([p for p in module_paths(gm) if p.rpartition(".")[2].isdigit()])


def select_regions(
    gm: fx.GraphModule, modules: tuple[str, ...], field: str
) -> tuple[list[str], dict[str, str]]:
    """Module paths matching `modules` ('<layers>': numbered layers; '<tail>': what follows
    them, outlined last), outermost, in first-use order; and the named regions left out, why."""
    paths = module_paths(gm)
    chosen: list[str] = []
    left_out: dict[str, str] = {}
    for pattern in modules:
        if pattern == TAIL:
            continue
        if pattern == "<layers>":
            hits = [p for p in paths if p.rpartition(".")[2].isdigit()]
        else:
            hits = [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
            if not hits:
                near = _near_matches(pattern, paths)
                raise StrategyError(
                    f"{field}: {pattern!r} matches no module of the model"
                    + (f"; near matches: {', '.join(near)}" if near else "")
                    + f". Module paths look like {', '.join(paths[:4])}."
                )
        chosen += [p for p in hits if p not in chosen]
    chosen = _outermost(chosen)
    if TAIL in modules:
        members, why = tail_nodes(gm)
        if members:
            chosen.append(TAIL)
        else:
            left_out[TAIL] = why or "nothing follows the last numbered layer"
    return chosen, left_out


def _near_matches(pattern: str, paths: list[str]) -> list[str]:
    import difflib

    literal = pattern.replace("*", "0").replace("?", "0")
    close = difflib.get_close_matches(literal, paths, n=3, cutoff=0.5)
    hint = did_you_mean(pattern.split(".")[0], {p.split(".")[0] for p in paths})
    return close or ([hint.strip()] if hint else [])


def _in_region(node: fx.Node, path: str) -> bool:
    """Owned by module `path`; ZeRO-3's gathers/releases of a unit inside it count too, so a
    recomputed region gathers its parameters again instead of holding them until backward."""
    module = node.meta.get("strato_module", "") or node.meta.get("strato_zero", {}).get("unit", "")
    return module == path or module.startswith(path + ".")


def tail_nodes(gm: fx.GraphModule) -> tuple[set[fx.Node], str]:
    """The `<tail>` region: the call_function nodes after the last numbered layer (final norm,
    output projection, loss), or none and why. ZeRO-3 nodes belong to it when their unit is
    gathered inside it; a tail reading parameters gathered before it (an embedding tied to the
    output projection) is left out: its recompute would read them after their release."""
    layers = layer_paths(gm)
    nodes = list(gm.graph.nodes)
    last = max(
        (i for i, n in enumerate(nodes) if any(_in_region(n, p) for p in layers)), default=None
    )
    if last is None:
        return set(), "the model has no numbered layers"
    span = [n for n in nodes[last + 1 :] if n.op == "call_function"]
    inside = {n.meta["strato_zero"]["unit"] for n in span if str(n.target) == _GATHER}
    # Other ZeRO nodes (a release of a unit gathered earlier, bucket waits, forward_end) stay out.
    members = {
        n
        for n in span
        if "strato_zero" not in n.meta or n.meta["strato_zero"].get("unit", None) in inside
    }
    for node in members:
        for arg in node.all_input_nodes:
            zero = arg.meta.get("strato_zero", {})
            if arg.op == "call_function" and "param" in zero and zero.get("unit") not in inside:
                return set(), (
                    f"it reads {zero['param']}, which ZeRO-3 gathers before it (unit "
                    f"{zero['unit'] or '<root>'!r}): its recompute would read it after the release"
                )
    return members, ""


def region_runs(gm: fx.GraphModule, path: str) -> list[list[fx.Node]]:
    """Maximal runs of call_function nodes of region `path` (get_attr nodes don't break one)."""
    tail = tail_nodes(gm)[0] if path == TAIL else set()
    runs: list[list[fx.Node]] = [[]]
    for node in gm.graph.nodes:
        if node.op == "call_function" and (
            node in tail if path == TAIL else _in_region(node, path)
        ):
            runs[-1].append(node)
        elif node.op != "get_attr" and runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def ends_in_loss(run: list[fx.Node], outputs: list[fx.Node]) -> bool:
    """The run's one output is a scalar the graph returns and nothing else reads (the loss),
    and it neither communicates nor mutates: its backward may run during forward."""
    if len(outputs) != 1 or any(u.op != "output" for u in outputs[0].users):
        return False
    val = outputs[0].meta.get("val")
    if not isinstance(val, torch.Tensor) or val.numel() != 1 or not val.dtype.is_floating_point:
        return False
    for node in run:
        schema = getattr(node.target, "_schema", None)
        if "strato_zero" in node.meta or (schema is not None and schema.is_mutable):
            return False
    return True


def outline(gm: fx.GraphModule, run: list[fx.Node], name: str, region: RecomputeRegion) -> fx.Node:
    """Move `run` into submodule `name` (a RecomputeRegion) and call it in its place."""
    members = set(run)
    inputs: list[fx.Node] = []
    for node in run:
        inputs += [a for a in node.all_input_nodes if a not in members and a not in inputs]
    outputs = [n for n in run if any(u not in members for u in n.users)]
    region.grad_in_forward = region.grad_in_forward and ends_in_loss(run, outputs)
    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = body.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for node in run:
        env[node] = body.node_copy(node, lambda a: env[a])
    body.output(tuple(env[o] for o in outputs))
    region.body = fx.GraphModule(torch.nn.Module(), body)
    region.model_tensor_inputs = tuple(i for i, a in enumerate(inputs) if a.op == "get_attr")
    gm.add_submodule(name, region)
    marker = {"region": region.path, "policy": region.policy, "offload": region.offload}
    with gm.graph.inserting_after(run[-1]):
        call = gm.graph.call_module(name, tuple(inputs))
    call.meta.update(
        val=tuple(o.meta.get("val") for o in outputs),
        strato_module=region.path,
        strato_recompute=marker,
    )
    last = call
    for i, o in enumerate(outputs):
        with gm.graph.inserting_after(last):
            item = gm.graph.call_function(operator.getitem, (call, i))
        item.meta.update(val=o.meta.get("val"), strato_module=region.path)
        o.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
        last = item
    for node in reversed(run):
        gm.graph.erase_node(node)
    return call


def outline_regions(
    gm: fx.GraphModule,
    paths: list[str],
    policies: dict[str, str],
    offload: bool,
    grad_in_forward: bool = True,
) -> list[dict]:
    """Outline each region path; returns one entry per outlined run. `grad_in_forward`: a
    run ending in the loss may run its backward in forward (not under fp16, whose gradients
    need the loss scale, known only in backward, to stay clear of underflow)."""
    entries = []
    for path in paths:
        runs = region_runs(gm, path)
        for k, run in enumerate(runs):
            name = (
                "recompute_"
                + path.strip("<>").replace(".", "_")
                + (f"_{k}" if len(runs) > 1 else "")
            )
            region = RecomputeRegion(path, policies[path], offload)
            region.grad_in_forward = grad_in_forward
            outline(gm, run, name, region)
            gathers = [n for n in run if str(n.target) == _GATHER]
            entries.append(
                {
                    "submodule": name,
                    "module": path,
                    "nodes": len(run),
                    # Its backward runs in forward (the loss): nothing recomputed.
                    "grad_in_forward": region.grad_in_forward,
                    # ZeRO-3: these units are gathered in forward and again by the recompute.
                    "zero3_units_gathered_again": [n.meta["strato_zero"]["unit"] for n in gathers],
                }
            )
    gm.graph.lint()
    gm.recompile()
    return entries


def set_policies(gm: fx.GraphModule, policies: dict[str, str]) -> None:
    """Give every outlined region of module `path` the policy `policies[path]`."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and "strato_recompute" in node.meta:
            region = gm.get_submodule(node.target)
            region.policy = policies[region.path]
            node.meta["strato_recompute"] = {
                **node.meta["strato_recompute"],
                "policy": region.policy,
            }


POLICY_ORDER = ("none", "selective", "full")


def plan_budget(gm: fx.GraphModule, ctx: CompileContext, paths: list[str], limit: int):
    """The plan (a policy per region) with the least estimated recompute time whose measured
    kept bytes fit `limit`. Candidates: the uniform plans (every region none, selective or
    full) and the mixes met upgrading regions in order of recompute time per byte saved,
    from all-none and from all-selective; each is ranked by the cost model
    (`Kept.recompute_seconds`: FLOPs of matmuls, bytes of memory-bound ops, a per-op term)."""
    eager = {m.path for m in gm.modules() if isinstance(m, RecomputeRegion) and m.grad_in_forward}
    per_policy = {}
    for policy in POLICY_ORDER:
        set_policies(gm, dict.fromkeys(paths, policy))
        per_policy[policy] = measure_graph(gm, ctx)
    minimum = per_policy["full"].total
    if minimum > limit:
        raise StrategyError(
            f"Strategy.recompute: Budget({limit:,d} B) cannot be met: recomputing every region "
            f"({', '.join(paths[:3])}{'...' if len(paths) > 3 else ''}) fully still keeps "
            f"{minimum:,d} B for backward. Give a budget of at least {minimum:,d} B, or add "
            "regions to Budget.modules."
        )
    kept = {r: {p: per_policy[p].by_region.get(r, 0) for p in POLICY_ORDER} for r in paths}
    cost = {
        r: {p: 0.0 if r in eager else per_policy["none"].recompute_seconds(r, p) for p in kept[r]}
        for r in paths
    }
    outside = max(m.total - sum(m.by_region.get(r, 0) for r in paths) for m in per_policy.values())

    def predicted(plan: dict[str, str]) -> tuple[float, int]:
        return sum(cost[r][plan[r]] for r in paths), outside + sum(kept[r][plan[r]] for r in paths)

    candidates = {f"all {p}": dict.fromkeys(paths, p) for p in POLICY_ORDER}
    seen = {tuple(plan.values()) for plan in candidates.values()}
    for start in ("none", "selective"):
        plan = dict.fromkeys(paths, start)
        upgrades = []  # (seconds per byte saved, region, from, to), cheapest first
        for r in paths:
            for low, high in (("none", "selective"), ("selective", "full"), ("none", "full")):
                saved = kept[r][low] - kept[r][high]
                if saved > 0 and POLICY_ORDER.index(low) >= POLICY_ORDER.index(start):
                    upgrades.append(((cost[r][high] - cost[r][low]) / saved, r, low, high))
        for _, r, low, high in sorted(upgrades):
            if plan[r] == low:
                plan = {**plan, r: high}
                if tuple(plan.values()) not in seen:
                    seen.add(tuple(plan.values()))
                    candidates[_plan_name(plan, paths)] = plan
    ranked = sorted(candidates.items(), key=lambda kv: predicted(kv[1]))
    tried, chosen = [], candidates["all full"]
    for name, plan in ranked:  # 'all full' fits (checked above): the loop ends there at last
        seconds, estimate = predicted(plan)
        if estimate > limit and name != "all full":
            continue
        set_policies(gm, plan)
        measured = measure_graph(gm, ctx).total
        tried.append(f"{name} ({measured:,d} B, ~{seconds * 1e3:.1f} ms)")
        if measured <= limit:
            chosen = plan
            break
    uniform = ", ".join(
        f"{p} keeps {per_policy[p].total:,d} B and recomputes in "
        f"~{predicted(candidates['all ' + p])[0] * 1e3:.1f} ms"
        for p in POLICY_ORDER
    )
    reason = (
        f"{uniform}; of {len(candidates)} candidate plans (the uniform ones and mixes), the "
        f"cheapest estimated recompute whose bytes fit {limit:,d} B is {tried[-1]}"
        + (f" (also measured, over the budget: {', '.join(tried[:-1])})" if len(tried) > 1 else "")
    )
    ranking = [
        {"plan": name, "seconds": predicted(plan)[0], "bytes": predicted(plan)[1]}
        for name, plan in ranked
    ]
    return chosen, reason, {p: m.total for p, m in per_policy.items()}, ranking


def _plan_name(plan: dict[str, str], paths: list[str]) -> str:
    """'selective: blocks.0, blocks.1; full: <tail>' (regions under none left out)."""
    parts = []
    for policy in POLICY_ORDER[1:]:
        named = [r for r in paths if plan[r] == policy]
        if named:
            parts.append(f"{policy}: {', '.join(named)}")
    return "; ".join(parts) or "all none"


@graph_pass(
    name="recompute",
    after=("shapes", "mixed_precision", "fuse", "zero1", "zero2", "zero3", "data_parallel"),
)
def recompute_activations(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Outline the strategy's recompute regions; the runtime recomputes them in backward."""
    config = ctx.strategy.recompute
    own = [p for p in gm.meta.get(CHECKPOINT_REGIONS, []) if region_runs(gm, p)]
    if not ctx.training or (config is None and not own):
        return gm
    if isinstance(config, Recompute) and config.policy == "none" and not config.offload:
        reason = "Strategy.recompute='none'" + (
            f" turns off the model's own checkpoint regions ({', '.join(own)})" if own else ""
        )
        ctx.record("recompute", regions=[], plan="none", reason=reason, model_regions=own)
        return gm
    field = "Strategy.recompute.modules"
    if config is None:  # the model checkpoints these itself: keep them, recompute fully
        config = Recompute(modules=tuple(own), policy="full")
    paths, left_out = select_regions(gm, config.modules, field)
    if not paths:
        raise StrategyError(
            f"{field}: the model has no numbered layers ('<layers>'); name the modules to "
            f"recompute by glob, e.g. one of {', '.join(module_paths(gm)[:6])}."
        )
    offload = isinstance(config, Recompute) and config.offload
    policy = config.policy if isinstance(config, Recompute) else "none"
    fp16 = ctx.strategy.precision == "fp16"
    entries = outline_regions(gm, paths, dict.fromkeys(paths, policy), offload, not fp16)
    if isinstance(config, Budget):
        plan, reason, totals, candidates = plan_budget(gm, ctx, paths, config.limit)
        set_policies(gm, plan)
    else:
        plan = dict.fromkeys(paths, policy)
        reason, totals, candidates = f"Strategy.recompute policy {policy!r} on every region", {}, []
        if ctx.strategy.recompute is None:
            reason = "the model's own torch.utils.checkpoint regions, recomputed fully"
    measured = measure_graph(gm, ctx)
    unplanned = measure_graph_with(gm, ctx, "none")
    for entry in entries:
        path = entry["module"]
        entry.update(
            policy=plan[path],
            kept_bytes=measured.by_region.get(path, 0),
            kept_bytes_without=unplanned.by_region.get(path, 0),
            recompute_flops=0 if entry["grad_in_forward"] else unplanned.flops(path, plan[path]),
            recompute_seconds=0.0
            if entry["grad_in_forward"]
            else unplanned.recompute_seconds(path, plan[path]),
            how=gm.get_submodule(entry["submodule"]).replay_note(),
        )
    ctx.record(
        "recompute",
        regions=entries,
        plan=plan,
        reason=reason,
        kept_bytes=measured.total,
        kept_bytes_by_policy=totals,
        # Budget: every candidate plan, cheapest estimated recompute first (bytes predicted).
        candidates=candidates,
        budget=config.limit if isinstance(config, Budget) else None,
        model_regions=own,
        left_out=left_out,
    )
    return gm


def measure_graph_with(gm: fx.GraphModule, ctx: CompileContext, policy: str):
    """The fake-tensor measurement with every region under `policy`, policies restored after."""
    regions = [m for m in gm.modules() if isinstance(m, RecomputeRegion)]
    before = [r.policy for r in regions]
    for r in regions:
        r.policy = policy
    try:
        return measure_graph(gm, ctx)
    finally:
        for r, p in zip(regions, before):
            r.policy = p
