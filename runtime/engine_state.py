"""What `TrainingEngine.save_checkpoint` / `load_checkpoint` / `full_state_dict` /
`save_pretrained` do, for any strategy, through the layout maps only.

- Every rank must call them at the same point: each starts with a monitored barrier that
  fails within `BARRIER_TIMEOUT_S` on a rank that waits for others, naming the ranks that
  did not arrive (instead of hanging until the process group's timeout).
- A save snapshots this rank's pieces and hands them to a background writer
  (runtime/checkpoint.py); the next save, a load or `wait_for_checkpoint()` waits for it.
- A load reads and checks everything first (names, global shapes, dtypes, the optimizer
  kind, every file's sha256, the pieces this rank's layout needs), agrees with every rank
  that all of them succeeded, and only then touches the model, the optimizer and the engine.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..compiler.layout import describe
from . import checkpoint, collectives
from .checkpoint import CheckpointError
from .train_state import ShardedState, gather_full, manager_layout, needed_piece

if TYPE_CHECKING:
    from .engine import TrainingEngine

BARRIER_TIMEOUT_S = float(os.environ.get("STRATO_CHECKPOINT_BARRIER_TIMEOUT_S", 30))
"""How long a rank waits at the start of a checkpoint call for the others to arrive."""


def arrive(what: str) -> None:
    """Every rank must reach `what` together: fail fast, naming the ranks that did not."""
    try:
        collectives.monitored_barrier(BARRIER_TIMEOUT_S)
    except RuntimeError as exc:
        text = str(exc)
        ranks = sorted({int(r) for r in re.findall(r"\d+", _ranks_part(text))})
        missing = f"rank(s) {ranks}" if ranks else "some ranks"
        raise CheckpointError(
            f"{what} must be called on every rank at the same point (not under `if rank == "
            f"0:`): {missing} did not arrive within {BARRIER_TIMEOUT_S:.0f} s on rank "
            f"{collectives.rank()}. (gloo: {text.splitlines()[0][:300]})"
        ) from exc


def _ranks_part(text: str) -> str:
    """The rank list of gloo's monitored_barrier error ('Ranks 1, 3 failed to pass ...')."""
    match = re.search(r"[Rr]anks? ([\d, ]+) failed to pass", text)
    return match.group(1) if match else ""


def _all_ok(ok: bool) -> list[int]:
    """The ranks where `ok` is False (every rank calls this)."""
    world = collectives.world_size()
    if world == 1:
        return [] if ok else [0]
    device = collectives.device_of(None)  # NCCL takes CUDA tensors only
    flags = torch.zeros(world, dtype=torch.int64, device=device)
    mine = torch.tensor([int(ok)], dtype=torch.int64, device=device)
    collectives.all_gather_into_tensor(flags, mine)
    return [r for r, f in enumerate(flags.tolist()) if not f]


# ---------------------------------------------------------------------- saving


def save(engine: TrainingEngine, path: str | Path, keep_last: int, async_save: bool) -> Path:
    if engine.micro_step != 0 or engine._backward_pending:
        raise CheckpointError(
            "save_checkpoint in the middle of a gradient accumulation would lose the "
            "accumulated gradients; save right after an engine.step() that returned True."
        )
    if keep_last < 1:
        raise CheckpointError(f"save_checkpoint: keep_last must be >= 1, got {keep_last}.")
    arrive("save_checkpoint")
    root, step = Path(path), engine.global_step
    rank, world = collectives.rank(), collectives.world_size()
    error: CheckpointError | None = None
    try:
        wait_for_save(engine)  # the previous save, which may have failed on this rank
        if rank == 0:
            checkpoint.prepare_folder(root, step)
    except CheckpointError as exc:
        error = exc
    except OSError as exc:
        error = CheckpointError(f"save_checkpoint: cannot create {root}: {exc}")
    failed = _all_ok(error is None)  # every rank learns whether any failed: no one hangs
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(
            f"save_checkpoint: rank(s) {failed} failed (see their errors); nothing was saved."
        )
    layouts, aliases = engine.layout()
    state = engine.manager.state_dict(layouts, aliases)
    pieces: dict[str, dict[str, Any]] = {}
    for name, layout in state.layouts.items():
        spans = layout.intervals()
        if layout.writes and spans:
            pieces[name] = {
                "shape": list(layout.shape),
                "dtype": str(state.tensors[name].dtype).removeprefix("torch."),
                "intervals": [list(s) for s in spans],
                **({"follows": state.follows[name]} if name in state.follows else {}),
            }
    tensors = dict(state.tensors)
    for key, value in _rng_tensors().items():
        tensors[f"rng/{rank}/{key}"] = value
        pieces[f"rng/{rank}/{key}"] = {}
    snapshot = checkpoint.snapshot(tensors, pieces)
    metadata = _engine_metadata(engine, state, layouts) if rank == 0 else None
    job = checkpoint.SaveJob(root, step, rank, world, pieces, snapshot, metadata, keep_last)
    job.start()
    engine._pending_save = job
    _in_flight.add(job)
    if not async_save:
        wait_for_save(engine)
        collectives.barrier()  # rank 0 has published: every rank may read it now
    return job.folder


_in_flight: set[checkpoint.SaveJob] = set()
"""Saves of every engine in this process not yet waited for: a load waits for them all (it
may read what another engine is still writing)."""


def wait_for_save(engine: TrainingEngine) -> Path | None:
    """Wait for this rank's save in progress (rank 0: until published); its folder."""
    job = getattr(engine, "_pending_save", None)
    if job is None:
        return None
    engine._pending_save = None
    _in_flight.discard(job)
    folder = job.wait()
    engine._last_save_seconds = job.seconds
    return folder


def _wait_for_other_engines() -> None:
    for job in list(_in_flight):
        job.join()


def _engine_metadata(engine: TrainingEngine, state: ShardedState, layouts) -> dict[str, Any]:
    model = engine.model
    config = getattr(model, "config", None)
    hf_config = None
    if config is not None and hasattr(config, "to_json_string"):
        hf_config = json.loads(config.to_json_string(use_diff=False))
        hf_config["architectures"] = [type(model).__name__]
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    return {
        "global_step": engine.global_step,
        "skipped_steps": engine.skipped_steps,
        "loss_scaler": engine.scaler.state_dict() if engine.scaler is not None else None,
        "aliases": state.metadata.get("aliases", {}),
        "optimizer": {
            "type": state.metadata.get("optimizer"),
            "scalars": state.metadata.get("optimizer_scalars", {}),
        },
        "layout": {name: describe(layout) for name, layout in layouts.items()},
        "python_rng": _python_rng_state(),
        "strategy": engine.strategy.to_yaml(),
        "torch_version": torch.__version__,
        "hf_config": hf_config,
        "hf_generation_config": (
            generation.to_dict() if generation is not None and can_generate() else None
        ),
    }


# ---------------------------------------------------------------------- loading


def load(engine: TrainingEngine, path: str | Path) -> int:
    arrive("load_checkpoint")
    error: CheckpointError | None = None
    try:
        wait_for_save(engine)
        _wait_for_other_engines()  # (their failures are theirs to report)
    except CheckpointError as exc:
        error = exc
    # Every rank's own save is written (rank 0's published) before anyone reads.
    _all_ok(error is None)
    plan = None
    if error is None:
        try:
            plan = _read_for_this_rank(engine, path)
        except CheckpointError as exc:
            error = exc
    failed = _all_ok(error is None)
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(
            f"load_checkpoint: rank(s) {failed} could not read {path} (see their errors); "
            "nothing was loaded on any rank."
        )
    assert plan is not None
    state, metadata, rng = plan
    engine.manager.load_state_dict(state)
    engine.global_step = int(metadata["global_step"])
    engine.skipped_steps = int(metadata.get("skipped_steps", 0))
    if engine.scaler is not None and metadata.get("loss_scaler"):
        engine.scaler.load_state_dict(metadata["loss_scaler"])
    if rng is not None:
        _set_rng_tensors(rng)
    else:
        warnings.warn(
            f"load_checkpoint: {path} has no RNG state for rank {collectives.rank()} (saved "
            f"with {metadata.get('world_size')} ranks): this rank keeps its current RNG, so "
            "dropout masks will not repeat the original run.",
            stacklevel=3,
        )
    if collectives.rank() == 0 and metadata.get("python_rng") is not None:
        _set_python_rng_state(metadata["python_rng"])
    engine.micro_step = 0
    engine._backward_pending = False
    return engine.global_step


def _read_for_this_rank(engine: TrainingEngine, path: str | Path):
    """Everything this rank will load, read and checked; nothing changed yet."""
    folder = checkpoint.resolve(path)
    metadata = checkpoint.read_metadata(folder)
    layouts, _ = engine.layout()
    saved = metadata["tensors"]
    _check_same_model(folder, saved, layouts)
    optimizer = engine.manager.optimizer
    saved_kind = metadata["optimizer"]["type"]
    if saved_kind != type(optimizer).__name__:
        raise CheckpointError(
            f"load_checkpoint: {folder} holds {saved_kind} optimizer states; this engine's "
            f"optimizer is {type(optimizer).__name__}: the states cannot be mapped. Resume with "
            f"Strategy(optimizer=strato.{saved_kind}(...)) or start the optimizer afresh."
        )
    optimized = {n for g in optimizer.param_groups for n in g["names"]}
    # A pipeline rank updates only its stages' parameters: the others' states are theirs.
    elsewhere = {n for n, lay in layouts.items() if not lay.holds_full and not lay.intervals()}
    foreign = sorted(
        {n.removeprefix("optim/").rpartition("/")[0] for n in saved if n.startswith("optim/")}
        - optimized
        - elsewhere
    )
    if foreign:
        raise CheckpointError(
            f"load_checkpoint: {folder} has optimizer states for {foreign[:5]}, which this "
            "engine's optimizer does not update (frozen now, or unused by the graph)."
        )
    reader = checkpoint.TensorReader(folder, metadata)
    state = ShardedState({}, {}, metadata={"optimizer_scalars": metadata["optimizer"]["scalars"]})
    for name, entry in saved.items():
        if name.startswith("optim/") and name[6:].rpartition("/")[0] not in optimized:
            continue  # another stage's parameter
        follows = entry.get("follows")
        spans, shape = needed_piece(layouts, name, follows, entry)
        state.tensors[name] = reader.read(name, spans).view(shape)
        if name.startswith("model/"):
            state.layouts[name] = layouts[name.removeprefix("model/")]
        if follows is not None:
            state.follows[name] = follows
    rng_entry = metadata.get("rng", {}).get(str(collectives.rank()))
    rng = None
    if rng_entry is not None:
        read = reader.read_file(rng_entry["file"], rng_entry["keys"])
        rng = {k.rpartition("/")[2]: v for k, v in read.items()}
    return state, metadata, rng


def _check_same_model(folder: Path, saved: dict[str, Any], layouts) -> None:
    saved_model = {n.removeprefix("model/"): e for n, e in saved.items() if n.startswith("model/")}
    missing = [n for n in layouts if n not in saved_model]
    unexpected = [n for n in saved_model if n not in layouts]
    differ = [
        f"{n}: saved {tuple(saved_model[n]['shape'])} {saved_model[n]['dtype']}, model "
        f"{layouts[n].shape} {layouts[n].dtype}"
        for n in layouts
        if n in saved_model
        and (
            tuple(saved_model[n]["shape"]) != layouts[n].shape
            or saved_model[n]["dtype"] != layouts[n].dtype
        )
    ]
    if missing or unexpected or differ:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if differ:
            parts.append("shapes/dtypes differ: " + "; ".join(differ[:5]))
        raise CheckpointError(
            f"load_checkpoint: {folder} does not fit this model/strategy (a checkpoint of "
            f"another model?): {', '.join(parts)}. Nothing was changed."
        )


# ---------------------------------------------------------------------- whole tensors


def full_state_dict(engine: TrainingEngine) -> dict[str, torch.Tensor]:
    arrive("full_state_dict")
    engine.manager.synchronize()
    layouts, aliases = engine.layout()
    return gather_full(engine.model, layouts, aliases)


def save_pretrained(engine: TrainingEngine, directory: str | Path) -> Path:
    from .consolidation import write_pretrained

    full = full_state_dict(engine)
    directory = Path(directory)
    if collectives.rank() == 0:
        layouts, aliases = engine.layout()
        state = ShardedState({}, {}, metadata={"aliases": aliases})
        meta = _engine_metadata(engine, state, layouts)
        write_pretrained(directory, full, aliases, meta["hf_config"], meta["hf_generation_config"])
    collectives.barrier()
    return directory


# ---------------------------------------------------------------------- RNG


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return tensors


def _set_rng_tensors(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def _python_rng_state() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _set_python_rng_state(state: dict[str, Any]) -> None:
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def layout_of(engine: TrainingEngine):
    """(layouts, aliases) of the engine's model tensors, from the training graph's records."""
    return manager_layout(engine._graph_for(True).ctx.records, engine.model)


def install_state_dict_hooks(engine: TrainingEngine) -> None:
    """`model.state_dict()` (and the engine's) is always current: ZeRO-1/2 parameter
    all-gathers still in flight land first; under ZeRO-3, whose parameters hold shards, it
    raises and points to `engine.full_state_dict()`."""

    def before_state_dict(module, prefix, keep_vars) -> None:
        layouts, _ = engine.layout()
        sharded = [n for n, layout in layouts.items() if not layout.holds_full]
        if sharded:
            raise CheckpointError(
                f"model.state_dict() under {', '.join(sorted(set(layouts[sharded[0]].by)))}: "
                f"parameters such as {sharded[0]!r} hold only this rank's shard. Call "
                "engine.full_state_dict() on every rank for whole tensors (or "
                "engine.save_pretrained(dir) / engine.save_checkpoint(dir))."
            )
        engine.manager.synchronize()

    engine.model.register_state_dict_pre_hook(before_state_dict)
    engine.register_state_dict_pre_hook(before_state_dict)
