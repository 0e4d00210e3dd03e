"""`Quantize`: the Strategy section that turns linear layers into quantized kernels."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .errors import StrategyError, did_you_mean

INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128
"""The int4 group size when Quantize.group_size is None."""


def _as_globs(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    values = (value,) if isinstance(value, str) else tuple(value)
    for v in values:
        if not isinstance(v, str) or not v:
            raise StrategyError(
                f"Quantize.skip: expected module-path globs such as 'lm_head' or "
                f"'encoder.layer.0.*', got {v!r}."
            )
    return values


def _check_choice(choices: tuple):
    def check(instance, attribute, value) -> None:
        if value not in choices:
            names = ", ".join(repr(c) for c in choices)
            raise StrategyError(
                f"Quantize.{attribute.name}: expected one of {names}, got {value!r}."
                f"{did_you_mean(str(value), [str(c) for c in choices])}"
            )

    return check


def _check_group_size(instance, attribute, value) -> None:
    if value is not None and value not in INT4_GROUP_SIZES:
        raise StrategyError(
            f"Quantize.group_size: expected one of {INT4_GROUP_SIZES} or None, got {value!r}."
        )


def _check_bool(instance, attribute, value) -> None:
    if not isinstance(value, bool):
        raise StrategyError(f"Quantize.{attribute.name}: expected True or False, got {value!r}.")


def _check_alpha(instance, attribute, value) -> None:
    if value is not None and (
        not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1
    ):
        raise StrategyError(
            f"Quantize.smoothquant_alpha: expected a number in [0, 1] or None, got {value!r}."
        )


def _check_calibration(instance, attribute, value) -> None:
    if isinstance(value, str) and ":" not in value:
        raise StrategyError(
            f"Quantize.calibration: {value!r} is not an import path; write "
            "'package.module:function' (a function returning a list of batches)."
        )
    iterable = isinstance(value, Iterable) and not isinstance(value, Mapping)
    if value is None or callable(value) or isinstance(value, str) or iterable:
        if type(value).__name__ == "Tensor":  # iterating a tensor yields rows, not batches
            raise StrategyError(
                "Quantize.calibration: got one tensor; give a list of batches, e.g. [ids] "
                "or [(ids,), (ids2,)] (each a call of the model)."
            )
        return
    raise StrategyError(
        "Quantize.calibration: expected an iterable of batches, a function returning one, an "
        f"import path 'package.module:function' or None, got {type(value).__name__}."
    )


@attrs.frozen(kw_only=True)
class Quantize:
    """Weight-only int8/int4 quantization of linear layers, optionally with int8 activations."""

    weights: str = attrs.field(default="int8", validator=_check_choice(("int8", "int4")))
    """'int8': one scale per output channel. 'int4': one scale per `group_size` input
    columns of each output channel (8x smaller than fp32; a little less accurate)."""

    group_size: int | None = attrs.field(default=None, validator=_check_group_size)
    """int4 only: input columns that share a scale (32, 64, 128 or 256; None: 128). Layers
    whose input size is not a multiple are zero-padded to one. An error with int8, which
    has one scale per output channel."""

    symmetric: bool = attrs.field(default=True, validator=_check_bool)
    """True: scales only (zero maps to zero). False: a zero point per channel/group too,
    which fits skewed weight ranges better."""

    activations: str | None = attrs.field(default=None, validator=_check_choice((None, "int8")))
    """None: activations stay float (weight-only). 'int8': inputs of quantized layers are
    quantized per tensor at run time (needs weights='int8', symmetric=True)."""

    method: str = attrs.field(default="rtn", validator=_check_choice(("rtn", "gptq")))
    """How int4 codes are chosen: 'rtn' rounds each weight to the nearest level; 'gptq'
    (int4 only) runs the model on the calibration inputs and spreads each column's
    rounding error over the columns not yet quantized, which keeps outputs closer."""

    calibration: Any = attrs.field(default=None, validator=_check_calibration, eq=False)
    """Sample inputs for method='gptq' and for activations='int8' (SmoothQuant): calls of
    the model, as an iterable of batches (each a tensor, an args tuple, or an (args,
    kwargs) pair), a function returning one, or an import path 'package.module:function'
    to such a function (the YAML form). Required by 'gptq' (calibrating on the example
    inputs would measure quality on the text it was fitted to); SmoothQuant without it
    calibrates on the example inputs and warns. An error where nothing calibrates."""

    smoothquant_alpha: float | None = attrs.field(default=0.5, validator=_check_alpha)
    """activations='int8' only: SmoothQuant migration strength (0: none, 1: all of the
    activation range moves into the weights); None disables smoothing."""

    stack_siblings: bool = attrs.field(default=True, validator=_check_bool)
    """Weight-only schemes: layers that read the same input (attention q/k/v, MLP gate/up)
    become one quantized op on their stacked weights (same values, fewer kernel calls)."""

    skip: tuple[str, ...] = attrs.field(default=(), converter=_as_globs)
    """Layers left in float, as fnmatch globs on module paths ('lm_head', '*.attention.*')."""

    @property
    def int4_group_size(self) -> int:
        """The group size int4 weights use (`group_size`, default 128)."""
        return self.group_size if self.group_size is not None else DEFAULT_GROUP_SIZE

    def __attrs_post_init__(self) -> None:
        if self.method == "gptq" and self.weights != "int4":
            raise StrategyError(
                f"Quantize.method: 'gptq' is implemented for weights='int4', got weights={self.weights!r}."
            )
        if self.activations == "int8" and (self.weights != "int8" or not self.symmetric):
            raise StrategyError(
                "Quantize.activations: 'int8' activations need weights='int8' and "
                f"symmetric=True (got weights={self.weights!r}, symmetric={self.symmetric})."
            )
        if self.group_size is not None and self.weights != "int4":
            raise StrategyError(
                f"Quantize.group_size: applies to weights='int4' only (weights={self.weights!r} "
                f"has one scale per output channel); drop group_size={self.group_size} or use "
                "weights='int4'."
            )
        calibrates = self.method == "gptq" or self.activations == "int8"
        if self.calibration is not None and not calibrates:
            raise StrategyError(
                "Quantize.calibration: only method='gptq' and activations='int8' calibrate; "
                f"weights={self.weights!r} with method={self.method!r} rounds each weight to "
                "the nearest level and reads no data. Drop calibration, or set method='gptq'."
            )
        if self.method == "gptq" and self.calibration is None:
            raise StrategyError(
                "Quantize.calibration: method='gptq' needs calibration batches (calls of the "
                "model on text like what it will serve, e.g. 32-128 sequences), given as "
                "Quantize(..., calibration=[...]); they are never taken from the example inputs."
            )
