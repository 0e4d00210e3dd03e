"""Counting Triton kernel launches and the bytes they write (for bench/fusion.py).

Every Strato kernel wrapper calls `launch(...)`, which reports the launch to the
active `count_launches()` contexts before running the kernel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import attrs
import torch


@attrs.define
class LaunchCount:
    """Triton launches seen, by kernel name, and the bytes of tensors they wrote."""

    launches: dict[str, int] = attrs.field(factory=dict)
    bytes_by_kernel: dict[str, int] = attrs.field(factory=dict)
    bytes_written: int = 0

    @property
    def total(self) -> int:
        return sum(self.launches.values())


_active: list[LaunchCount] = []
_running = 0


def kernel_running() -> bool:
    """True inside a Triton launch (the interpreter's own tensor copies are no ATen launches)."""
    return _running > 0


@contextmanager
def count_launches() -> Iterator[LaunchCount]:
    """Count the Strato Triton kernels launched inside the block."""
    counter = LaunchCount()
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.remove(counter)


def launch(kernel, grid, *args, written: Sequence[torch.Tensor] = (), **kwargs) -> None:
    """Run `kernel[grid](*args, **kwargs)`; `written` are the tensors the kernel fills."""
    for counter in _active:
        name = getattr(kernel, "__name__", None) or getattr(
            getattr(kernel, "fn", None), "__name__", "kernel"
        )
        nbytes = sum(t.numel() * t.element_size() for t in written)
        counter.launches[name] = counter.launches.get(name, 0) + 1
        counter.bytes_by_kernel[name] = counter.bytes_by_kernel.get(name, 0) + nbytes
        counter.bytes_written += nbytes
    global _running
    _running += 1
    try:
        kernel[grid](*args, **kwargs)
    finally:
        _running -= 1
