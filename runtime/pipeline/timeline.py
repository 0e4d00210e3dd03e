"""What a pipelined step measured: each action's start and end on each rank.

The executor records one `Event` per F/B/W it runs, and one per transfer where the rank
spent time on it: `RECV` is the time spent waiting for a message to arrive (receives
are posted ahead, so the wait is only what the data was late), `SEND` the time posting a
send. Wall clock (`time.time()`), so ranks on one machine share the clock.
`Timeline.bubble()` is the idle fraction per rank: 1 - (time in compute actions) / (the
step's span from the first start to the last end over all ranks), the quantity pipeline
papers call the bubble; `breakdown()` splits each rank's span into compute, waiting in
receives, posting sends and the rest (the executor's own Python between actions). `plot`
draws it like the planned schedule (runtime/pipeline/schedules.py), waits included.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from .schedules import Action, Slot, plot_slots, render_grid

KINDS = ("F", "B", "W", "RECV", "SEND")
"""Event kinds, in the order `to_rows` numbers them."""
COMPUTE_KINDS = ("F", "B", "W")


@attrs.frozen
class Event:
    """One action as it ran (a transfer: the time this rank was held up by it)."""

    rank: int
    kind: str
    stage: int
    microbatch: int
    start: float
    end: float


@attrs.define
class Timeline:
    """The events of one step, on one rank or (after `gathered`) on every pipeline rank."""

    ranks: int
    events: list[Event] = attrs.field(factory=list)

    def add(self, rank: int, kind: str, stage: int, microbatch: int, start: float, end: float):
        self.events.append(Event(rank, kind, stage, microbatch, start, end))

    def compute_events(self) -> list[Event]:
        return [e for e in self.events if e.kind in COMPUTE_KINDS]

    @property
    def span(self) -> float:
        events = self.compute_events()
        if not events:
            return 0.0
        return max(e.end for e in events) - min(e.start for e in events)

    def busy(self, rank: int, kinds: tuple[str, ...] = COMPUTE_KINDS) -> float:
        return sum(e.end - e.start for e in self.events if e.rank == rank and e.kind in kinds)

    def bubble(self) -> dict[int, float]:
        """Idle fraction of each rank over the step's span."""
        span = self.span
        return {r: 1.0 - self.busy(r) / span if span else 0.0 for r in range(self.ranks)}

    def mean_bubble(self) -> float:
        values = list(self.bubble().values())
        return sum(values) / len(values) if values else 0.0

    def breakdown(self) -> dict[int, dict[str, float]]:
        """Seconds of each rank's span spent in compute (and per kind), waiting in
        receives, posting sends, and `other` (neither: bookkeeping between actions)."""
        span = self.span
        out = {}
        for r in range(self.ranks):
            parts = {k: self.busy(r, (k,)) for k in KINDS}
            compute = sum(parts[k] for k in COMPUTE_KINDS)
            out[r] = {
                "span": span,
                "compute": compute,
                **{k: parts[k] for k in COMPUTE_KINDS},
                "recv_wait": parts["RECV"],
                "send": parts["SEND"],
                "other": span - compute - parts["RECV"] - parts["SEND"],
            }
        return out

    def compute_per_microbatch(self) -> dict[int, float]:
        """Each rank's mean compute seconds per micro-batch (F + B + W over its stages)."""
        counts: dict[int, set] = {}
        for e in self.compute_events():
            counts.setdefault(e.rank, set()).add((e.stage, e.microbatch))
        microbatches = {r: len({m for _, m in keys}) for r, keys in counts.items()}
        return {r: self.busy(r) / microbatches[r] for r in sorted(microbatches)}

    def slots(self, waits: bool = False) -> tuple[tuple[Slot, ...], ...]:
        """Per rank, its compute actions (and with `waits` its receive waits and send
        postings) placed in seconds from the step's first compute start."""
        kinds = KINDS if waits else COMPUTE_KINDS
        t0 = min((e.start for e in self.compute_events()), default=0.0)
        return tuple(
            tuple(
                Slot(Action(e.kind, e.stage, e.microbatch), e.start - t0, e.end - t0)
                for e in sorted(self.events, key=lambda e: e.start)
                if e.rank == r and e.kind in kinds
            )
            for r in range(self.ranks)
        )

    def __str__(self) -> str:
        bubbles = ", ".join(f"rank {r}: {b:.1%}" for r, b in self.bubble().items())
        lines = [f"measured pipeline step: {self.span * 1e3:.1f} ms; bubble {bubbles}"]
        for r, slots in enumerate(self.slots()):
            shown = " ".join(
                f"{s.action.kind}{s.action.microbatch}@{s.start * 1e3:.1f}" for s in slots
            )
            lines.append(f"rank {r}: {shown}")
        return "\n".join(lines)

    def grid(self) -> str:
        """The measured events on a coarse grid (one column per shortest action)."""
        return render_grid("measured", self.slots(), False, self.ranks)

    def plot(self, path: str | Path, waits: bool = True) -> Path:
        """Draw the measured timeline (ranks x seconds) to a PNG, receive waits and send
        postings included unless `waits` is False."""
        return plot_slots(
            self.slots(waits), path, f"measured (bubble {self.mean_bubble():.1%})", unit="s"
        )

    def to_rows(self) -> list[list[float]]:
        """Events as numbers (for gathering across ranks)."""
        return [
            [e.rank, KINDS.index(e.kind), e.stage, e.microbatch, e.start, e.end]
            for e in self.events
        ]

    @classmethod
    def from_rows(cls, ranks: int, rows: list[list[float]]) -> Timeline:
        return cls(
            ranks,
            [
                Event(int(r), KINDS[int(k)], int(s), int(m), float(a), float(b))
                for r, k, s, m, a, b in rows
            ],
        )
