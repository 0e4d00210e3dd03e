"""Which kernels run: the generated Triton kernels or their torch references.

The environment variable STRATO_KERNELS chooses: `triton` (on CPU through
TRITON_INTERPRET=1) or `reference`. Unset, it is `triton` when CUDA is available and
`reference` otherwise (the Triton interpreter is far slower than eager on CPU).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from ..compiler.errors import StratoError

Backend = Literal["triton", "reference"]
BACKENDS: tuple[str, ...] = ("triton", "reference")


class KernelBackendError(StratoError, ValueError):
    """STRATO_KERNELS holds a value that names no backend, or Triton cannot run here."""


def kernel_backend(device: torch.device | str | None = None) -> Backend:
    """'triton' or 'reference', from STRATO_KERNELS or the device (CUDA -> triton)."""
    value = os.environ.get("STRATO_KERNELS", "").strip().lower()
    if value:
        if value not in BACKENDS:
            raise KernelBackendError(
                f"STRATO_KERNELS={os.environ['STRATO_KERNELS']!r} is not a kernel backend; "
                f"set it to one of {', '.join(BACKENDS)} or unset it (default: triton on CUDA, reference on CPU)."
            )
        if value == "triton" and not _triton_can_run(device):
            raise KernelBackendError(
                "STRATO_KERNELS=triton but there is no CUDA device and TRITON_INTERPRET is not 1; "
                "set TRITON_INTERPRET=1 to run the Triton kernels on CPU, or STRATO_KERNELS=reference."
            )
        return value  # type: ignore[return-value]
    if device is not None:
        return "triton" if torch.device(device).type == "cuda" else "reference"
    return "triton" if torch.cuda.is_available() else "reference"


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_can_run(device) -> bool:
    if interpreting():
        return True
    if device is not None:
        return torch.device(device).type == "cuda"
    return torch.cuda.is_available()
