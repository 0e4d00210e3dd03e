"""On-disk cache of generated kernel sources, imported once per process.

Triton's `@jit` reads a kernel's source from its file, so generated code must live in
real files. Each source is written as `<name_hint>_<hash>.py` under the cache folder
(`STRATO_CACHE_DIR`, default ~/.cache/strato/kernels), where the hash is of the source
itself: the templates keep shapes symbolic, so equal regions give equal sources and
the same file. `cache_stats()` counts sources generated (written) vs reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import attrs

_modules: dict[str, types.ModuleType] = {}


@attrs.define
class CacheStats:
    """How many kernel sources this process wrote to disk (generated) or found there (reused)."""

    generated: int = 0
    reused: int = 0
    """Found on disk, or already imported in this process."""


_stats = CacheStats()


def cache_dir() -> Path:
    """The kernel cache folder: $STRATO_CACHE_DIR, else ~/.cache/strato/kernels."""
    env = os.environ.get("STRATO_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "strato" / "kernels"


def source_hash(source: str) -> str:
    """The structural key of a generated source (sha256 of its text, 16 hex digits)."""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def cache_stats() -> CacheStats:
    """A copy of this process's counters."""
    return attrs.evolve(_stats)


def reset_cache_stats() -> None:
    """Zero the counters (tests use this to count hits for one compile)."""
    _stats.generated = 0
    _stats.reused = 0


def load_kernel_module(source: str, name_hint: str) -> types.ModuleType:
    """Import `source` as a module from the cache folder, writing it there if new.

    The same source is imported once per process; `name_hint` names the file (and
    shows in tracebacks) and is sanitised to an identifier.
    """
    digest = source_hash(source)
    stem = re.sub(r"\W", "_", name_hint).strip("_")[:60] or "kernel"
    module_name = f"strato_kernels.{stem}_{digest}"
    folder = cache_dir()
    path = folder / f"{stem}_{digest}.py"
    loaded = _modules.get(module_name)
    if loaded is not None and Path(loaded.__file__ or "") == path:
        _stats.reused += 1
        return loaded
    if path.exists() and path.read_text() == source:
        _stats.reused += 1
    else:
        folder.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent process never imports a half-written file.
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
        _stats.generated += 1
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(module_name, None)
        raise
    _modules[module_name] = module
    return module
