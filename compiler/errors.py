"""Exceptions Strato raises, each naming the field, node, module or pass at fault."""

from __future__ import annotations

import difflib


class StratoError(Exception):
    """Base class of every error Strato raises on purpose."""


class StrategyError(StratoError, ValueError):
    """A strategy field is unknown or holds a value it cannot take."""


class CaptureError(StratoError):
    """The model could not be traced into an FX graph."""


class InputError(StratoError, TypeError):
    """A call's inputs do not fit the compiled model: names the argument and what to pass."""


class PassError(StratoError):
    """A pass raised, or returned a graph that does not lint or run."""


class PassContractError(PassError):
    """The set of passes violates a requires / conflicts / before / after contract."""


def did_you_mean(name: str, choices) -> str:
    """' Did you mean 'x'?' when `name` is close to one of `choices`, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
