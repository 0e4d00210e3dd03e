"""One rank of a checkpoint test: started by tests/test_checkpoint_multirank.py with
torch.multiprocessing (spawn, gloo, one thread); writes what it measured to out/rank<r>.pt.

Every run trains the same global batch of GLOBAL_BATCH samples per step, split evenly over
the ranks, so losses can be compared across world sizes and ZeRO stages."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from examples.gpt import GPT
from tests import multirank
from tests.training_utils import batch
from tests.zero_worker import CFG

GLOBAL_BATCH = 8
SAVE_AT = 3
"""Steps trained before the checkpoint; RESUMED steps follow it."""
RESUMED = 5


def make_engine(stage: int):
    import strato

    torch.manual_seed(0)
    strategy = strato.Strategy(zero=stage, optimizer=strato.AdamW(lr=1e-3, weight_decay=0.1))
    world = max(1, dist.get_world_size() if dist.is_initialized() else 1)
    x, y = batch(0, GLOBAL_BATCH // world, CFG)
    return strato.compile(GPT(CFG), strategy, example_inputs=(x, y))


def train(engine, steps: range) -> list[float]:
    """Global-batch mean loss of each step (the same number on every rank)."""
    from strato.runtime import collectives

    rank, world = collectives.rank(), collectives.world_size()
    per_rank = GLOBAL_BATCH // world
    losses = []
    for step in steps:
        x, y = batch(step, GLOBAL_BATCH, CFG)
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = engine(x[sl], y[sl])
        engine.backward(loss)
        engine.step()
        total = loss.detach().double().reshape(1)
        collectives.all_reduce(total)
        losses.append(total.item() / world)
    return losses


AFTER = range(SAVE_AT, SAVE_AT + RESUMED)


def scenario_save_zero3(rank: int, spec: dict, out: Path) -> dict:
    """ZeRO-3: train, save (async), go on uninterrupted; load the checkpoint back, go on again."""
    import strato

    engine = make_engine(3)
    train(engine, range(SAVE_AT))
    result: dict = {}
    try:
        engine.model.state_dict()
        result["state_dict_error"] = None
    except strato.CheckpointError as exc:
        result["state_dict_error"] = str(exc)
    engine.save_checkpoint(spec["ckpt"])
    result["full"] = engine.full_state_dict()
    result["uninterrupted"] = train(engine, AFTER)
    engine.load_checkpoint(spec["ckpt"])
    result["resumed"] = train(engine, AFTER)
    return result


def scenario_load_zero12_save_stage0(rank: int, spec: dict, out: Path) -> dict:
    """Load the ZeRO-3 checkpoint under stages 1 and 2; then save one under stage 0."""
    result: dict = {}
    for stage in (1, 2):
        engine = make_engine(stage)
        assert engine.load_checkpoint(spec["ckpt"]) == SAVE_AT
        result[f"stage{stage}"] = train(engine, AFTER)
        if stage == 2:
            # Straight after a step, the last update's all-gathers are still in flight:
            # model.state_dict() must land them (the engine's pre-hook).
            raw = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
            hooked = {k: v.clone() for k, v in engine.model.state_dict().items()}
            landed = dict(engine.model.named_parameters())
            result["stale_without_hook"] = max((raw[n] - landed[n]).abs().max().item() for n in raw)
            result["state_dict_vs_landed"] = max(
                (hooked[n] - landed[n].detach()).abs().max().item() for n in raw
            )
    engine = make_engine(0)
    train(engine, range(SAVE_AT))
    engine.save_checkpoint(spec["ckpt0"])
    result["stage0_uninterrupted"] = train(engine, AFTER)
    return result


def scenario_load_stage0_into_zero3(rank: int, spec: dict, out: Path) -> dict:
    engine = make_engine(3)
    assert engine.load_checkpoint(spec["ckpt0"]) == SAVE_AT
    return {"losses": train(engine, AFTER)}


def scenario_partial_call(rank: int, spec: dict, out: Path) -> dict:
    """`if rank == 0: engine.save_checkpoint(...)` (or load_checkpoint): rank 0 must fail
    fast, naming rank 1."""
    import strato

    engine = make_engine(3)
    train(engine, range(1))
    if spec["call"] == "load":
        engine.save_checkpoint(spec["ckpt"], async_save=False)  # (on every rank)
    started = time.monotonic()
    try:
        if rank == 0 and spec["call"] == "save":
            engine.save_checkpoint(spec["ckpt"])
        elif rank == 0:
            engine.load_checkpoint(spec["ckpt"])
        else:
            train(engine, range(1, 2))  # blocks in an all-gather rank 0 never joins
        error = None
    except (strato.CheckpointError, RuntimeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"error": error, "seconds": time.monotonic() - started}


SCENARIOS = {
    "save_zero3": scenario_save_zero3,
    "load_zero12_save_stage0": scenario_load_zero12_save_stage0,
    "load_stage0_into_zero3": scenario_load_stage0_into_zero3,
    "partial_call": scenario_partial_call,
}


def run(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    scenario = SCENARIOS[spec["kind"]]
    multirank.run_rank(
        rank,
        world,
        port,
        out_dir,
        lambda: scenario(rank, spec, Path(out_dir)),
        env=spec.get("env"),
        exit_now=spec.get("exit_now", False),  # the group is broken on purpose
    )
