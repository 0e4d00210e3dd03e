"""Pipeline schedules as data: one list of actions per pipeline rank.

An action is a forward `F`, a backward `B` (the whole backward; under zero-bubble only the
input-gradient part), a weight-gradient backward `W` (zero-bubble), or a point-to-point
transfer of a micro-batch's boundary tensors between two stages: `SEND_F`/`RECV_F`
(activations) and `SEND_B`/`RECV_B` (their gradients). Stage s runs on rank s % P, so with
virtual stages (interleaved 1F1B) rank r runs stages r, r + P, ...; transfers between
stages on the same rank are local hand-offs and get no action.

Generators (`build_schedule`) order the compute actions for gpipe, 1f1b, interleaved
1F1B (Megatron's order) and zero-bubble ZB-H1 (1F1B with W deferred into the bubble), then
insert the transfers each compute action needs, from the stage graph's producers (a
residual crossing two cuts is one more RECV_F/SEND_B pair). `validate` checks that every
send has its receive and simulates the lists with blocking receives and unit costs (F=1, B=2, or
B=W=1 split): a schedule that would deadlock raises `ScheduleError` naming the stuck
actions. The simulation is the plan that `str()` prints (a rank x time grid) and `plot`
draws; the executor (runtime/pipeline/executor.py) runs the same lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs

from ...compiler.errors import StratoError

COMPUTE = ("F", "B", "W")
TRANSFERS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
COLORS = {"F": "#4c72b0", "B": "#55a868", "W": "#c44e52", "RECV": "#bbbbbb", "SEND": "#dd8452"}
"""Plot colours; RECV/SEND are a measured timeline's receive waits and send postings."""


class ScheduleError(StratoError):
    """A pipeline schedule is inconsistent: a send without its receive, a missing or
    misplaced action, or an order that deadlocks."""


@attrs.frozen
class Action:
    """One step of a rank's schedule."""

    kind: str
    """F, B, W, SEND_F, RECV_F, SEND_B or RECV_B."""
    stage: int
    """The stage this rank runs the action for."""
    microbatch: int
    """Which micro-batch."""
    peer: int | None = None
    """Transfers: the other stage (receiver of a send, sender of a receive)."""

    def __str__(self) -> str:
        if self.kind in COMPUTE:
            return f"{self.kind}{self.microbatch}"
        return f"{self.kind}{self.microbatch}[s{self.stage}{'>' if 'SEND' in self.kind else '<'}s{self.peer}]"


@attrs.frozen
class Slot:
    """A compute action placed in time by the simulation (unit costs)."""

    action: Action
    start: float
    end: float


def chain(stage_count: int) -> dict[int, tuple[int, ...]]:
    """Producers of each stage when every stage only feeds the next."""
    return {s: (s - 1,) if s else () for s in range(stage_count)}


@attrs.frozen(eq=False)
class PipelineSchedule:
    """Per-rank action lists, validated on construction, with their simulated plan."""

    name: str
    """The generator: gpipe, 1f1b, interleaved or zero_bubble."""
    ranks: int
    """Pipeline ranks P."""
    microbatches: int
    """Micro-batches M per step."""
    virtual_stages: int
    """Stages per rank v (P x v stages)."""
    actions: tuple[tuple[Action, ...], ...]
    """actions[r]: what pipeline rank r does, in order."""
    producers: dict[int, tuple[int, ...]]
    """Stage -> the stages whose forward outputs it receives."""
    split_backward: bool = False
    """Whether backward is split into B (input gradients) and W (weight gradients)."""
    plan: tuple[tuple[Slot, ...], ...] = attrs.field(init=False, default=())
    """The simulated compute slots per rank (set by validation)."""

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "plan", validate(self))

    @property
    def stage_count(self) -> int:
        return self.ranks * self.virtual_stages

    def rank_of(self, stage: int) -> int:
        return stage % self.ranks

    def consumers(self, stage: int) -> tuple[int, ...]:
        return tuple(s for s, ps in sorted(self.producers.items()) if stage in ps)

    @property
    def makespan(self) -> float:
        return max((slots[-1].end for slots in self.plan if slots), default=0.0)

    def bubble(self) -> float:
        """Planned idle fraction (unit costs): 1 - busy / (ranks x makespan)."""
        busy = sum(s.end - s.start for slots in self.plan for s in slots)
        return 1.0 - busy / (self.ranks * self.makespan) if self.makespan else 0.0

    def __str__(self) -> str:
        return render_grid(
            f"{self.name} schedule: {self.ranks} ranks x {self.stage_count} stages, "
            f"{self.microbatches} micro-batches; planned bubble {self.bubble():.1%} "
            "(unit costs: F=1, " + ("B=1, W=1" if self.split_backward else "B=2") + ")",
            self.plan,
            self.virtual_stages > 1,
            self.ranks,
        )

    def describe(self) -> str:
        """Every rank's full action list, transfers included."""
        return "\n".join(
            f"rank {r}: " + " ".join(str(a) for a in actions)
            for r, actions in enumerate(self.actions)
        )

    def plot(self, path: str | Path) -> Path:
        """Draw the planned grid (ranks x time) to a PNG."""
        return plot_slots(self.plan, path, f"{self.name}: planned (bubble {self.bubble():.1%})")


# ---------------------------------------------------------------------- generators


def build_schedule(
    name: str,
    ranks: int,
    microbatches: int,
    virtual_stages: int = 1,
    producers: dict[int, tuple[int, ...]] | None = None,
) -> PipelineSchedule:
    """The named schedule's action lists, transfers inserted from `producers` (default:
    a chain), validated."""
    stage_count = ranks * virtual_stages
    producers = dict(producers) if producers is not None else chain(stage_count)
    generators = {"gpipe": _gpipe, "1f1b": _one_f_one_b, "interleaved": _interleaved}
    if name == "zero_bubble":
        orders = _zero_bubble(ranks, microbatches, producers)
    elif name in generators:
        if name == "interleaved" and microbatches % ranks:
            raise ScheduleError(
                f"interleaved schedule: microbatches={microbatches} must be a multiple of the "
                f"{ranks} ranks."
            )
        orders = [generators[name](r, ranks, microbatches, virtual_stages) for r in range(ranks)]
    else:
        raise ScheduleError(f"unknown pipeline schedule {name!r}")
    actions = tuple(tuple(_with_transfers(order, producers, ranks)) for order in orders)
    return PipelineSchedule(
        name=name,
        ranks=ranks,
        microbatches=microbatches,
        virtual_stages=virtual_stages,
        actions=actions,
        producers=producers,
        split_backward=name == "zero_bubble",
    )


def _gpipe(rank: int, ranks: int, m: int, v: int) -> list[Action]:
    return [Action("F", rank, i) for i in range(m)] + [Action("B", rank, i) for i in range(m)]


def _one_f_one_b(rank: int, ranks: int, m: int, v: int) -> list[Action]:
    warmup = min(ranks - rank - 1, m)
    order = [Action("F", rank, i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [Action("F", rank, warmup + i), Action("B", rank, i)]
    order += [Action("B", rank, i) for i in range(m - warmup, m)]
    return order


def _interleaved(rank: int, ranks: int, m: int, v: int) -> list[Action]:
    """Megatron-LM's interleaved 1F1B: virtual micro-batch k runs chunk (k // P) % v
    (backward: the reverse chunk order) of micro-batch (k // (P v)) P + k % P."""
    total = m * v

    def virtual(kind: str, k: int) -> Action:
        chunk = (k // ranks) % v
        if kind == "B":
            chunk = v - 1 - chunk
        return Action(kind, chunk * ranks + rank, (k // (ranks * v)) * ranks + k % ranks)

    warmup = min((ranks - rank - 1) * 2 + (v - 1) * ranks, total)
    order = [virtual("F", k) for k in range(warmup)]
    for i in range(total - warmup):
        order += [virtual("F", warmup + i), virtual("B", i)]
    order += [virtual("B", k) for k in range(total - warmup, total)]
    return order


def _zero_bubble(ranks: int, m: int, producers: dict[int, tuple[int, ...]]) -> list[list[Action]]:
    """ZB-H1 by list scheduling at unit costs: each rank runs a ready B first, else the next
    F while it holds fewer than P micro-batches (a micro-batch's activations are held
    until its W; 1F1B's peak, on its first rank, is P too), else a deferred W."""
    consumers = {s: [c for c, ps in producers.items() if s in ps] for s in producers}
    done: dict[tuple[str, int, int], int] = {}  # (kind, stage, mb) -> finish time
    orders: list[list[Action]] = [[] for _ in range(ranks)]
    next_f = [0] * ranks
    next_b = [0] * ranks
    pending_w: list[list[int]] = [[] for _ in range(ranks)]
    free_at = [0] * ranks
    time = 0
    while any(len(o) < 3 * m for o in orders):
        for r in range(ranks):
            if free_at[r] > time:
                continue
            action = None
            b = next_b[r]
            if b < next_f[r] and all(done.get(("B", c, b), time + 1) <= time for c in consumers[r]):
                action = Action("B", r, b)
                next_b[r] += 1
                pending_w[r].append(b)
            elif (
                next_f[r] < m
                and next_f[r] - (next_b[r] - len(pending_w[r])) < ranks
                and all(done.get(("F", p, next_f[r]), time + 1) <= time for p in producers[r])
            ):
                action = Action("F", r, next_f[r])
                next_f[r] += 1
            elif pending_w[r]:
                action = Action("W", r, pending_w[r].pop(0))
            if action is not None:
                orders[r].append(action)
                done[(action.kind, r, action.microbatch)] = time + 1
                free_at[r] = time + 1
        time += 1
        if time > 10 * m * ranks + 10:
            raise ScheduleError(
                "zero_bubble: list scheduling did not finish (a stage graph cycle?)"
            )
    return orders


def _with_transfers(
    order: Sequence[Action], producers: dict[int, tuple[int, ...]], ranks: int
) -> list[Action]:
    """Insert each compute action's receives before it and sends after it (only between
    stages on different ranks)."""
    consumers = {s: [c for c, ps in sorted(producers.items()) if s in ps] for s in producers}
    out: list[Action] = []
    for a in order:
        s, m = a.stage, a.microbatch
        if a.kind == "F":
            out += [Action("RECV_F", s, m, p) for p in producers[s] if p % ranks != s % ranks]
            out.append(a)
            out += [Action("SEND_F", s, m, c) for c in consumers[s] if c % ranks != s % ranks]
        elif a.kind == "B":
            out += [Action("RECV_B", s, m, c) for c in consumers[s] if c % ranks != s % ranks]
            out.append(a)
            out += [Action("SEND_B", s, m, p) for p in producers[s] if p % ranks != s % ranks]
        else:
            out.append(a)
    return out


# ---------------------------------------------------------------------- validation

_COST = {"F": 1.0, "B": 2.0, "W": 1.0}


def validate(schedule: PipelineSchedule) -> tuple[tuple[Slot, ...], ...]:
    """Check the action lists and simulate them; returns the compute slots per rank."""
    p, m, split = schedule.ranks, schedule.microbatches, schedule.split_backward
    if len(schedule.actions) != p:
        raise ScheduleError(f"{schedule.name}: {len(schedule.actions)} action lists for {p} ranks")
    kinds = ("F", "B", "W") if split else ("F", "B")
    for r, actions in enumerate(schedule.actions):
        compute = [(a.kind, a.stage, a.microbatch) for a in actions if a.kind in COMPUTE]
        expected = {
            (k, s, i) for k in kinds for s in range(r, schedule.stage_count, p) for i in range(m)
        }
        if len(compute) != len(set(compute)) or set(compute) != expected:
            missing = sorted(expected - set(compute))
            extra = sorted(set(compute) - expected)
            raise ScheduleError(
                f"{schedule.name}: rank {r} must run each of {'/'.join(kinds)} once per stage "
                f"and micro-batch; missing {missing[:4]}, unexpected or repeated {extra[:4]}"
            )
        for a in actions:
            if a.stage % p != r:
                raise ScheduleError(f"{schedule.name}: rank {r} has {a} of stage {a.stage}")
    sends: dict[tuple, Action] = {}
    recvs: dict[tuple, Action] = {}
    for actions in schedule.actions:
        for a in actions:
            if a.kind in ("SEND_F", "SEND_B"):
                sends[(a.kind[-1], a.stage, a.peer, a.microbatch)] = a
            elif a.kind in ("RECV_F", "RECV_B"):
                recvs[(a.kind[-1], a.peer, a.stage, a.microbatch)] = a
    for key in sends.keys() ^ recvs.keys():
        lone = sends.get(key) or recvs.get(key)
        raise ScheduleError(
            f"{schedule.name}: {lone} on rank {lone.stage % p} has no matching "
            f"{'receive' if key in sends else 'send'}"
        )
    return _simulate(schedule)


def in_send_order(schedule: PipelineSchedule) -> bool:
    """Whether, between every two ranks, receives come in the order of the sends: NCCL
    matches point-to-point messages in issue order, gloo by tag (a residual sent ahead
    to a later virtual stage arrives out of order, which only gloo takes)."""
    p = schedule.ranks
    sent: dict[tuple[int, int], list] = {}
    received: dict[tuple[int, int], list] = {}
    for r, actions in enumerate(schedule.actions):
        for a in actions:
            if a.kind.startswith("SEND"):
                sent.setdefault((r, a.peer % p), []).append(
                    (a.kind[-1], a.stage, a.peer, a.microbatch)
                )
            elif a.kind.startswith("RECV"):
                received.setdefault((a.peer % p, r), []).append(
                    (a.kind[-1], a.peer, a.stage, a.microbatch)
                )
    return all(received.get(pair) == order for pair, order in sent.items())


def _simulate(schedule: PipelineSchedule) -> tuple[tuple[Slot, ...], ...]:
    """Run the lists with blocking receives, asynchronous sends and unit costs; local
    order must respect each action's dependencies on the same rank."""
    p, split = schedule.ranks, schedule.split_backward
    consumers = {s: schedule.consumers(s) for s in range(schedule.stage_count)}
    cost = dict(_COST, B=1.0 if split else 2.0)
    position = [0] * p
    clock = [0.0] * p
    sent: dict[tuple, float] = {}
    finished: dict[tuple[str, int, int], float] = {}
    slots: list[list[Slot]] = [[] for _ in range(p)]
    while True:
        progressed = False
        for r in range(p):
            actions = schedule.actions[r]
            while position[r] < len(actions):
                a = actions[position[r]]
                if a.kind.startswith("RECV"):
                    key = (a.kind[-1], a.peer, a.stage, a.microbatch)
                    if key not in sent:
                        break
                    clock[r] = max(clock[r], sent[key])
                elif a.kind.startswith("SEND"):
                    sent[(a.kind[-1], a.stage, a.peer, a.microbatch)] = clock[r]
                else:
                    needs = _local_needs(a, schedule.producers, consumers, split)
                    waiting = [n for n in needs if n not in finished and n[1] % p == r]
                    if waiting:
                        raise ScheduleError(
                            f"{schedule.name}: rank {r} runs {a} of stage {a.stage} before "
                            f"{waiting[0][0]}{waiting[0][2]} of stage {waiting[0][1]}, on the "
                            "same rank, that it depends on"
                        )
                    start = max([clock[r]] + [finished[n] for n in needs if n in finished])
                    clock[r] = start + cost[a.kind]
                    finished[(a.kind, a.stage, a.microbatch)] = clock[r]
                    slots[r].append(Slot(a, start, clock[r]))
                position[r] += 1
                progressed = True
        if all(position[r] == len(schedule.actions[r]) for r in range(p)):
            return tuple(tuple(s) for s in slots)
        if not progressed:
            stuck = ", ".join(
                f"rank {r} at {schedule.actions[r][position[r]]}"
                for r in range(p)
                if position[r] < len(schedule.actions[r])
            )
            raise ScheduleError(f"{schedule.name}: deadlock, every rank waits: {stuck}")


def _local_needs(
    a: Action,
    producers: dict[int, tuple[int, ...]],
    consumers: dict[int, tuple[int, ...]],
    split: bool,
) -> list[tuple[str, int, int]]:
    m = a.microbatch
    if a.kind == "F":
        return [("F", q, m) for q in producers[a.stage]]
    if a.kind == "B":
        return [("F", a.stage, m)] + [("B", c, m) for c in consumers[a.stage]]
    return [("B", a.stage, m)]


# ---------------------------------------------------------------------- showing


def render_grid(title: str, slots: Sequence[Sequence[Slot]], show_stage: bool, ranks: int) -> str:
    """Ranks as rows, time steps as columns; each cell the action running then ('.' idle)."""

    def label(a: Action) -> str:
        return f"{a.kind}{a.microbatch}" + (f".{a.stage // ranks}" if show_stage else "")

    end = max((s[-1].end for s in slots if s), default=0.0)
    unit = min((x.end - x.start for s in slots for x in s), default=1.0) or 1.0
    steps = int(round(end / unit))
    width = max([len(label(x.action)) for s in slots for x in s] + [2]) + 1
    lines = [title, "       " + "".join(str(t).ljust(width) for t in range(steps))]
    for r, rank_slots in enumerate(slots):
        cells = ["." for _ in range(steps)]
        for x in rank_slots:
            for t in range(int(round(x.start / unit)), int(round(x.end / unit))):
                cells[t] = label(x.action)
        lines.append(f"rank {r}: " + "".join(c.ljust(width) for c in cells))
    return "\n".join(lines)


def plot_slots(
    slots: Sequence[Sequence[Slot]], path: str | Path, title: str, unit: str = "time"
) -> Path:
    """A Gantt chart of the slots (one row per rank) written to `path` (PNG); `unit`
    labels the time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 0.6 * len(slots) + 1.2))
    for r, rank_slots in enumerate(slots):
        for x in rank_slots:
            ax.broken_barh(
                [(x.start, x.end - x.start)],
                (r - 0.4, 0.8),
                facecolors=COLORS[x.action.kind],
                edgecolor="white",
                linewidth=0.5,
            )
            if len(slots[0]) <= 64 and x.action.kind in COMPUTE:
                ax.text(
                    (x.start + x.end) / 2,
                    r,
                    f"{x.action.kind}{x.action.microbatch}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
    ax.set_yticks(range(len(slots)), [f"rank {r}" for r in range(len(slots))])
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title)
    shown = [k for k in COLORS if any(x.action.kind == k for s in slots for x in s)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in shown]
    ax.legend(handles, shown, loc="upper right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
