"""A training progress bar (tqdm) on rank 0 only, fed from `engine.stats()`."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from .distributed import is_main_process


class ProgressBar:
    """`bar = ProgressBar(total); bar.update(engine)` after each optimizer step; quiet on ranks > 0."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train") -> None:
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            disable=not is_main_process(),
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def update(self, engine: Any, **extra: Any) -> None:
        stats = engine.stats()
        postfix = {
            "loss": f"{stats['loss']:.3f}",
            "lr": f"{stats['lr']:.2e}",
            "tok/s": f"{stats['tokens_per_s']:,.0f}",
        }
        if stats["loss_scale"] != 1.0:
            postfix["scale"] = f"{stats['loss_scale']:g}"
        postfix.update({k: str(v) for k, v in extra.items()})
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def write(self, text: str) -> None:
        if not self._bar.disable:
            self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
