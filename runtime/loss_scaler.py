"""Dynamic loss scaling for fp16: scale the loss up, skip steps whose gradients overflow.

The rules are DeepSpeed's DynamicLossScaler (what `fp16.hysteresis` and
`consecutive_hysteresis` mean there), so a DeepSpeed config converted with
`strato.from_deepspeed` scales the same way: an overflow skips its step and uses up one
unit of hysteresis; with none left (hysteresis 1) it backs the scale off, and every later
overflow backs off again until the count refills, when the scale grows (and, with
`consecutive_hysteresis`, after every finite step).
"""

from __future__ import annotations

from typing import Any

import attrs

from ..compiler.training_config import LossScaling


@attrs.define
class DynamicLossScaler:
    """The scale and its counters; `update(found_inf)` after each optimizer step."""

    config: LossScaling
    scale: float = attrs.field(default=None)
    good_steps: int = 0
    """Finite steps since the last overflow or growth of the scale."""
    hysteresis_left: int = attrs.field(default=None)
    """Overflows that still only skip their step; at 1 the next overflow backs off."""

    def __attrs_post_init__(self) -> None:
        if self.scale is None:
            self.scale = float(self.config.initial_scale)
        if self.hysteresis_left is None:
            self.hysteresis_left = self.config.hysteresis

    def update(self, found_inf: bool) -> None:
        cfg = self.config
        if found_inf:
            self.good_steps = 0
            if self.hysteresis_left <= 1:
                self.scale = max(cfg.min_scale, self.scale * cfg.backoff_factor)
            else:
                self.hysteresis_left -= 1
            return
        if cfg.consecutive_hysteresis:
            self.hysteresis_left = cfg.hysteresis
        self.good_steps += 1
        if self.good_steps >= cfg.growth_interval:
            self.scale *= cfg.growth_factor
            self.good_steps = 0
            self.hysteresis_left = cfg.hysteresis

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "good_steps": self.good_steps,
            "hysteresis_left": self.hysteresis_left,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.hysteresis_left = int(state["hysteresis_left"])
