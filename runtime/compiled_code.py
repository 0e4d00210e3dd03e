"""Ahead-of-time compiled step graphs in an artifact (AOTInductor), so a new process decodes
at compiled speed without compiling.

`strato.export(compiled, path, compiled_code=True)` compiles generate's prefill and decode
step graphs with `torch._inductor.aoti_compile_and_package`, every batch, token and
cache-slot size kept dynamic, and stores each package as `compiled/<kind>.pt2` beside the
portable graphs; the manifest records its sha256 like every other member, and the torch
version and CPU it was built for. The quantized linears stay Strato ops inside the
compiled code (AOTInductor calls them through the dispatcher), so a loaded artifact runs
the same CPU GEMV kernels as in-process decoding.

A package is native code: `strato.load` verifies its hash with the rest of the archive
but runs it only when asked (`strato.load(path, compiled_code=True)`), and only on the
torch version and CPU capability it was built for; otherwise the portable graphs serve.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
import torch.fx as fx

from ..compiler.errors import StratoError

MEMBER = "compiled/{kind}.pt2"
EXAMPLE_BATCH, EXAMPLE_SLOTS, EXAMPLE_PROMPT = 2, 64, 3
"""Example sizes the step graphs are traced at (each kept dynamic: none is 0 or 1)."""


class CompiledCodeError(StratoError, RuntimeError):
    """Ahead-of-time compilation of a step graph failed, or its package cannot run here."""


def build_info() -> dict:
    """What a package is tied to: the torch build and the CPU's vector capability."""
    return {"torch_version": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def _example(kind: str, layout, dtype: torch.dtype) -> tuple:
    slots = EXAMPLE_SLOTS
    if layout.position_limit is not None:
        slots = min(slots, layout.position_limit)
    q_len = 1 if kind == "decode" else min(EXAMPLE_PROMPT, slots)
    ids = torch.zeros(EXAMPLE_BATCH, q_len, dtype=torch.long)
    pos = torch.zeros((), dtype=torch.long)
    mask = torch.ones(EXAMPLE_BATCH, slots, dtype=torch.long)
    keys, values = (torch.zeros(s, dtype=dtype) for s in layout.cache_shapes(EXAMPLE_BATCH, slots))
    return ids, pos, mask, keys, values


def compile_step(gm: fx.GraphModule, kind: str, layout) -> bytes:
    """The AOTInductor package (bytes) of one step graph, dynamic in batch, tokens (prefill)
    and cache slots."""
    auto = torch.export.Dim.AUTO
    tokens = {0: auto} if kind == "decode" else {0: auto, 1: auto}
    dynamic = (tokens, None, {0: auto, 1: auto}, {1: auto, 3: auto}, {1: auto, 3: auto})
    example = _example(kind, layout, getattr(torch, layout.dtype))
    with tempfile.TemporaryDirectory() as folder:
        target = str(Path(folder) / f"{kind}.pt2")
        try:
            with torch.no_grad():
                program = torch.export.export(gm, example, dynamic_shapes=dynamic, strict=False)
                torch._inductor.aoti_compile_and_package(program, package_path=target)
        except Exception as exc:
            raise CompiledCodeError(
                f"strato.export(compiled_code=True): AOTInductor could not compile the {kind} "
                f"step graph ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); export "
                "without compiled_code (the portable graphs still serve every shape)."
            ) from exc
        return Path(target).read_bytes()


class CompiledSteps:
    """Loaded step packages by kind ('prefill', 'decode'), extracted under a folder that
    lives as long as this object."""

    def __init__(self, path, packages: dict[str, bytes], info: dict) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="strato_aoti_")
        self.runners: dict = {}
        here = build_info()
        if info != here:
            warnings.warn(
                f"{path}: its compiled code was built for {info}, this process is {here}; "
                "the portable step graphs serve instead (re-export here for compiled speed).",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        for kind, data in packages.items():
            file = Path(self._folder.name) / f"{kind}.pt2"
            file.write_bytes(data)
            try:
                self.runners[kind] = torch._inductor.aoti_load_package(str(file))
            except Exception as exc:
                raise CompiledCodeError(
                    f"{path}: {MEMBER.format(kind=kind)} does not load ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:300]}); load with compiled_code=False to "
                    "serve the portable graphs."
                ) from exc
