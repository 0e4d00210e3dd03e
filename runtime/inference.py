"""Export a compiled inference graph to a self-contained artifact, and load it back.

The artifact (by convention `*.strato`) is an uncompressed zip holding exactly:

- `manifest.json`: format name and version, torch/strato versions, the sha256 of each
  other member, the quantization record, and for causal LMs the generation cache layout
  and eos/pad defaults.
- `graph.json`: the FX graph in Strato's own JSON form (runtime/graph_json.py): one entry
  per node (op, name, target, args, kwargs). Call targets are ATen or `strato::` ops by
  their qualified name (e.g. 'aten::linear.default'), or a short allow-list of Python
  operators on sizes; values are JSON, with dtypes/devices/tuples tagged. Input/output
  pytree specs use torch's JSON treespec format; `inputs` states each input's dtype, shape
  and the range of each symbolic size (runtime/input_ranges.py); `weights` maps its tensor
  names to stored weights.
- `graphs/prefill.json`, `graphs/decode.json` (causal LMs): generate's step graphs.
- `weights.safetensors`: every tensor the graphs read (`get_attr`), each distinct one once.
- `compiled/prefill.pt2`, `compiled/decode.pt2` (causal LMs, by default): AOTInductor
  packages of the step graphs (runtime/compiled_code.py) for the exporting machine's torch
  and CPU, without weights (they run on `weights.safetensors`). `load` runs them by default
  where they were built for its torch and CPU, after the same hash check: a package is
  native code, so load only artifacts you trust (as with a pickle or a shared library), or
  pass `compiled_code=False`, which never runs it.
- `kernels/<op>.py` (graphs compiled with `fuse=True`): the generated kernel source of each
  fused op the graph calls; `graph.json`'s `kernels` holds each op's region (its ATen op
  list, see `codegen.region.region_to_json`).

`load` checks the member list, every hash and every op name before building anything,
and never unpickles: a file that is not such an artifact (a `torch.save` checkpoint, a
zip with extra members, edited JSON, weights or kernels) is refused with an ArtifactError.
The hashes catch corruption and edits made without rewriting the manifest; what makes
loading safe is that nothing in the file can name code to run beyond the allow-listed ops:
a kernel is registered only when its source is exactly the one this Strato generates for
its region (`kernels.fused.register_exported`), so the stored source is checked, never trusted.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch.utils import _pytree as pytree

from .graph_json import ArtifactError, graph_from_json, graph_to_json
from .input_ranges import cap_input_ranges, check_input

FORMAT = "strato-inference"
VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
"""Version 2 added the kernels/ members of fused graphs; 3 the graphs/ step graphs of
generate, each graph's map from its tensor names to stored weights, and input size ranges;
4 compiled packages that read their weights from weights.safetensors (an older Strato
would run them without weights, so it refuses the version)."""
MEMBERS = ("manifest.json", "graph.json", "weights.safetensors")
KERNEL_MEMBER = re.compile(r"kernels/[A-Za-z0-9_]+\.py")
GRAPH_MEMBER = re.compile(r"graphs/(prefill|decode)\.json")
COMPILED_MEMBER = re.compile(r"compiled/(prefill|decode)\.pt2")


# ---------------------------------------------------------------------- export


def export(
    engine,
    path: str | os.PathLike,
    *,
    generation: bool | None = None,
    compiled_code: bool | None = None,
) -> Path:
    """Write `engine`'s inference (eval-mode) graph and weights to one artifact file.

    For a Hugging Face causal LM (unless compiled with fuse=True, whose kernels fix the
    prompt length; or with `generation=True`) the artifact also holds the
    prefill and decode step graphs of `compiled.generate` (built now if not yet), so
    `strato.load(path).generate(...)` decodes with a KV cache; weights the graphs share are
    stored once. The step graphs compiled ahead of time for this CPU and torch
    (AOTInductor) go in too, so `strato.load(path)` decodes at compiled speed with no
    compile: they come from the on-disk cache `compiled.generate` fills (about a minute
    to compile where it has not run yet). `compiled_code=None` (default) adds them where
    they apply (see runtime/compiled_code.py; $STRATO_COMPILED_CODE=0 turns the default
    off), warning and leaving them out if compiling fails; True requires them (an error
    otherwise); False leaves them out. The file is written
    next to `path` and renamed into place, so a failed export never leaves a half-written
    artifact behind.
    """
    from .compiled_model import CompiledModel
    from .generate import generator_for
    from .kv_cache import GenerationError, check_causal_lm, position_limit

    if not isinstance(engine, CompiledModel):
        raise TypeError(f"strato.export takes a compiled model, got {type(engine).__name__}")
    graphs = {"graph.json": _batch_symbolic(engine, engine._graph_for(False))}
    extra: dict[str, Any] = {}
    fused = engine.strategy is not None and engine.strategy.fuse
    if fused and generation:
        raise ArtifactError(
            "strato.export(generation=True): fused kernels (Strategy.fuse=True) bake the "
            "prompt length into the step graphs, so no prefill graph would serve other "
            "prompts; export a model compiled without fuse for generation."
        )
    if generation is None and not fused or generation:
        try:
            check_causal_lm(engine.model)
        except GenerationError as exc:
            if generation:
                raise ArtifactError(f"strato.export(generation=True): {exc}") from exc
        else:
            runner = generator_for(engine)
            for kind, q_len in (("prefill", 2), ("decode", 1)):
                graphs[f"graphs/{kind}.json"] = runner.graph(q_len)._graph_for(False)
            config = getattr(engine.model, "generation_config", None)
            extra["generation"] = {
                "layout": runner.layout.to_json(),
                "eos_token_id": getattr(config, "eos_token_id", None),
                "pad_token_id": getattr(config, "pad_token_id", None),
            }
    for member, compiled in graphs.items():
        if compiled.ctx.records.get("lower_quantized_linears", {}).get("lowered"):
            raise ArtifactError(
                f"strato.export: the {member} graph was lowered to this machine's CPU kernels and "
                "layouts (Strategy(inference_backend='inductor'), pass lower_quantized_linears); "
                "those layouts are not portable. Export a model compiled with "
                "inference_backend='fx' and load it with strato.load(path, "
                "inference_backend='inductor')."
            )
    if compiled_code is None:
        compiled_code = _default_compiled_code(engine, "generation" in extra)
    if compiled_code and "generation" not in extra:
        raise ArtifactError(
            "strato.export(compiled_code=True): compiled code is built for generate's step "
            f"graphs, and this artifact of {type(engine.model).__name__} has none (a Hugging "
            "Face causal LM compiled without fuse has them)."
        )
    weights = _SharedWeights()
    members: dict[str, bytes] = {}
    kernels: dict[str, tuple[dict, str]] = {}
    limit = position_limit(getattr(engine.model, "config", None))
    for member, compiled in graphs.items():
        graph, tensors = graph_to_json(compiled.gm)
        if limit is not None:  # token and cache-slot sizes stop at the model's positions
            if member == "graph.json":
                tokens = [s for s in graph["inputs"] if s.get("dtype") in ("int64", "int32")]
                caps = {s["name"]: {1: limit} for s in tokens if len(s.get("shape", [])) >= 2}
            else:
                caps = {"ids": {1: limit}, "attention_mask": {1: limit}}
                caps.update({"keys": {3: limit}, "values": {3: limit}})
            cap_input_ranges(graph["inputs"], caps)
        graph["weights"] = {target: weights.add(target, t) for target, t in tensors.items()}
        graph_kernels = _fused_kernels(compiled.gm)
        if graph_kernels:
            graph["kernels"] = {name: region for name, (region, _) in graph_kernels.items()}
            kernels.update(graph_kernels)
        members[member] = json.dumps(graph, separators=(",", ":")).encode()
    sources = {f"kernels/{name}.py": source.encode() for name, (_, source) in kernels.items()}
    if compiled_code:
        packages = _compiled_packages(graphs, extra, required=compiled_code is True)
        sources.update(packages)
        if packages:
            from .compiled_code import PACKAGE_FORMAT, build_info

            extra["compiled_code"] = {**build_info(), "package_format": PACKAGE_FORMAT}
    weights_bytes = save_safetensors(weights.tensors)
    quant = graphs["graph.json"].ctx.records.get("quantize", {})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": torch.__version__,
        "strato_version": _strato_version(),
        "model": type(engine.model).__name__,
        "files": {
            **{member: hashlib.sha256(data).hexdigest() for member, data in members.items()},
            "weights.safetensors": hashlib.sha256(weights_bytes).hexdigest(),
            **{member: hashlib.sha256(data).hexdigest() for member, data in sources.items()},
        },
        "quantize": {k: quant[k] for k in ("scheme", "bytes_before", "bytes_after") if k in quant},
        **extra,
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=1))
            for member, data in members.items():
                zf.writestr(member, data)
            zf.writestr("weights.safetensors", weights_bytes)
            for member, data in sources.items():
                zf.writestr(member, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _default_compiled_code(engine, generation: bool) -> bool | str:
    """What export(compiled_code=None) does: 'if-possible' where step graphs exist and
    compiled code applies to them, else False."""
    from .compiled_code import enabled_by_default, unsupported_reason

    if not generation or not enabled_by_default():
        return False
    device = next(iter(engine.model.parameters())).device
    return "if-possible" if unsupported_reason(engine.strategy, device) is None else False


def _compiled_packages(graphs: dict, extra: dict, *, required: bool) -> dict[str, bytes]:
    """{member: package bytes} of the step graphs, from the on-disk cache (compiled where
    missing). If compiling fails: an ArtifactError when required, else a warning and {}."""
    import warnings

    from .compiled_code import CompiledCodeError, cached_package, first_compile_note, is_cached
    from .kv_cache import CacheLayout

    layout = CacheLayout.from_json(extra["generation"]["layout"])
    steps = {kind: graphs[f"graphs/{kind}.json"].gm for kind in ("prefill", "decode")}
    new = [kind for kind, gm in steps.items() if not is_cached(gm, kind, layout)]
    if new:
        warnings.warn(first_compile_note(new), stacklevel=4)
    try:
        return {
            f"compiled/{kind}.pt2": cached_package(gm, kind, layout).read_bytes()
            for kind, gm in steps.items()
        }
    except CompiledCodeError as exc:
        if required:
            raise ArtifactError(
                f"strato.export(compiled_code=True): {exc}; export without compiled_code (the "
                "portable graphs still serve every shape)."
            ) from exc
        warnings.warn(
            f"strato.export: the artifact holds no compiled code ({exc}); it serves with the "
            "portable graphs. Pass compiled_code=False to skip compiling.",
            RuntimeWarning,
            stacklevel=3,
        )
        return {}


def _batch_symbolic(engine, compiled):
    """The eval graph, or, when export fixed its batch to the example's 1 (it treats size 1
    apart), the same graph captured again from the example repeated to 2 rows, so the
    artifact serves every batch size (the compiled model itself captures again on demand)."""
    from ..compiler.capture import INPUT_VALUES
    from .calls import bind_call, capture_defaults

    captured = compiled.gm.meta.get(INPUT_VALUES, {})
    fixed_one = [
        v
        for v in captured.values()
        if isinstance(v, torch.Tensor)
        and v.dim()
        and isinstance(v.shape[0], int)
        and v.shape[0] == 1
    ]
    if not fixed_one or engine._sharding_pass():
        return compiled

    def doubled(value):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 1:
            return value.expand(2, *value.shape[1:]).clone()
        return value

    ctx = compiled.ctx
    args = pytree.tree_map(doubled, tuple(ctx.example_args))
    kwargs = pytree.tree_map(doubled, dict(ctx.example_kwargs))
    call = bind_call(engine.model, args, kwargs, capture_defaults(engine.model))
    return engine._build_graph(False, call)


class _SharedWeights:
    """The tensors of every exported graph, each distinct one stored once (by content: the
    graphs of one model share their float and packed weights), under its first name."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_content: dict[tuple, str] = {}
        self._by_storage: dict[tuple, str] = {}

    def add(self, target: str, tensor: torch.Tensor) -> str:
        tensor = tensor.detach()
        where = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if where in self._by_storage:
            return self._by_storage[where]
        # safetensors wants distinct, contiguous storages: tied tensors are written once each.
        copy = tensor.cpu().contiguous().clone()
        raw = copy.reshape(-1).view(torch.uint8).numpy()
        content = (str(copy.dtype), tuple(copy.shape), hashlib.sha256(raw).hexdigest())
        if content not in self._by_content:
            name = target
            while name in self.tensors:  # another graph's different tensor of the same name
                name += "_"
            self._by_content[content] = name
            self.tensors[name] = copy
        self._by_storage[where] = self._by_content[content]
        return self._by_content[content]


def _fused_kernels(gm: fx.GraphModule) -> dict[str, tuple[dict, str]]:
    """{op name: (region JSON, kernel source)} of the generated fused ops `gm` calls."""
    from ..codegen.region import region_to_json
    from ..kernels.fused import fused_region, fused_source

    kernels = {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        namespace, _, rest = target.name().partition("::")
        name = rest.partition(".")[0]
        region = fused_region(name) if namespace == "strato" else None
        if region is not None and name not in kernels:
            kernels[name] = (region_to_json(region), fused_source(region))
    return kernels


def _strato_version() -> str:
    from .. import __version__

    return __version__


# ---------------------------------------------------------------------- load


def read_artifact(
    path: str | os.PathLike,
) -> tuple[dict, dict[str, dict], dict[str, torch.Tensor], dict[str, str]]:
    """(manifest, graphs by member name, tensors, kernel sources by member name) of a
    verified artifact; raises ArtifactError otherwise."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(
            f"strato.load: {path} does not exist (no such file); give the path strato.export wrote."
        )
    if path.is_dir():
        raise ArtifactError(
            f"strato.load: {path} is a folder; give the artifact file strato.export wrote "
            "(e.g. model.strato), not a checkpoint or save_pretrained folder."
        )
    if not zipfile.is_zipfile(path):
        raise ArtifactError(
            f"{path}: not a Strato inference artifact (strato.export writes a zip archive "
            "with a manifest; this file is not one). Checkpoints load with "
            "engine.load_checkpoint, Hugging Face weights with from_pretrained."
        )
    try:
        return _read_verified(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise ArtifactError(
            f"{path}: the archive is corrupted ({type(exc).__name__}: {exc})."
        ) from exc


def _read_verified(
    path: Path,
) -> tuple[dict, dict[str, dict], dict[str, torch.Tensor], dict[str, str]]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pickles = [n for n in names if n.endswith((".pkl", ".pickle")) or "data/" in n]
        if pickles:
            raise ArtifactError(
                f"{path}: refusing to load: it contains {pickles[0]!r}, a pickle (as torch.save "
                "writes). Strato artifacts hold only JSON and safetensors; export with strato.export."
            )
        kernel_members = sorted(n for n in names if KERNEL_MEMBER.fullmatch(n))
        graph_members = sorted(n for n in names if GRAPH_MEMBER.fullmatch(n))
        compiled_members = sorted(n for n in names if COMPILED_MEMBER.fullmatch(n))
        optional = [*kernel_members, *graph_members, *compiled_members]
        if sorted(names) != sorted([*MEMBERS, *optional]):
            raise ArtifactError(
                f"{path}: not a Strato inference artifact: members {sorted(names)}, "
                f"expected exactly {list(MEMBERS)} (and kernels/<op>.py sources, "
                "graphs/<name>.json step graphs, compiled/<name>.pt2 compiled code)."
            )
        data = {name: zf.read(name) for name in [*MEMBERS, *optional]}
    try:
        manifest = json.loads(data["manifest.json"])
    except ValueError as exc:
        raise ArtifactError(f"{path}: manifest.json is not valid JSON ({exc}).") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: manifest.json does not declare format {FORMAT!r}.")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{path}: artifact format version {manifest.get('version')!r}; this Strato reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}."
        )
    files = manifest.get("files", {})
    for kind, pattern, present in (
        ("kernel sources", KERNEL_MEMBER, kernel_members),
        ("step graphs", GRAPH_MEMBER, graph_members),
        ("compiled code", COMPILED_MEMBER, compiled_members),
    ):
        listed = sorted(n for n in files if pattern.fullmatch(str(n)))
        if listed != present:
            raise ArtifactError(
                f"{path}: {kind} {present} do not match the manifest's {listed}; "
                "the archive was modified. Re-export the model."
            )
    for name in [*MEMBERS[1:], *optional]:
        expected = files.get(name)
        actual = hashlib.sha256(data[name]).hexdigest()
        if actual != expected:
            raise ArtifactError(
                f"{path}: {name} is corrupted or was modified: sha256 {actual[:16]}..., manifest "
                f"says {str(expected)[:16]}.... Re-export the model."
            )
    try:
        graphs = {name: json.loads(data[name]) for name in ["graph.json", *graph_members]}
        tensors = load_safetensors(data["weights.safetensors"])
        sources = {name: data[name].decode() for name in kernel_members}
    except Exception as exc:
        raise ArtifactError(f"{path}: cannot parse the graph, weights or kernels ({exc}).") from exc
    manifest = {**manifest, "_compiled": {name: data[name] for name in compiled_members}}
    return manifest, graphs, tensors, sources


def register_kernels(path, graphs: dict[str, dict], sources: dict[str, str]) -> None:
    """Register the fused ops the artifact's graphs call from their regions and sources."""
    from ..codegen.region import RegionFormatError, region_from_json
    from ..kernels.fused import KernelMismatchError, register_exported

    regions: dict = {}
    for graph in graphs.values():
        found = graph.get("kernels") or {}
        if not isinstance(found, dict):
            raise ArtifactError(f"{path}: graph.json's kernels are malformed. Re-export the model.")
        regions.update(found)
    if sorted(f"kernels/{n}.py" for n in regions) != sorted(sources):
        raise ArtifactError(
            f"{path}: graph.json's kernels {sorted(regions)} do not match the kernel sources "
            f"{sorted(sources)} in the archive. Re-export the model."
        )
    for name, data in regions.items():
        member = f"kernels/{name}.py"
        try:
            register_exported(name, region_from_json(data), sources[member])
        except (RegionFormatError, KernelMismatchError) as exc:
            raise ArtifactError(
                f"{path}: {member}: {exc}; refusing to load it. Re-export the model with this Strato."
            ) from exc


class LoadedModel(torch.nn.Module):
    """A model loaded from an artifact: call it like the compiled model it was exported from;
    `generate` decodes with a KV cache when the artifact holds step graphs (causal LMs)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        manifest: dict,
        inputs: list[dict],
        run: Callable | None = None,
        lowering: dict | None = None,
        steps: dict[str, LoadedModel] | None = None,
    ) -> None:
        super().__init__()
        self.gm = gm
        self.manifest = manifest
        self.inputs = inputs
        self.lowering = dict(lowering or {})
        """What lower_quantized_linears did when loaded with inference_backend='inductor'."""
        self._run = gm if run is None else run
        self._signature = inspect.signature(gm.forward)
        self.steps = dict(steps or {})
        """The prefill and decode step graphs of `generate`, each a LoadedModel."""
        self._generator = None
        self.eval()

    def forward(self, *args, **kwargs):
        self._check_inputs(args, kwargs)
        with torch.no_grad():
            return self._run(*args, **kwargs)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **options):
        """Token ids [batch, prompt + new] continuing `input_ids`, as the exported model's
        `compiled.generate` (same options; eos/pad ids default to its generation_config)."""
        from .generate import Generator, run_generation
        from .kv_cache import CacheLayout

        generation = self.manifest.get("generation")
        if not generation or sorted(self.steps) != ["decode", "prefill"]:
            raise ArtifactError(
                f"loaded model: this artifact of {self.manifest.get('model')} holds no generation "
                "step graphs; export a Hugging Face causal LM (strato.export(compiled, path)) "
                "to generate from the file."
            )
        if self._generator is None:
            layout = CacheLayout.from_json(generation["layout"])
            self._generator = Generator.serving(layout, self.steps)
        defaults = {k: generation.get(k) for k in ("eos_token_id", "pad_token_id")}
        return run_generation(self, self._generator, defaults, input_ids, max_new_tokens, **options)

    def _check_inputs(self, args, kwargs) -> None:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"loaded model: {exc}; it takes {list(self._signature.parameters)}"
            ) from exc
        leaves = pytree.tree_leaves(list(bound.arguments.values()))
        if len(leaves) != len(self.inputs):
            return  # the graph's own pytree flattening reports the mismatch
        for spec, value in zip(self.inputs, leaves):
            if "shape" in spec and isinstance(value, torch.Tensor):
                check_input(spec, value)

    @property
    def quantization(self) -> dict:
        return dict(self.manifest.get("quantize", {}))


def _for_inductor(gm: fx.GraphModule, inputs: list[dict]) -> tuple[fx.GraphModule, Callable, dict]:
    """Lower the quantized linears for this CPU (when every input shape is fixed, so the
    graph's shapes can be propagated) and wrap the graph in torch.compile."""
    from ..compiler.context import CompileContext
    from ..compiler.strategy import Strategy
    from ..passes.annotate import fill_fake_values
    from ..passes.lower_quantized import lower_quantized_linears
    from .compiled_model import graph_runner

    ctx = CompileContext(strategy=Strategy(inference_backend="inductor"), model=gm, training=False)
    tensors = [spec for spec in inputs if "shape" in spec]
    if all(None not in spec["shape"] for spec in tensors):
        # Non-tensor inputs (flags export specialised away) propagate as None.
        ctx.example_args = tuple(
            torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
            if "shape" in spec
            else None
            for spec in inputs
        )
        try:
            fill_fake_values(gm, ctx)
        except Exception as exc:  # a graph that computes with a non-tensor input
            ctx.record("lower_quantized_linears", skipped=f"shapes not propagated ({exc})")
        else:
            gm = lower_quantized_linears(gm, ctx)
    else:
        ctx.record("lower_quantized_linears", skipped="input shapes are not all fixed")
    return gm, graph_runner(gm, ctx), ctx.records["lower_quantized_linears"]


def load(
    path: str | os.PathLike, inference_backend: str = "fx", *, compiled_code: bool | None = None
) -> LoadedModel:
    """Verify and load an artifact written by `strato.export`; nothing is unpickled.

    The artifact's ahead-of-time compiled step graphs, where it has them, run `generate`
    by default (`compiled_code=None`, unless $STRATO_COMPILED_CODE=0), when they were built
    for this torch and CPU; otherwise one warning names the difference and the portable
    graphs serve. They are native code, verified by hash like the weights: load only
    artifacts you trust, or pass `compiled_code=False`, which never runs them (True: they
    must be there). `inference_backend='inductor'` serves the graphs that run no compiled
    code as Strategy(inference_backend='inductor') would: quantized linears lowered to this
    machine's kernels, then torch.compile (on the first call)."""
    from ..compiler.strategy import INFERENCE_BACKENDS

    if inference_backend not in INFERENCE_BACKENDS:
        raise ValueError(
            f"strato.load: inference_backend must be one of {', '.join(INFERENCE_BACKENDS)}, "
            f"got {inference_backend!r}."
        )
    manifest, graphs, tensors, sources = read_artifact(path)
    packages = manifest.pop("_compiled")
    register_kernels(path, graphs, sources)
    if compiled_code and not packages:
        raise ArtifactError(
            f"strato.load(compiled_code=True): {path} holds no compiled code; export it with "
            "strato.export(compiled, path, compiled_code=True)."
        )
    if compiled_code is None:
        from .compiled_code import enabled_by_default

        compiled_code = bool(packages) and enabled_by_default()
    built = {}
    for member, graph in graphs.items():
        try:
            gm = graph_from_json(graph, tensors)
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: {member}: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"{path}: {member} is malformed ({type(exc).__name__}: {exc})."
            ) from exc
        built[member] = gm
    compiled = None
    if compiled_code:
        from .compiled_code import CompiledSteps

        kinds = {COMPILED_MEMBER.fullmatch(n).group(1): data for n, data in packages.items()}
        step_gms = {kind: built[f"graphs/{kind}.json"] for kind in kinds}
        compiled = CompiledSteps(path, kinds, manifest.get("compiled_code"), step_gms)
    loaded = {}
    for member, gm in built.items():
        inputs = graphs[member].get("inputs", [])
        kind = member.removeprefix("graphs/").removesuffix(".json")
        if compiled is not None and kind in compiled.runners:
            loaded[member] = (gm, inputs, compiled.runners[kind], None)
        elif inference_backend == "inductor":
            gm, run, lowering = _for_inductor(gm, inputs)
            loaded[member] = (gm, inputs, run, lowering)
        else:
            loaded[member] = (gm, inputs, None, None)
    steps = {}
    for member, (gm, inputs, run, lowering) in loaded.items():
        kind = member.removeprefix("graphs/").removesuffix(".json")
        if member != "graph.json":
            steps[kind] = LoadedModel(gm, manifest, inputs, run=run, lowering=lowering)
            steps[kind].compiled_code = compiled  # keeps its extracted packages alive
    gm, inputs, run, lowering = loaded["graph.json"]
    return LoadedModel(gm, manifest, inputs, run=run, lowering=lowering, steps=steps)


def artifact_bytes(path: str | os.PathLike) -> int:
    """Size of an artifact on disk."""
    return Path(path).stat().st_size


__all__ = [
    "ArtifactError",
    "LoadedModel",
    "export",
    "load",
    "read_artifact",
    "register_kernels",
    "artifact_bytes",
]
