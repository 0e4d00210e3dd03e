"""Where ZeRO keeps the optimizer's tensors: with the parameters, on CPU, or in
memory-mapped files under a folder (Strategy.offload = None | 'cpu' | strato.NVMe(path))."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import attrs
import torch


@attrs.define
class OffloadStore:
    """Where the optimizer's tensors live: None (with the parameters), 'cpu', or a folder
    of memory-mapped files (NVMe)."""

    kind: str | None
    folder: str | None = None
    files: list[str] = attrs.field(factory=list)

    def place(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """A copy of `tensor` where this store keeps tensors (mmap-backed for NVMe)."""
        if self.kind is None:
            return tensor
        if self.kind == "cpu":
            out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            if torch.cuda.is_available():
                out = out.pin_memory()
            return out.copy_(tensor)
        assert self.folder is not None
        safe = name.replace("/", "_")
        path = os.path.join(self.folder, f"{safe}.{len(self.files)}.bin")
        nbytes = max(1, tensor.numel() * tensor.element_size())
        with open(path, "wb") as f:
            f.truncate(nbytes)
        self.files.append(path)
        mapped = torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype)
        return mapped.view(tensor.shape).copy_(tensor)

    def holds(self, tensor: torch.Tensor) -> bool:
        return self.kind is not None and tensor.device.type == "cpu"

    def close(self) -> None:
        """Delete the memory-mapped files (the tensors mapping them must be gone or unused)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.files.clear()


def offload_store(offload: Any, rank: int) -> OffloadStore:
    """The store for a recorded offload decision (the zero pass's `offload` record:
    None, {'kind': 'cpu'} or {'kind': 'nvme', 'path': folder}); NVMe files go to a
    fresh per-rank subfolder, removed by `close`."""
    if offload is None:
        return OffloadStore(None)
    if offload["kind"] == "cpu":
        return OffloadStore("cpu")
    root = str(offload["path"])
    os.makedirs(root, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"strato-zero-rank{rank}-", dir=root)
    return OffloadStore("nvme", folder)
