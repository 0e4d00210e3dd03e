"""Checkpoint folders: tensors in safetensors files, everything else in one JSON file.

Layout of `save(root, ...)`:

    root/step-00000010/metadata.json        format marker, step, files with their sizes
    root/step-00000010/state.safetensors    written by rank 0 (or one file per rank when sharded)
    root/step-00000010/rng.rank0.safetensors ...
    root/latest                             the name of the newest complete step folder

A save writes into root/.tmp-step-N, renames it to root/step-N when every rank has
finished, then atomically replaces `latest`. A process killed at any point leaves
`latest` naming the previous complete checkpoint. Loading checks the format marker and
every file's size and parses safetensors headers, so a foreign or damaged folder fails
with a message naming the file; nothing is ever unpickled.

All ranks must see the same folder (a shared filesystem when training on several nodes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import collectives

FORMAT = "strato-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file, flushed to disk before returning."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def step_folder_name(step: int) -> str:
    return f"step-{step:08d}"


def save(
    root: str | Path,
    step: int,
    files: dict[str, dict[str, torch.Tensor]],
    metadata: dict[str, Any] | None,
    keep_last: int = 2,
    group: Any | None = None,
) -> Path:
    """Write one checkpoint; every rank calls it with the files IT writes (names must
    differ across ranks); rank 0 passes the JSON `metadata`. Returns the step folder."""
    root = Path(root)
    name = step_folder_name(step)
    tmp = root / f".tmp-{name}"
    is_main = collectives.rank() == 0
    if is_main:
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"save_checkpoint: {root} exists and is not a folder.")
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    collectives.barrier(group)
    for file_name, tensors in files.items():
        write_tensors(tmp / file_name, tensors)
    collectives.barrier(group)
    final = root / name
    if is_main:
        listed = {
            p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.suffix == ".safetensors"
        }
        _write_json(
            tmp / "metadata.json",
            {
                "format": FORMAT,
                "version": VERSION,
                "step": step,
                "files": listed,
                **(metadata or {}),
            },
        )
        _fsync_dir(tmp)
        if final.exists():  # saving the same step again: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(name + "\n")
        with open(latest_tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(latest_tmp, root / "latest")
        _fsync_dir(root)
        steps = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name)
        for old in steps[: max(0, len(steps) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    collectives.barrier(group)
    return final


def resolve(path: str | Path) -> Path:
    """The step folder `path` names: a step folder itself, or a root with a `latest` file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"load_checkpoint: {path} does not exist.")
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
    """The checked metadata of a step folder."""
    meta_path = folder / "metadata.json"
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"load_checkpoint: {meta_path} is not readable JSON: {exc}") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"load_checkpoint: {meta_path} is not Strato checkpoint metadata "
            f"(format {metadata.get('format') if isinstance(metadata, dict) else None!r}, "
            f"expected {FORMAT!r}); Strato loads only folders written by engine.save_checkpoint."
        )
    if metadata.get("version", 0) > VERSION:
        raise CheckpointError(
            f"load_checkpoint: {folder} has format version {metadata['version']}; this Strato "
            f"reads up to {VERSION}. Upgrade Strato."
        )
    for file_name, size in metadata.get("files", {}).items():
        file_path = folder / file_name
        if not file_path.is_file():
            raise CheckpointError(f"load_checkpoint: {file_path} is missing (listed in metadata).")
        actual = file_path.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"load_checkpoint: {file_path} is {actual} bytes, metadata says {size}: "
                "the file is truncated or corrupt."
            )
    return metadata


def read_tensors(folder: Path, file_name: str, metadata: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors of one listed safetensors file (safetensors parses, never unpickles)."""
    if file_name not in metadata.get("files", {}):
        raise CheckpointError(
            f"load_checkpoint: {folder} has no {file_name!r}; it holds "
            f"{sorted(metadata.get('files', {}))}."
        )
    try:
        return load_file(str(folder / file_name))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"load_checkpoint: {folder / file_name} is corrupt: {exc}") from exc
