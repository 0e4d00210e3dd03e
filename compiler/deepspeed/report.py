"""The report of a DeepSpeed conversion: what became of every key."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from typing import Any

import attrs

HONOURED, NO_EFFECT, NOT_MAPPED = "honoured", "no effect", "not mapped yet"

UNRESOLVED = object()
"""Stands in for an "auto" nothing resolved (the conversion goes on to list every problem)."""


@attrs.frozen
class ReportEntry:
    """What became of one key."""

    key: str
    """Dotted key in the DeepSpeed config ('zero_optimization.stage')."""
    value: Any
    status: str
    """'honoured', 'no effect' or 'not mapped yet'."""
    note: str
    """The Strato field it set (and how "auto" was resolved), or why it has no effect."""


@attrs.frozen
class DeepSpeedReport:
    """What became of every key of a DeepSpeed config; `print()` it to review the mapping."""

    source: str
    world_size: int
    """The data-parallel world size the batch sizes were resolved with."""
    world_size_from: str
    entries: tuple[ReportEntry, ...]

    def select(self, status: str) -> list[ReportEntry]:
        return [e for e in self.entries if e.status == status]

    def __str__(self) -> str:
        lines = [
            f"DeepSpeed config {self.source} (world size {self.world_size}, {self.world_size_from})"
        ]
        for status in (HONOURED, NO_EFFECT, NOT_MAPPED):
            entries = self.select(status)
            if not entries:
                continue
            lines.append(f"{status}:")
            width = max(len(f"{e.key} = {short(e.value)}") for e in entries)
            for e in entries:
                lines.append(f"  {f'{e.key} = {short(e.value)}':<{width}}  {e.note}")
        return "\n".join(lines)


def short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, Mapping) else "{...}"
    return text if len(text) <= 40 else text[:37] + "..."


def warn_about_report(report: DeepSpeedReport) -> None:
    """One warning naming the keys that have no effect or are not mapped yet."""
    quiet = report.select(NO_EFFECT) + report.select(NOT_MAPPED)
    if quiet:
        names = ", ".join(e.key for e in quiet)
        warnings.warn(
            f"DeepSpeed config {report.source}: {len(quiet)} key(s) have no effect in Strato or "
            f"are not mapped yet: {names}. print(strato.convert_deepspeed(config)[1]) shows "
            "what became of every key and why.",
            stacklevel=3,
        )


# ---------------------------------------------------------------------- conversion
