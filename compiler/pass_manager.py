"""Graph passes, their contracts, and the manager that orders, checks and runs them.

A pass is a function `(gm, ctx) -> gm` declared with `@graph_pass`. Its contract names
capabilities (free-form strings such as "shapes" or "zero3") that it requires from an
earlier pass, provides to later ones, or conflicts with (a capability or a pass name),
and capabilities or pass names it must run `before` or `after` when they are present
(a pipeline cut before ZeRO, say). The manager checks the whole set before anything
runs, then runs each pass, lints and recompiles its graph and keeps a `PassRecord`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence

import attrs
import torch.fx as fx

from .context import CompileContext
from .errors import PassContractError, PassError, StrategyError, did_you_mean

PassFn = Callable[[fx.GraphModule, CompileContext], fx.GraphModule]


@attrs.frozen
class GraphPass:
    """A named graph transformation with a contract."""

    name: str
    fn: PassFn = attrs.field(eq=False, repr=False)
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    """Capabilities or pass names this pass must run before, when an active pass has them."""
    after: tuple[str, ...] = ()
    """Capabilities or pass names this pass must run after, when an active pass has them
    (unlike `requires`, nothing is missing when none does)."""
    description: str = ""

    def __call__(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        return self.fn(gm, ctx)

    def import_path(self) -> str:
        """'module:qualname' of the function, so YAML strategies can name this pass."""
        return f"{self.fn.__module__}:{self.fn.__qualname__}"


def _names(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def graph_pass(
    name: str | None = None,
    *,
    requires: str | Iterable[str] | None = None,
    provides: str | Iterable[str] | None = None,
    conflicts: str | Iterable[str] | None = None,
    before: str | Iterable[str] | None = None,
    after: str | Iterable[str] | None = None,
) -> Callable[[PassFn], PassFn]:
    """Declare `fn(gm, ctx) -> gm` a graph pass; the function stays callable as before."""

    def wrap(fn: PassFn) -> PassFn:
        gp = GraphPass(
            name=name or fn.__name__,
            fn=fn,
            requires=_names(requires),
            provides=_names(provides),
            conflicts=_names(conflicts),
            before=_names(before),
            after=_names(after),
            description=(fn.__doc__ or "").strip().split("\n")[0],
        )
        fn.graph_pass = gp  # type: ignore[attr-defined]
        return fn

    return wrap


def as_graph_pass(obj) -> GraphPass:
    """The GraphPass behind a decorated function (or the GraphPass itself)."""
    if isinstance(obj, GraphPass):
        return obj
    gp = getattr(obj, "graph_pass", None)
    if isinstance(gp, GraphPass):
        return gp
    raise TypeError(
        f"{obj!r} is not a graph pass: decorate it with @strato.graph_pass(name=...) "
        "so it declares its name and contract."
    )


# ------------------------------------------------------------------ planning


def plan_passes(passes: Sequence[GraphPass], disable: Sequence[str] = ()) -> list[GraphPass]:
    """Drop disabled passes, order the rest by their contracts, and check them.

    The order keeps the given order except where a pass must move after the passes that
    provide what it requires, or that its `before`/`after` name. Raises PassContractError
    naming the pass at fault (both passes, for an ordering cycle).
    """
    names = [p.name for p in passes]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise PassContractError(
            f"two passes share the name {sorted(duplicates)[0]!r}; give each pass a unique name."
        )
    for name in disable:
        if name not in names:
            raise StrategyError(
                f"Strategy.disable: {name!r} is not a pass of this compilation."
                f"{did_you_mean(name, names)} Passes: {', '.join(names)}."
            )
    active = [p for p in passes if p.name not in set(disable)]
    _check_conflicts(active)
    return _order_by_contracts(active, disabled=[p for p in passes if p.name in set(disable)])


def _check_conflicts(active: Sequence[GraphPass]) -> None:
    for p in active:
        for other in active:
            if other is p:
                continue
            hit = set(p.conflicts) & ({other.name} | set(other.provides))
            if hit:
                raise PassContractError(
                    f"pass {p.name!r} conflicts with {sorted(hit)[0]!r}, which pass {other.name!r} "
                    f"brings; disable one of them (Strategy(disable=[{other.name!r}])) or change the strategy."
                )


def _order_by_contracts(
    active: Sequence[GraphPass], disabled: Sequence[GraphPass]
) -> list[GraphPass]:
    providers: dict[str, list[str]] = {}
    for p in active:
        for cap in (p.name, *p.provides):
            providers.setdefault(cap, []).append(p.name)
    for p in active:
        for req in p.requires:
            if req not in providers:
                hint = [d.name for d in disabled if req in d.provides or req == d.name]
                why = f" (it is provided by disabled pass {hint[0]!r})" if hint else ""
                raise PassContractError(
                    f"pass {p.name!r} requires {req!r}, which no pass provides{why}; "
                    f"add a pass that provides {req!r} or remove {p.name!r}."
                )
    runs_after = _ordering_edges(active, providers)
    ordered: list[GraphPass] = []
    placed: set[str] = set()
    pending = list(active)
    while pending:
        for i, p in enumerate(pending):
            if set(runs_after[p.name]) <= placed:
                ordered.append(pending.pop(i))
                placed.add(p.name)
                break
        else:
            raise PassContractError(_cycle_message(pending, runs_after, placed))
    return ordered


def _ordering_edges(
    active: Sequence[GraphPass], providers: dict[str, list[str]]
) -> dict[str, dict[str, str]]:
    """For each pass, the passes that must run before it, each with the contract saying so."""
    runs_after: dict[str, dict[str, str]] = {p.name: {} for p in active}
    for p in active:
        for req in p.requires:
            for other in providers[req]:
                if other != p.name:
                    runs_after[p.name].setdefault(other, f"{p.name!r} requires {req!r}")
        for cap in p.after:
            for other in providers.get(cap, ()):
                if other != p.name:
                    runs_after[p.name].setdefault(other, f"{p.name!r} runs after={cap!r}")
        for cap in p.before:
            for other in providers.get(cap, ()):
                if other != p.name:
                    runs_after[other].setdefault(p.name, f"{p.name!r} runs before={cap!r}")
    return runs_after


def _cycle_message(
    pending: Sequence[GraphPass], runs_after: dict[str, dict[str, str]], placed: set[str]
) -> str:
    """Name the passes of one ordering cycle among `pending`, and the contract of each edge."""
    chain = [pending[0].name]
    while True:
        nxt = next(n for n in runs_after[chain[-1]] if n not in placed)
        if nxt in chain:
            chain = chain[chain.index(nxt) :] + [nxt]
            break
        chain.append(nxt)
    steps = [
        f"{later!r} must run after {earlier!r} ({runs_after[later][earlier]})"
        for later, earlier in zip(chain, chain[1:])
    ]
    names = ", ".join(repr(n) for n in chain[:-1])
    return (
        f"passes {names} cannot be ordered: " + "; ".join(steps) + ". Change one of these "
        "contracts, or disable one of the passes (Strategy(disable=[...]))."
    )


# ------------------------------------------------------------------ running


@attrs.frozen
class PassRecord:
    """What one pass did: its name, time taken, node counts and the graph it returned."""

    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    graph_before: str = attrs.field(repr=False)
    graph_after: str = attrs.field(repr=False)
    module: fx.GraphModule | None = attrs.field(default=None, repr=False, eq=False)
    """The GraphModule right after the pass, when the manager was asked to keep snapshots."""


def run_passes(
    gm: fx.GraphModule,
    ctx: CompileContext,
    passes: Sequence[GraphPass],
    *,
    keep_snapshots: bool = False,
) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run already-planned passes in order; lint and recompile after each."""
    history: list[PassRecord] = []
    before_text = graph_text(gm)
    for p in passes:
        nodes_before = len(gm.graph.nodes)
        start = time.perf_counter()
        try:
            out = p(gm, ctx)
        except Exception as exc:
            raise PassError(f"pass {p.name!r} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(out, fx.GraphModule):
            raise PassError(
                f"pass {p.name!r} returned {type(out).__name__}, not a torch.fx.GraphModule; "
                "a pass must return the (possibly new) GraphModule."
            )
        try:
            out.graph.lint()
            out.recompile()
        except Exception as exc:
            raise PassError(f"pass {p.name!r} returned a broken graph: {exc}") from exc
        seconds = time.perf_counter() - start
        gm = out
        stamp_provenance(gm, p.name)
        after_text = graph_text(gm)
        history.append(
            PassRecord(
                name=p.name,
                seconds=seconds,
                nodes_before=nodes_before,
                nodes_after=len(gm.graph.nodes),
                graph_before=before_text,
                graph_after=after_text,
                module=copy.deepcopy(gm) if keep_snapshots else None,
            )
        )
        before_text = after_text
    return gm, history


def stamp_provenance(gm: fx.GraphModule, pass_name: str) -> None:
    """Mark nodes the pass created with its name, so each node tells where it came from."""
    for node in gm.graph.nodes:
        node.meta.setdefault("strato_created_by", pass_name)


def graph_text(gm: fx.GraphModule) -> str:
    """A stable, readable text of the graph (the input to `diff`)."""
    return str(gm.graph)
