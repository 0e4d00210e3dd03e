"""The Strategy: a frozen, validated description of how to compile and run a model.

Every field carries a docstring (the string literal under it); `Strategy.describe()`
prints them. Later features add their own fields here, each with behaviour behind it.
"""

from __future__ import annotations

import importlib
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from .errors import StrategyError, did_you_mean
from .mesh_config import Mesh, check_mesh
from .moe_config import ExpertParallel, check_moe
from .pipeline_parallel import Pipeline, check_pipeline
from .quantize_config import Quantize
from .recompute_config import Budget, Recompute, convert_recompute
from .tensor_parallel_config import TensorParallel, check_tensor_parallel
from .training_config import (  # noqa: F401  (names the field annotations resolve to)
    SGD,
    AdamW,
    Constant,
    LossScaling,
    Polynomial,
    WarmupCosine,
    WarmupLinear,
    suggest_kind,
)
from .zero_config import (
    NVMe,  # noqa: F401  (names the field annotations resolve to)
    check_non_negative_int,
    check_offload,
    check_positive_number,
    check_zero,
    convert_offload,
)


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str | bytes):
        return (value,)
    return tuple(value)


def _resolve_pass(value: Any):
    """A GraphPass, a decorated function, or an import path 'package.module:name'."""
    from .pass_manager import GraphPass, as_graph_pass

    if isinstance(value, GraphPass):
        return value
    if isinstance(value, str):
        module_name, sep, attr = value.partition(":")
        if not sep or not attr:
            raise StrategyError(
                f"Strategy.passes: {value!r} is not an import path; write 'package.module:function'."
            )
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise StrategyError(f"Strategy.passes: cannot import {value!r}: {exc}") from exc
        value = obj
    try:
        return as_graph_pass(value)
    except TypeError as exc:
        raise StrategyError(f"Strategy.passes: {exc}") from exc


def _convert_passes(value: Any) -> tuple:
    return tuple(_resolve_pass(v) for v in _as_tuple(value))


def _convert_disable(value: Any) -> tuple[str, ...]:
    names = _as_tuple(value)
    for name in names:
        if not isinstance(name, str):
            raise StrategyError(f"Strategy.disable: expected pass names (str), got {name!r}.")
    return names


def _check_optimizer(instance, attribute, value) -> None:
    if value is not None and not isinstance(value, AdamW | SGD):
        raise StrategyError(
            f"Strategy.optimizer: expected strato.AdamW(...), strato.SGD(...) or None (in "
            f"YAML/dicts a mapping whose 'kind' key names one: {{kind: AdamW, lr: 3e-4}}), "
            f"got {value!r}."
        )


def _check_schedule(instance, attribute, value) -> None:
    if not isinstance(value, Constant | WarmupLinear | WarmupCosine | Polynomial):
        raise StrategyError(
            "Strategy.schedule: expected strato.Constant, WarmupLinear, WarmupCosine or "
            "Polynomial (in YAML/dicts a mapping whose 'kind' key names one: {kind: "
            f"WarmupCosine, total_steps: 1000}}), got {value!r}."
        )


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _check_precision(instance, attribute, value) -> None:
    if value not in PRECISIONS:
        raise StrategyError(
            f"Strategy.precision: expected 'auto', 'fp32', 'bf16' or 'fp16', got {value!r}."
            f"{did_you_mean(str(value), PRECISIONS)}"
        )


def _check_batch_size(instance, attribute, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise StrategyError(
            f"Strategy.{attribute.name}: must be an integer >= 1 or None, got {value!r}."
        )
    if attribute.name == "train_batch_size" and value is not None and instance.micro_batch_size:
        per_rank = instance.micro_batch_size * instance.grad_accumulation
        if value % per_rank:
            raise StrategyError(
                f"Strategy.train_batch_size: {value} is not a multiple of micro_batch_size x "
                f"grad_accumulation = {instance.micro_batch_size} x {instance.grad_accumulation}"
                f" = {per_rank}: train_batch_size = micro_batch_size x grad_accumulation x "
                "data-parallel world size."
            )


def _check_loss_scaling(instance, attribute, value) -> None:
    if not isinstance(value, LossScaling):
        raise StrategyError(f"Strategy.loss_scaling: expected strato.LossScaling, got {value!r}.")


def _check_grad_accumulation(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise StrategyError(f"Strategy.grad_accumulation: must be an integer >= 1, got {value!r}.")


def _check_grad_clip(instance, attribute, value) -> None:
    if value is not None and (
        not isinstance(value, int | float) or isinstance(value, bool) or not value > 0
    ):
        raise StrategyError(f"Strategy.grad_clip: must be a number > 0 or None, got {value!r}.")


def _check_quantize(instance, attribute, value) -> None:
    if value is not None and not isinstance(value, Quantize):
        raise StrategyError(
            f"Strategy.quantize: expected strato.Quantize(...) or None, got {value!r}."
        )


INFERENCE_BACKENDS = ("fx", "inductor")


def _check_inference_backend(instance, attribute, value) -> None:
    if value not in INFERENCE_BACKENDS:
        raise StrategyError(
            f"Strategy.inference_backend: expected one of {', '.join(INFERENCE_BACKENDS)}, "
            f"got {value!r}."
        )
    if value == "inductor" and instance.zero == 3:
        raise StrategyError(
            "Strategy.inference_backend: 'inductor' does not run ZeRO stage-3 graphs yet (their "
            "gather ops talk to the training runtime); use 'fx' with zero=3."
        )


def _check_compiled_code(instance, attribute, value) -> None:
    if value is not None and not isinstance(value, bool):
        raise StrategyError(
            f"Strategy.compiled_code: expected true, false or null (the default), got {value!r}."
        )


def _check_fuse(instance, attribute, value) -> None:
    if not isinstance(value, bool):
        raise StrategyError(f"Strategy.fuse: expected true or false, got {value!r}.")


@attrs.frozen(kw_only=True)
class Strategy:
    """How to compile a model: which passes run, and with which settings."""

    passes: tuple = attrs.field(default=(), converter=_convert_passes)
    """Extra user passes, run after the built-in ones (ordered by their contracts).
    Each is a function decorated with `@strato.graph_pass` or an import path
    'package.module:function' (the form YAML files use)."""

    disable: tuple[str, ...] = attrs.field(default=(), converter=_convert_disable)
    """Names of passes to skip, built-in or user. A name that matches no pass is an error."""

    fuse: bool = attrs.field(default=False, validator=_check_fuse)
    """Fuse elementwise chains, row reductions (LayerNorm, RMSNorm, softmax, cross-entropy)
    and attention into generated Triton kernels (the 'fuse' pass). They run as Triton on
    CUDA and as their torch references on CPU; env STRATO_KERNELS=triton|reference overrides."""

    # ------------------------------------------------------------------ training
    optimizer: AdamW | SGD | None = attrs.field(default=None, validator=_check_optimizer)
    """The optimizer (strato.AdamW or strato.SGD). With one, `strato.compile` returns a
    training engine (backward/step/save_checkpoint/...); None compiles for inference."""

    schedule: Constant | WarmupLinear | WarmupCosine | Polynomial = attrs.field(
        factory=Constant, validator=_check_schedule
    )
    """Learning-rate schedule: a factor of the optimizer's lr per optimizer step."""

    precision: str = attrs.field(default="fp32", validator=_check_precision)
    """'auto', 'fp32', 'bf16' or 'fp16': matmul-like ops run in the low precision (casts
    inserted by the 'mixed_precision' pass), weights and optimizer states stay fp32. fp16 adds
    dynamic loss scaling (see loss_scaling). 'auto' is resolved at compile: bf16 where the
    model's device computes it natively (CUDA compute capability 8.0+, CPUs with AVX-512-BF16
    or AMX), else fp32; `explain()` shows the choice and why. An explicit bf16 where it is
    emulated trains, and warns once that fp32 is faster there."""

    loss_scaling: LossScaling = attrs.field(factory=LossScaling, validator=_check_loss_scaling)
    """Dynamic loss-scaling settings, used when precision is 'fp16'."""

    grad_accumulation: int = attrs.field(default=1, validator=_check_grad_accumulation)
    """Micro-steps per optimizer step: `engine.step()` updates on every n-th call, and
    data-parallel gradients are only communicated on that call."""

    grad_clip: float | None = attrs.field(default=None, validator=_check_grad_clip)
    """Clip gradients to this global L2 norm (over all parameters and ranks); None: no clipping."""

    recompute: Recompute | Budget | None = attrs.field(default=None, converter=convert_recompute)
    """Activation recomputation (pass `recompute`): 'full', 'selective', 'none',
    strato.Recompute(modules=[...], policy=..., offload=...) or strato.Budget('1.5GiB').
    None: only the model's own checkpoint regions (torch.utils.checkpoint, Hugging Face
    gradient checkpointing) are recomputed; 'none' turns those off too."""

    micro_batch_size: int | None = attrs.field(default=None, validator=_check_batch_size)
    """Samples each rank feeds per micro-step (DeepSpeed's train_micro_batch_size_per_gpu).
    Strato builds no data loader: this documents the recipe and is checked at compile against
    train_batch_size and the world size. None: not stated."""

    train_batch_size: int | None = attrs.field(default=None, validator=_check_batch_size)
    """Samples per optimizer step over all ranks (DeepSpeed's train_batch_size); at compile it
    must equal micro_batch_size x grad_accumulation x the data-parallel world size, or the
    compile fails showing the three numbers. None: not stated."""

    # ------------------------------------------------------------------ ZeRO
    zero: int = attrs.field(default=0, validator=check_zero)
    """ZeRO stage over the data-parallel ranks: 0 replicates everything; 1 shards optimizer
    states; 2 also gradients (reduce-scattered in buckets during backward); 3 also
    parameters (gathered per layer for forward and again for backward, as graph nodes)."""

    offload: Any = attrs.field(default=None, converter=convert_offload, validator=check_offload)
    """Where optimizer states live (and, at stage 3, parameter shards): None (with the
    parameters), 'cpu', or strato.NVMe('/folder') for memory-mapped files; the optimizer
    update runs where the states are."""

    zero_prefetch: int = attrs.field(default=1, validator=check_non_negative_int)
    """Stage 3: how many layer gathers are issued ahead of use, so communication overlaps
    compute, also from the end of forward into backward and from the update into the next
    forward (0: gather only when needed)."""

    zero_bucket_mb: float = attrs.field(default=4.0, validator=check_positive_number)
    """Stages 1-2 (and stage-3 small parameters): MiB of fp32 gradients per reduce-scatter
    bucket; smaller buckets start communicating earlier in backward (a bucket waits for
    every gradient in it, so one large bucket only communicates after backward)."""

    zero_small_param_threshold: int = attrs.field(default=0, validator=check_non_negative_int)
    """Stage 3: parameters with fewer elements stay whole on every rank (saves tiny
    gathers; their gradients and optimizer states are still sharded, as in stage 2)."""

    mesh: Mesh = attrs.field(factory=Mesh, validator=check_mesh)
    """How the ranks are arranged (strato.Mesh): ZeRO shards over `shard` and replicates
    across `replicate` (hybrid sharding); data parallelism (zero=0) spans the whole mesh.
    Default: every rank in one `shard` dimension."""

    tensor_parallel: TensorParallel | None = attrs.field(
        default=None, validator=check_tensor_parallel
    )
    """Tensor parallelism (strato.TensorParallel(size=..., sequence_parallel=..., plan=...)):
    attention heads, MLP features and the vocabulary split over the mesh's `tensor`
    dimension (pass `tensor_parallel`); its size sets `Mesh.tensor`. None: no tensor parallelism."""

    pipeline: Pipeline | None = attrs.field(default=None, validator=check_pipeline)
    """Pipeline parallelism (strato.Pipeline(stages=..., microbatches=..., schedule=...)):
    the training graph cut into stages (pass `pipeline_cut`) run as a micro-batch schedule
    over the mesh's `pipeline` dimension; its stages set `Mesh.pipeline`. Only
    `engine.train_step` drives it. None: no pipeline."""

    moe: ExpertParallel | None = attrs.field(default=None, validator=check_moe)
    """Expert parallelism for the model's strato.nn.MoE layers (strato.ExpertParallel(size=...)):
    each layer's experts split over expert groups carved from the data-parallel ranks,
    tokens sent to their experts by all-to-all (pass `moe_dispatch`). None: every rank
    runs every expert."""

    # ------------------------------------------------------------------ inference
    quantize: Quantize | None = attrs.field(default=None, validator=_check_quantize)
    """Quantize linear layers of the inference (eval) graph: strato.Quantize(weights='int8'
    or 'int4', ...). None keeps them float. Training graphs are never quantized."""

    inference_backend: str = attrs.field(default="fx", validator=_check_inference_backend)
    """How eval graphs run. 'fx': the transformed graph runs as Python, one call per node
    (no compile time). 'inductor': torch.compile compiles it on the first call (seconds to
    a minute; on CPU it needs a C++ compiler), removing the per-node Python overhead that
    dominates small-batch decoding; on CPU, quantized linears are first lowered to this
    CPU's kernels and weight layouts (pass lower_quantized_linears). Training graphs always
    run as FX."""

    compiled_code: bool | None = attrs.field(default=None, validator=_check_compiled_code)
    """Whether `generate` runs its prefill/decode step graphs as ahead-of-time compiled
    native code (AOTInductor, runtime/compiled_code.py): compiled once per model architecture
    and machine (about a minute), cached on disk, loaded in milliseconds after that. None
    (the default): yes, unless $STRATO_COMPILED_CODE=0; False: the portable FX graphs (no
    compile, slower decode). Where compiling fails, a warning names why and the portable
    graphs serve."""

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Strategy:
        """Build from plain data (as parsed from YAML); unknown keys are errors."""
        if isinstance(data, Mapping):
            from .deepspeed import looks_like_deepspeed

            fields = {f.name for f in attrs.fields(cls)}
            unknown = [k for k in data if k not in fields]
            if unknown and looks_like_deepspeed(data):
                raise StrategyError(
                    f"Strategy.from_dict: unknown field {unknown[0]!r}; this looks like a "
                    f"DeepSpeed config (keys {', '.join(map(repr, unknown[:4]))}). Read it with "
                    "strato.Strategy.from_deepspeed(config) (or pass the .json file to "
                    "strato.compile), which maps each key to its Strato field."
                )
        return config_from_dict(cls, data, path="Strategy")

    @classmethod
    def from_deepspeed(
        cls,
        source: str | Path | Mapping[str, Any],
        *,
        model: Any = None,
        world_size: int | None = None,
        auto: Mapping[str, Any] | None = None,
    ) -> Strategy:
        """The Strategy a DeepSpeed config (a JSON file or a dict) describes, with DeepSpeed's
        semantics. `model` and `world_size` resolve Hugging Face Trainer-style "auto" values;
        `auto` gives the others by dotted key ({"optimizer.params.lr": 3e-4}). Unsupported keys
        raise one error listing them all; keys without effect here warn once. For the full
        mapping use `strato.convert_deepspeed`, which also returns the report."""
        from .deepspeed import convert_deepspeed, warn_about_report

        strategy, report = convert_deepspeed(source, model=model, world_size=world_size, auto=auto)
        warn_about_report(report)
        return strategy

    @classmethod
    def from_file(
        cls, path: str | Path, *, model: Any = None, world_size: int | None = None
    ) -> Strategy:
        """A Strato YAML/JSON strategy or a DeepSpeed JSON config, told apart by content:
        what `strato.compile(model, "ds_config.json")` reads."""
        path = Path(path)
        if not path.is_file():
            raise StrategyError(
                f"strategy file {str(path)!r} does not exist; give a Strato YAML (.yaml/.yml) "
                "or a DeepSpeed / Strato JSON (.json) file."
            )
        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise StrategyError(f"strategy file {str(path)!r} does not parse: {exc}") from exc
        if not isinstance(data, Mapping):
            raise StrategyError(
                f"strategy file {str(path)!r} must hold a mapping of fields, got "
                f"{type(data).__name__}."
            )
        from .deepspeed import looks_like_deepspeed

        if looks_like_deepspeed(data):
            return cls.from_deepspeed(path, model=model, world_size=world_size)
        return cls.from_dict(data)

    @classmethod
    def from_yaml(cls, source: str | Path) -> Strategy:
        """Build from a YAML file path or a YAML string."""
        text = Path(source).read_text() if _looks_like_path(source) else str(source)
        data = yaml.safe_load(text) or {}
        if not isinstance(data, Mapping):
            raise StrategyError(
                f"Strategy YAML must be a mapping of fields, got {type(data).__name__}."
            )
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `from_dict` turns back into an equal Strategy."""
        return config_to_dict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML text (also written to `path` when given) that `from_yaml` reads back."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **changes: Any) -> Strategy:
        """A copy with some fields changed (validated like a new Strategy)."""
        unknown = set(changes) - {f.name for f in attrs.fields(type(self))}
        if unknown:
            _raise_unknown(type(self), sorted(unknown)[0], "Strategy")
        return attrs.evolve(self, **changes)

    @classmethod
    def describe(cls) -> str:
        """Every field with its default and docstring."""
        return describe_config(cls)


def _looks_like_path(source: str | Path) -> bool:
    if isinstance(source, Path):
        return True
    return "\n" not in source and source.endswith((".yaml", ".yml"))


# ---------------------------------------------------------------------- helpers
# Shared by Strategy and the nested config classes later features add (optimizer,
# schedule, quantization...), so that all of them parse, print and fail alike.


def _raise_unknown(cls: type, key: str, path: str) -> typing.NoReturn:
    valid = [f.name for f in attrs.fields(cls)]
    if path.endswith(f"(kind {cls.__name__})"):
        valid.append("kind")
    raise StrategyError(
        f"{path}: unknown field {key!r}.{did_you_mean(key, valid)} Valid fields: {', '.join(valid)}."
    )


def check_batch_sizes(strategy: Strategy, mesh_sizes: Mapping[str, int]) -> None:
    """DeepSpeed's identity train_batch_size = micro x accumulation x data-parallel size,
    checked once the mesh is known (at compile). The data-parallel size is replicate x
    shard: ranks along pipeline or tensor dimensions work on the same samples."""
    total, micro = strategy.train_batch_size, strategy.micro_batch_size
    if total is None:
        return
    accumulation = strategy.grad_accumulation
    data_parallel = mesh_sizes.get("replicate", 1) * mesh_sizes.get("shard", 1)
    world_size = math.prod(mesh_sizes.values())
    ranks = f"data-parallel size {data_parallel}"
    if world_size != data_parallel:
        ranks += f" (mesh replicate x shard, of {world_size} ranks)"
    if micro is None:
        if total % (accumulation * data_parallel) == 0:
            return
        detail = f"train_batch_size {total} is not divisible by grad_accumulation {accumulation}"
        detail += f" x {ranks}"
    elif total == micro * accumulation * data_parallel:
        return
    else:
        detail = (
            f"train_batch_size {total} != micro_batch_size {micro} x grad_accumulation "
            f"{accumulation} x {ranks} = {micro * accumulation * data_parallel}"
        )
    raise StrategyError(
        f"Strategy.train_batch_size: {detail}. Change one of the three (DeepSpeed: "
        "train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps), "
        "or run on the number of data-parallel ranks they were written for."
    )


def config_from_dict(cls: type, data: Mapping[str, Any], path: str) -> Any:
    """Build attrs class `cls` from `data`, recursing into nested attrs-typed fields."""
    if not isinstance(data, Mapping):
        raise StrategyError(f"{path}: expected a mapping of fields, got {data!r}.")
    fields = {f.name: f for f in attrs.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            _raise_unknown(cls, key, path)
        kwargs[key] = _value_from_data(hints.get(key), value, f"{path}.{key}")
    try:
        return cls(**kwargs)
    except StrategyError:
        raise
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"{path}: {exc}") from exc


def _value_from_data(hint: Any, value: Any, path: str) -> Any:
    """Turn a nested mapping into the attrs class its field is annotated with."""
    if not isinstance(value, Mapping):
        return value
    candidates = [hint]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        candidates = list(typing.get_args(hint))
    config_classes = [c for c in candidates if attrs.has(c)]
    if len(config_classes) == 1:
        if value.get("kind", config_classes[0].__name__) == config_classes[0].__name__:
            value = {k: v for k, v in value.items() if k != "kind"}  # as config_to_dict writes it
        return config_from_dict(config_classes[0], value, path)
    if not config_classes:
        return value
    names = [c.__name__ for c in config_classes]
    if "kind" not in value:
        hint = ""
        if "type" in value:  # DeepSpeed's {"type": ..., "params": {...}}
            hint = (
                f" {{'type': {value['type']!r}, 'params': ...}} is DeepSpeed's form: write "
                f"{{kind: <name>, <param>: ...}}, or read the whole config with "
                "strato.Strategy.from_deepspeed."
            )
            suggestion = suggest_kind(str(value["type"]), names)
            hint += suggestion
        raise StrategyError(
            f"{path}: a mapping here needs a 'kind' key naming its class, one of "
            f"{', '.join(names)} (e.g. {{kind: {names[0]}, ...}}).{hint}"
        )
    by_kind = {c.__name__.lower(): c for c in config_classes}
    kind = str(value["kind"]).lower()
    if kind not in by_kind:
        raise StrategyError(
            f"{path}.kind: unknown kind {value['kind']!r}.{suggest_kind(str(value['kind']), names)}"
            f" Valid kinds: {', '.join(names)}."
        )
    cls = by_kind[kind]
    rest = {k: v for k, v in value.items() if k != "kind"}
    return config_from_dict(cls, rest, f"{path} (kind {cls.__name__})")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain data for an attrs config; nested configs of a union carry their 'kind'."""
    out: dict[str, Any] = {}
    for f in attrs.fields(type(config)):
        out[f.name] = _value_to_data(getattr(config, f.name))
    return out


def _value_to_data(value: Any) -> Any:
    from .pass_manager import GraphPass

    if isinstance(value, GraphPass):
        return value.import_path()
    if attrs.has(type(value)):
        data = config_to_dict(value)
        return {"kind": type(value).__name__, **data}
    if isinstance(value, tuple | list):
        return [_value_to_data(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def describe_config(cls: type) -> str:
    """Field, default and docstring for each field of an attrs config class."""
    docs = field_docstrings(cls)
    lines = [f"{cls.__name__}: {(cls.__doc__ or '').strip()}"]
    for f in attrs.fields(cls):
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        lines.append(f"  {f.name} = {default!r}")
        for doc_line in docs.get(f.name, "").splitlines():
            lines.append(f"      {doc_line.strip()}")
    return "\n".join(lines)


def field_docstrings(cls: type) -> dict[str, str]:
    """The string literal written under each field in the class body."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = nxt.value.value
    return docs
