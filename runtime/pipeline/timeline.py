"""What a pipelined step measured: each compute action's start and end on each rank.

The executor records one `Event` per F/B/W it runs (wall clock, `time.time()`, so ranks
on one machine share the clock). `Timeline.bubble()` is the idle fraction per rank: 1 -
(time spent in compute actions) / (the step's span from the first start to the last end
over all ranks), the quantity pipeline papers call the bubble. `plot` draws it like the
planned schedule (runtime/pipeline/schedules.py), so plan and measurement compare.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from .schedules import Action, Slot, plot_slots, render_grid

KINDS = ("F", "B", "W")


@attrs.frozen
class Event:
    """One compute action as it ran."""

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

    @property
    def span(self) -> float:
        if not self.events:
            return 0.0
        return max(e.end for e in self.events) - min(e.start for e in self.events)

    def busy(self, rank: int) -> float:
        return sum(e.end - e.start for e in self.events if e.rank == rank)

    def bubble(self) -> dict[int, float]:
        """Idle fraction of each rank over the step's span."""
        span = self.span
        return {r: 1.0 - self.busy(r) / span if span else 0.0 for r in range(self.ranks)}

    def mean_bubble(self) -> float:
        values = list(self.bubble().values())
        return sum(values) / len(values) if values else 0.0

    def slots(self) -> tuple[tuple[Slot, ...], ...]:
        t0 = min((e.start for e in self.events), default=0.0)
        return tuple(
            tuple(
                Slot(Action(e.kind, e.stage, e.microbatch), e.start - t0, e.end - t0)
                for e in sorted(self.events, key=lambda e: e.start)
                if e.rank == r
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

    def plot(self, path: str | Path) -> Path:
        """Draw the measured timeline (ranks x seconds) to a PNG."""
        return plot_slots(self.slots(), path, f"measured (bubble {self.mean_bubble():.1%})")

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
