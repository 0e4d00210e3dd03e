"""Activation recomputation settings a Strategy holds: which regions, which policy, a budget.

`Strategy.recompute` takes 'none', 'full', 'selective', `strato.Recompute(...)` or
`strato.Budget(...)`; `convert_recompute` turns each into one of the two classes (or None:
keep the model's own checkpoint regions, recompute nothing else).
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from .errors import StrategyError, did_you_mean

POLICIES = ("none", "selective", "full")
"""none: autograd saves what it saves; selective: keep matmul/attention outputs, recompute the
rest in backward; full: keep only the region's inputs, recompute the whole region."""

DEFAULT_MODULES = ("<layers>", "<tail>")
"""Regions by default: every numbered layer (`blocks.3`, `model.layers.0`), as ZeRO-3 units,
and the tail after the last one (final norm, output projection, loss: the logits are the
largest activation of a language model)."""

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_UNITS.update({"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4})


def parse_bytes(value: Any, field: str) -> int:
    """An int of bytes, or a string like '1.5GiB', '300 MB', '4096'."""
    if isinstance(value, bool):
        raise StrategyError(f"{field}: expected bytes (e.g. '1.5GiB' or 2**30), got {value!r}.")
    if isinstance(value, int | float):
        if value <= 0:
            raise StrategyError(f"{field}: expected a positive number of bytes, got {value!r}.")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise StrategyError(
            f"{field}: cannot read {value!r} as bytes; write a positive number with an optional "
            "unit, e.g. '1.5GiB', '300MB', '512KiB' or 1048576 (units: B, KB, MB, GB, KiB, MiB, "
            "GiB, TiB)."
        )
    return int(float(match.group(1)) * _UNITS[unit])


def check_policy(instance, attribute, value) -> None:
    if value not in POLICIES:
        raise StrategyError(
            f"Recompute.policy: unknown policy {value!r}; choose one of "
            f"{', '.join(map(repr, POLICIES))}.{did_you_mean(str(value), POLICIES)}"
        )


def _as_modules(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


@attrs.frozen
class Recompute:
    """Recompute the named module regions in backward instead of keeping their activations."""

    modules: tuple[str, ...] = attrs.field(default=DEFAULT_MODULES, converter=_as_modules)
    """Module paths or fnmatch globs (`layers.*`, `blocks.[0-3]`); each matched module is one
    region. '<layers>' means every numbered layer, '<tail>' the nodes after the last one (final
    norm, output projection, loss). A glob matching no module is an error."""

    policy: str = attrs.field(default="full", validator=check_policy)
    """'full' (keep only region inputs), 'selective' (also keep matmul/attention outputs) or
    'none' (recompute nothing: also turns off the model's own checkpoint regions)."""

    offload: bool = False
    """Move what a region keeps through autograd (its inputs under 'full'/'selective',
    everything under 'none') to host memory after forward and back for backward (DeepSpeed's
    cpu_checkpointing); on a CPU-only model this only adds copies."""


@attrs.frozen
class Budget:
    """Choose regions and policies so saved activations fit `limit` at least recompute cost."""

    limit: int = attrs.field(converter=lambda v: parse_bytes(v, "Budget.limit"))
    """Bytes autograd may keep for backward per forward (per micro-batch): '1.5GiB', 10**8."""

    modules: tuple[str, ...] = attrs.field(default=DEFAULT_MODULES, converter=_as_modules)
    """Candidate regions, as Recompute.modules."""


def convert_recompute(value: Any) -> Recompute | Budget | None:
    """None/'auto' (the model's own regions only), a policy name, a dict from YAML, or a config."""
    if value is None or isinstance(value, Recompute | Budget):
        return value
    if isinstance(value, str):
        if value == "auto":
            return None
        if value in POLICIES:
            return Recompute(policy=value)
        raise StrategyError(
            f"Strategy.recompute: unknown policy {value!r}; choose one of "
            f"{', '.join(map(repr, POLICIES))}, strato.Recompute(...) or strato.Budget('1GiB')."
            f"{did_you_mean(value, POLICIES)}"
        )
    if isinstance(value, dict):
        data = dict(value)
        kind = str(data.pop("kind", "Budget" if "limit" in data else "Recompute"))
        classes = {"Recompute": Recompute, "Budget": Budget}
        if kind not in classes:
            raise StrategyError(
                f"Strategy.recompute: unknown kind {kind!r}; choose 'Recompute' or 'Budget'."
                f"{did_you_mean(kind, classes)}"
            )
        fields = {f.name for f in attrs.fields(classes[kind])}
        unknown = [k for k in data if k not in fields]
        if unknown:
            raise StrategyError(
                f"Strategy.recompute ({kind}): unknown field {unknown[0]!r}; valid: "
                f"{', '.join(sorted(fields))}.{did_you_mean(unknown[0], fields)}"
            )
        return classes[kind](**data)
    raise StrategyError(
        f"Strategy.recompute: expected 'none', 'full', 'selective', strato.Recompute(...) or "
        f"strato.Budget(...), got {value!r}."
    )
