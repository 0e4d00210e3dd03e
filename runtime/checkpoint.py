"""Checkpoint folders: layout-independent tensors in safetensors files, the rest in JSON.

    root/step-00000010/metadata.json            format, step, every file with its size and
                                                sha256, every tensor with its global shape,
                                                dtype and the pieces each file holds
    root/step-00000010/state.rank0.safetensors  rank 0's pieces (+ its RNG state) ...
    root/latest                                 the name of the newest complete step folder

Every tensor is stored under its global name ('model/<state-dict name>',
'optim/<param>/<key>') as flat pieces; a piece lists the [lo, hi) ranges of the global
tensor's flattened elements it holds (compiler/layout.py computes them from the layout
maps the passes registered). A rank loading under another world size or strategy reads only
the ranges its new layout needs. Nothing is ever unpickled.

A save snapshots the pieces to host memory, then a background thread writes
root/.tmp-step-N/state.rank{r}.safetensors and a small index.rank{r}.json; rank 0 waits for
every rank's index, writes metadata.json, renames the folder to root/step-N and atomically
replaces `latest`. A process killed at any point leaves `latest` naming the previous complete
checkpoint. Loading checks every file's size and sha256 before reading it, so a damaged,
truncated, foreign or tampered folder fails with a message naming the file.

All ranks must see the same folder (a shared filesystem when training on several nodes).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..compiler.errors import StratoError

FORMAT = "strato-checkpoint"
VERSION = 2
REQUIRED_KEYS = ("files", "tensors", "optimizer", "global_step", "aliases")
"""What every metadata.json holds besides the format marker."""
PUBLISH_TIMEOUT_S = float(os.environ.get("STRATO_CHECKPOINT_PUBLISH_TIMEOUT_S", 1800))
"""How long rank 0 waits for the other ranks' files before giving the save up."""
EXIT_GRACE_S = 60.0
"""... and how long once this process is exiting."""


class CheckpointError(StratoError, RuntimeError):
    """A checkpoint folder is missing, foreign, damaged or does not fit this engine."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write a safetensors file, flushed to disk before returning; returns its sha256."""
    data = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    _write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def step_folder_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------- saving


class SaveJob:
    """One rank's part of one save: its snapshot, written by a background thread."""

    def __init__(
        self,
        root: Path,
        step: int,
        rank: int,
        world_size: int,
        pieces: dict[str, dict[str, Any]],
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, Any] | None,
        keep_last: int,
    ) -> None:
        self.root, self.step, self.rank, self.world_size = root, step, rank, world_size
        self.pieces, self.tensors, self.metadata, self.keep_last = (
            pieces,
            tensors,
            metadata,
            keep_last,
        )
        self.folder = root / step_folder_name(step)
        self.tmp = root / f".tmp-{step_folder_name(step)}"
        self.error: BaseException | None = None
        self.seconds = 0.0
        """Time the background write took (this rank's file, and publishing on rank 0)."""
        self._thread = threading.Thread(
            target=self._run, name=f"strato-checkpoint-{step}", daemon=False
        )

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        """Block until the background write has ended, successfully or not."""
        self._thread.join()

    def wait(self) -> Path:
        """Block until this save is written (on rank 0: published); re-raise its failure."""
        self._thread.join()
        if self.error is not None:
            raise CheckpointError(
                f"save_checkpoint: writing {self.tmp} on rank {self.rank} failed: {self.error}"
            ) from self.error
        return self.folder

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            file_name = f"state.rank{self.rank}.safetensors"
            sha = write_tensors(self.tmp / file_name, self.tensors)
            size = (self.tmp / file_name).stat().st_size
            index = {"file": file_name, "bytes": size, "sha256": sha, "pieces": self.pieces}
            _write_json(self.tmp / f"index.rank{self.rank}.json.tmp", index)
            os.replace(
                self.tmp / f"index.rank{self.rank}.json.tmp",
                self.tmp / f"index.rank{self.rank}.json",
            )
            self.tensors = {}  # the snapshot is on disk: free the host memory
            if self.rank == 0:
                self._publish()
        except BaseException as exc:  # noqa: BLE001 (re-raised by wait())
            self.error = exc
        self.seconds = time.perf_counter() - started

    def _publish(self) -> None:
        """Rank 0: merge every rank's index into metadata.json, rename, point `latest` at it."""
        indexes = [self.tmp / f"index.rank{r}.json" for r in range(self.world_size)]
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        while not all(p.exists() for p in indexes):
            if not threading.main_thread().is_alive():
                # The process is exiting (maybe because another rank failed): wait a little
                # for the others, not the whole timeout, then leave the save unpublished.
                deadline = min(deadline, time.monotonic() + EXIT_GRACE_S)
            if time.monotonic() > deadline:
                missing = [r for r, p in enumerate(indexes) if not p.exists()]
                raise CheckpointError(f"ranks {missing} did not write their files")
            time.sleep(0.005)
        files: dict[str, dict[str, Any]] = {}
        tensors: dict[str, dict[str, Any]] = {}
        rng: dict[str, dict[str, Any]] = {}
        for path in indexes:
            index = json.loads(path.read_text())
            files[index["file"]] = {"bytes": index["bytes"], "sha256": index["sha256"]}
            for name, piece in index["pieces"].items():
                if name.startswith("rng/"):  # 'rng/<rank>/<generator>': that rank's own
                    entry = rng.setdefault(name.split("/")[1], {"file": index["file"], "keys": []})
                    entry["keys"].append(name)
                    continue
                entry = tensors.setdefault(
                    name,
                    {k: piece[k] for k in ("shape", "dtype", "follows") if k in piece},
                )
                entry.setdefault("pieces", []).append(
                    {"file": index["file"], "key": name, "intervals": piece["intervals"]}
                )
        metadata = {
            **(self.metadata or {}),
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "world_size": self.world_size,
            "files": files,
            "tensors": tensors,
            "rng": rng,
        }
        _write_json(self.tmp / "metadata.json", metadata)
        for path in indexes:
            path.unlink()
        _fsync_dir(self.tmp)
        if self.folder.exists():  # saving the same step again: replace it
            shutil.rmtree(self.folder)
        os.rename(self.tmp, self.folder)
        latest_tmp = self.root / "latest.tmp"
        latest_tmp.write_text(self.folder.name + "\n")
        with open(latest_tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(latest_tmp, self.root / "latest")
        _fsync_dir(self.root)
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir() and p != self.folder)
        for old in steps[: max(0, len(steps) - (self.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)


def prepare_folder(root: Path, step: int) -> None:
    """Rank 0, before any rank writes: the root exists, stale temp folders are gone, the
    temp folder of this save is empty."""
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"save_checkpoint: {root} exists and is not a folder.")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    (root / f".tmp-{step_folder_name(step)}").mkdir()


def snapshot(
    tensors: dict[str, torch.Tensor], pieces: dict[str, dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """Host-memory copies (flat) of the tensors to write, taken now."""
    out = {}
    for name in pieces:
        t = tensors[name].detach()
        out[name] = t.reshape(-1).to("cpu", copy=True) if t.numel() else t.reshape(-1).cpu()
    return out


# ---------------------------------------------------------------------- loading


def resolve(path: str | Path) -> Path:
    """The step folder `path` names: a step folder itself, or a root with a `latest` file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"load_checkpoint: {path} does not exist.")
    if path.name.startswith(".tmp-step-"):
        raise CheckpointError(
            f"load_checkpoint: {path} is a checkpoint still being written (or a save that was "
            f"killed); it is not `latest` yet. Load {path.parent} to get the newest complete one."
        )
    if (path / "metadata.json").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        folder = path / latest.read_text().strip()
        if not (folder / "metadata.json").is_file():
            raise CheckpointError(
                f"load_checkpoint: {latest} names {folder.name!r}, which has no metadata.json: "
                "the checkpoint folder was damaged or edited by hand."
            )
        return folder
    raise CheckpointError(
        f"load_checkpoint: {path} is not a Strato checkpoint (no metadata.json and no 'latest' "
        "file). Pass the folder given to engine.save_checkpoint or one of its step-* folders."
    )


def read_metadata(folder: Path) -> dict[str, Any]:
    """The checked metadata of a step folder: format, version, every listed file present
    with its size (hashes are checked by `TensorReader` before a file is read)."""
    meta_path = folder / "metadata.json"
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"load_checkpoint: {meta_path} is not readable JSON: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"load_checkpoint: {meta_path} is not Strato checkpoint metadata "
            f"(format {metadata.get('format') if isinstance(metadata, dict) else None!r}, "
            f"expected {FORMAT!r}); Strato loads only folders written by engine.save_checkpoint."
        )
    if metadata.get("version", 0) != VERSION:
        raise CheckpointError(
            f"load_checkpoint: {folder} has format version {metadata.get('version')}; this "
            f"Strato reads version {VERSION}."
        )
    lacking = [k for k in REQUIRED_KEYS if k not in metadata]
    if lacking:
        raise CheckpointError(
            f"load_checkpoint: {meta_path} lacks {lacking}: the checkpoint was damaged or "
            "edited by hand."
        )
    for file_name, info in metadata["files"].items():
        file_path = folder / file_name
        if not file_path.is_file():
            raise CheckpointError(f"load_checkpoint: {file_path} is missing (listed in metadata).")
        actual = file_path.stat().st_size
        if actual != info["bytes"]:
            raise CheckpointError(
                f"load_checkpoint: {file_path} is {actual} bytes, metadata says {info['bytes']}: "
                "the file is truncated or corrupt."
            )
    return metadata


class TensorReader:
    """Reads ranges of the tensors of one step folder, verifying each file's sha256 first."""

    def __init__(self, folder: Path, metadata: dict[str, Any]) -> None:
        self.folder, self.metadata = folder, metadata
        self._open: dict[str, Any] = {}
        self._spans_of: dict[str, tuple[list[int], list[tuple[int, int, str, str, int]]]] = {}

    def _file(self, file_name: str):
        if file_name in self._open:
            return self._open[file_name]
        info = self.metadata.get("files", {}).get(file_name)
        path = self.folder / file_name
        if info is None:
            raise CheckpointError(f"load_checkpoint: {path} is not listed in metadata.json.")
        if sha256_file(path) != info["sha256"]:
            raise CheckpointError(
                f"load_checkpoint: {path} does not match the sha256 in metadata.json: the file "
                "was modified or damaged after it was saved."
            )
        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"load_checkpoint: {path} is corrupt (not a safetensors file): {exc}"
            ) from exc
        self._open[file_name] = handle
        return handle

    def _spans(self, name: str) -> tuple[list[int], list[tuple[int, int, str, str, int]]]:
        """Every stored range of tensor `name`, sorted: (lo, hi, file, key, where the range
        starts inside that key's flat tensor), and their `lo`s for bisection."""
        if name not in self._spans_of:
            spans = []
            for piece in self.metadata["tensors"][name]["pieces"]:
                start = 0
                for a, b in piece["intervals"]:
                    spans.append((a, b, piece["file"], piece["key"], start))
                    start += b - a
            spans.sort()
            self._spans_of[name] = ([a for a, *_ in spans], spans)
        return self._spans_of[name]

    def read(self, name: str, wanted: list[tuple[int, int]]) -> torch.Tensor:
        """The elements of tensor `name` in the global flat ranges `wanted`, concatenated;
        only the stored ranges overlapping them are read."""
        dtype = getattr(torch, self.metadata["tensors"][name]["dtype"])
        starts, spans = self._spans(name)
        out = torch.empty(sum(hi - lo for lo, hi in wanted), dtype=dtype)
        filled = offset = 0
        for lo, hi in wanted:
            k = max(0, bisect.bisect_right(starts, lo) - 1)
            while k < len(spans) and spans[k][0] < hi:
                a, b, file_name, key, start = spans[k]
                k += 1
                x, y = max(a, lo), min(b, hi)
                if x >= y:
                    continue
                try:
                    part = self._file(file_name).get_slice(key)[start + x - a : start + y - a]
                except (SafetensorError, KeyError, ValueError, RuntimeError) as exc:
                    raise CheckpointError(
                        f"load_checkpoint: {self.folder / file_name} has no readable tensor "
                        f"{key!r}: {exc}"
                    ) from exc
                if part.dtype != dtype or part.numel() != y - x:
                    raise CheckpointError(
                        f"load_checkpoint: {self.folder / file_name} holds {key!r} as "
                        f"{part.dtype} with too few elements; metadata says {dtype}."
                    )
                out[offset + x - lo : offset + y - lo].copy_(part)
                filled += y - x
            offset += hi - lo
        if filled != out.numel():
            raise CheckpointError(
                f"load_checkpoint: the pieces of {name!r} in {self.folder} cover {filled} of the "
                f"{out.numel()} elements this rank needs: the checkpoint is incomplete."
            )
        return out

    def read_file(self, file_name: str, keys: list[str]) -> dict[str, torch.Tensor]:
        handle = self._file(file_name)
        return {k: handle.get_tensor(k) for k in keys}
