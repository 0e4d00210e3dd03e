"""Generate's step graphs as ahead-of-time compiled native code (AOTInductor): built once per
graph and machine, cached on disk, shipped in exported artifacts.

`compiled.generate` runs its prefill and decode step graphs as AOTInductor packages by
default (`Strategy(compiled_code=False)`, or STRATO_COMPILED_CODE=0 in the environment,
keeps the portable FX graphs). A package is compiled with every batch, token and
cache-slot size dynamic, and without its weights: they are handed to it from the graph's
own tensors when it loads (no copy), so one package serves every model of the same
architecture and an artifact stores each weight once. Packages live in the kernel cache
(codegen/cache.py's folder, $STRATO_CACHE_DIR) under `aoti/`, keyed by the graph's code,
its tensors' shapes and dtypes, the layout of the caches, the torch version, the CPU's
vector capability and the schemas of the Strato ops it calls; the first compile on a
machine takes about a minute (one line says so and where it caches), a later process
loads the package in milliseconds. The quantized linears stay Strato ops inside the
compiled code (AOTInductor calls them through the dispatcher), so the same CPU GEMV
kernels run as in the portable graphs.

When compiling fails (no C++ compiler, an op inductor cannot lower...), one warning names
the reason and the portable graphs serve that Generator from then on: generation is never
refused for want of compiled code. Strategies whose step graphs are not plain CPU graphs
(tensor parallelism's collectives, fuse=True's Triton kernels, inference_backend='inductor',
which torch.compiles them in-process) serve their graphs as before.

`strato.export` copies the cached packages into the artifact as `compiled/<kind>.pt2`, and
`strato.load` runs them by default when they were built for this torch version and CPU
(otherwise one warning, and the portable graphs serve). A package is native code, like a
pickle or a shared library: its sha256 is checked with the rest of the archive, which
catches corruption and edits, but only a trusted artifact should be loaded
(`strato.load(path, compiled_code=False)` never runs it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.fx as fx

from ..compiler.errors import StratoError

MEMBER = "compiled/{kind}.pt2"
EXAMPLE_BATCH, EXAMPLE_SLOTS, EXAMPLE_PROMPT = 2, 64, 3
"""Example sizes the step graphs are traced at (each kept dynamic: none is 0 or 1)."""
PACKAGE_FORMAT = "aoti-external-weights-1"
"""How packages are built (part of the cache key and of an artifact's manifest): weights
are not in the package but loaded from the graph's tensors."""
ENV = "STRATO_COMPILED_CODE"
"""Set to 0 to serve the portable step graphs unless code asks for compiled ones."""


class CompiledCodeError(StratoError, RuntimeError):
    """Ahead-of-time compilation of a step graph failed, or its package cannot run here."""


def build_info() -> dict:
    """What a package is tied to: the torch build and the CPU's vector capability."""
    return {"torch_version": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def enabled_by_default() -> bool:
    """Whether `compiled_code=None` means compiled code ($STRATO_COMPILED_CODE is not 0)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def packages_dir() -> Path:
    """Where compiled step packages are cached: the kernel cache's `aoti/` folder."""
    from ..codegen.cache import cache_dir

    return cache_dir() / "aoti"


def unsupported_reason(strategy, device: torch.device) -> str | None:
    """Why compiled step code does not apply to graphs of this strategy (None: it does)."""
    if device.type != "cpu":
        return f"the model is on {device.type} (compiled steps are built for CPU)"
    if strategy is None:
        return None
    if strategy.inference_backend == "inductor":
        return "inference_backend='inductor' compiles the step graphs in-process instead"
    if strategy.fuse:
        return "fuse=True step graphs call Triton kernels"
    if getattr(strategy, "tensor_parallel", None) is not None:
        return "tensor-parallel step graphs call collectives"
    return None


def missing_compiler() -> str | None:
    """Why inductor cannot build C++ here (None: a compiler is on PATH)."""
    compilers = (os.environ.get("CXX", ""), "g++", "clang++", "c++")
    if any(shutil.which(c) for c in compilers if c):
        return None
    return "no C++ compiler (g++, clang++, c++ or $CXX) is on PATH"


def _tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    return {**dict(gm.named_parameters()), **dict(gm.named_buffers())}


def step_key(gm: fx.GraphModule, kind: str, layout) -> str:
    """The cache key of a step graph's package (sha256, 24 hex digits)."""
    schemas = sorted(
        str(node.target._schema)
        for node in gm.graph.nodes
        if node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace == "strato"
    )
    tensors = [(n, str(t.dtype), tuple(t.shape), t.stride()) for n, t in _tensors(gm).items()]
    key = {
        "format": PACKAGE_FORMAT,
        "kind": kind,
        "code": gm.code,
        "tensors": tensors,
        "layout": layout.to_json(),
        "ops": sorted(set(schemas)),
        **build_info(),
    }
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:24]


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


def _compile(gm: fx.GraphModule, kind: str, layout, target: Path) -> None:
    """Write the AOTInductor package of one step graph to `target` (weights left out),
    dynamic in batch, tokens (prefill) and cache slots."""
    auto = torch.export.Dim.AUTO
    tokens = {0: auto} if kind == "decode" else {0: auto, 1: auto}
    dynamic = (tokens, None, {0: auto, 1: auto}, {1: auto, 3: auto}, {1: auto, 3: auto})
    example = _example(kind, layout, getattr(torch, layout.dtype))
    try:
        with torch.no_grad():
            program = torch.export.export(gm, example, dynamic_shapes=dynamic, strict=False)
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=str(target),
                inductor_configs={"aot_inductor.package_constants_in_so": False},
            )
    except Exception as exc:
        raise CompiledCodeError(
            f"AOTInductor could not compile the {kind} step graph ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''})"
        ) from exc


def cached_package(gm: fx.GraphModule, kind: str, layout) -> Path:
    """The cached package file of a step graph, compiled now if this machine has none."""
    folder = packages_dir()
    path = folder / f"{kind}-{step_key(gm, kind, layout)}.pt2"
    if path.exists():
        return path
    reason = missing_compiler()
    if reason:
        raise CompiledCodeError(reason)
    folder.mkdir(parents=True, exist_ok=True)
    # Compiled into a private file, then renamed: a concurrent process never reads half of one.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".compiling-") as tmp:
        target = Path(tmp) / path.name
        _compile(gm, kind, layout, target)
        os.replace(target, path)
    return path


def is_cached(gm: fx.GraphModule, kind: str, layout) -> bool:
    """Whether this machine's cache holds the step graph's package."""
    return (packages_dir() / f"{kind}-{step_key(gm, kind, layout)}.pt2").exists()


def first_compile_note(kinds) -> str:
    """The one line said before step graphs are compiled (not cached yet)."""
    return (
        f"strato: compiling generate's {' and '.join(kinds)} step graph"
        f"{'s' if len(kinds) > 1 else ''} to native code (AOTInductor; about a minute, once "
        f"per model architecture on this machine), cached in {packages_dir()}; "
        "Strategy(compiled_code=False) serves the portable graphs without compiling."
    )


class CompiledStep:
    """A loaded step package, run on the weights of `gm` (held, not copied): called with
    (ids, pos, attention_mask, keys, values), returns (logits, new keys, new values)."""

    def __init__(self, package: str | os.PathLike, gm: fx.GraphModule, *, weights: bool = True):
        self.package = Path(package)
        runner = torch._inductor.aoti_load_package(str(package))
        if weights:
            tensors = _tensors(gm)
            wanted = runner.get_constant_fqns()
            missing = [name for name in wanted if name not in tensors]
            if missing:
                raise CompiledCodeError(
                    f"{self.package.name} reads tensors {missing[:3]} the step graph does not "
                    "hold; it was built for another graph."
                )
            runner.load_constants(
                {name: tensors[name] for name in wanted}, check_full_update=True, user_managed=True
            )
            self._weights = tensors  # the package points at them: they live as long as it
        self._run = runner.loader.boxed_run  # without the per-call treespec parse of __call__

    def __call__(self, ids, pos, attention_mask, keys, values):
        return tuple(self._run([ids, pos, attention_mask, keys, values]))


def compile_steps(graphs: dict[str, fx.GraphModule], layout) -> dict[str, CompiledStep]:
    """CompiledSteps of generate's step graphs by kind, from the cache or compiled now (saying
    so in one line first); raises CompiledCodeError naming what failed."""
    new = [kind for kind, gm in graphs.items() if not is_cached(gm, kind, layout)]
    if new and missing_compiler():
        raise CompiledCodeError(missing_compiler())
    if new:
        warnings.warn(first_compile_note(new), stacklevel=4)
    steps = {}
    for kind, gm in graphs.items():
        path = cached_package(gm, kind, layout)
        try:
            steps[kind] = CompiledStep(path, gm)
        except CompiledCodeError:
            raise
        except Exception as exc:
            raise CompiledCodeError(
                f"the cached {path.name} does not load ({type(exc).__name__}: "
                f"{str(exc).strip()[:300]}); delete it to compile again"
            ) from exc
    return steps


class CompiledSteps:
    """An artifact's step packages loaded by kind ('prefill', 'decode'), extracted under a
    folder that lives as long as this object, run on the artifact's own weights."""

    def __init__(
        self, path, packages: dict[str, bytes], info: dict, graphs: dict[str, fx.GraphModule]
    ) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="strato_aoti_")
        self.runners: dict = {}
        info = dict(info or {})
        external = info.pop("package_format", None) == PACKAGE_FORMAT
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
                self.runners[kind] = CompiledStep(file, graphs[kind], weights=external)
            except Exception as exc:
                raise CompiledCodeError(
                    f"{path}: {MEMBER.format(kind=kind)} does not load ({type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}); "
                    "load with compiled_code=False to serve the portable graphs."
                ) from exc
