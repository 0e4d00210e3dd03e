"""One rank of a ZeRO test: started by tests/test_zero_multirank.py with torch.multiprocessing
(spawn, gloo, one thread), writes what it measured to out_dir/rank<r>.pt."""

from __future__ import annotations

from pathlib import Path

import torch

from examples.gpt import GPT, GPTConfig
from tests import multirank
from tests.training_utils import batch

# Odd sizes everywhere (d_model 33, vocab 97): no parameter divides evenly over 2 or 4
# ranks, and the LM head is tied to the token embedding.
CFG = GPTConfig(vocab_size=97, seq_len=8, d_model=33, n_layers=2, n_heads=3)
PER_RANK = 2
LR = {"adamw": 1e-3, "sgd": 0.1}


def optimizer_config(name: str):
    import strato

    if name == "adamw":
        return strato.AdamW(lr=LR["adamw"], weight_decay=0.1)
    return strato.SGD(lr=LR["sgd"], momentum=0.9)


def local_batch(step: int, rank: int, world: int):
    x, y = batch(step, PER_RANK * world, CFG)
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return x[sl], y[sl]


def make_engine(stage: int, opt: str, offload, seed: int, rank: int, world: int, mesh=None):
    import strato

    torch.manual_seed(seed)
    model = GPT(CFG)
    strategy = strato.Strategy(
        zero=stage,
        optimizer=optimizer_config(opt),
        offload=strato.NVMe(offload[len("nvme:") :])
        if str(offload).startswith("nvme:")
        else offload,
        mesh=strato.Mesh(**(mesh or {})),
    )
    return strato.compile(model, strategy, example_inputs=local_batch(0, rank, world))


def train(engine, steps: range, rank: int, world: int) -> tuple[list[float], dict[str, int]]:
    """Three-call loop; returns the losses and the last step's payload bytes by kind (and,
    in engine.last_comm_by_dim, by mesh dimension)."""
    from strato.runtime import collectives

    losses, comm = [], {}
    for step in steps:
        before, dims_before = collectives.comm_bytes(), collectives.comm_bytes_by_dim()
        loss = engine(*local_batch(step, rank, world))
        engine.backward(loss)
        engine.step()
        after = collectives.comm_bytes()
        comm = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        engine.last_comm_by_dim = collectives.growth_by_dim(
            dims_before, collectives.comm_bytes_by_dim()
        )
        losses.append(loss.item())
    return losses, comm


def full_parameters(engine) -> dict[str, torch.Tensor]:
    """Every parameter in full (ZeRO gathers them; data parallel holds them)."""
    if hasattr(engine.manager, "full_parameters"):
        return engine.manager.full_parameters()
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def scenario_train(rank: int, world: int, spec: dict, out_dir: Path) -> list[dict]:
    """Train each variant in spec['variants'] for spec['steps'] steps; with 'checkpoint',
    save halfway, and at the end load that checkpoint and train the second half again."""
    return [
        train_variant(rank, world, spec["steps"], variant, out_dir / f"ckpt{i}")
        for i, variant in enumerate(spec["variants"])
    ]


def train_variant(rank: int, world: int, steps: int, variant: dict, ckpt: Path) -> dict:
    from strato.runtime import collectives

    stage, opt, offload = variant["stage"], variant["optimizer"], variant.get("offload")
    engine = make_engine(stage, opt, offload, 0, rank, world, variant.get("mesh"))
    result: dict = {"graph": str(engine.graph.graph) if rank == 0 else "", "devices": set()}
    half = steps // 2
    losses, _ = train(engine, range(half), rank, world)
    if variant.get("checkpoint"):
        engine.save_checkpoint(ckpt)

    def seen(op: str, group: str, devices: list) -> None:  # every tensor of every collective
        result["devices"].update((op, group, d.type) for d in devices)

    with collectives.observe(seen):
        more, comm = train(engine, range(half, steps), rank, world)
    explanation = engine.explain()
    result.update(
        losses=losses + more,
        comm=comm,
        comm_by_dim=engine.last_comm_by_dim,
        explain_comm_by_dim=explanation.comm_bytes_per_dim,
        mesh=str(engine.mesh),
        stats=engine.stats(),
        breakdown=getattr(engine.manager, "model_state_breakdown", dict)(),
        explain_comm=explanation.comm_bytes_per_step,
        explain_model_state=explanation.model_state_bytes,
        full=full_parameters(engine),
    )
    if variant.get("checkpoint"):  # everything (weights, moments, step) must come back
        engine.load_checkpoint(ckpt)
        result["resumed_losses"], _ = train(engine, range(half, steps), rank, world)
        result["resumed_full"] = full_parameters(engine)
    getattr(engine.manager, "close", lambda: None)()
    return result


def scenario_mismatch(rank: int, world: int, spec: dict, out_dir: Path) -> dict:
    """Rank 1 compiles a different model; the schedule check must raise on every rank."""
    import strato
    from strato.passes.zero import zero_stage3
    from strato.runtime.collective_schedule import verify_collective_schedule, zero_schedule

    cfg = CFG if rank == 0 else GPTConfig(**{**CFG.__dict__, "d_model": 36, "n_heads": 4})
    torch.manual_seed(0)
    model = GPT(cfg)
    x, y = batch(0, PER_RANK, cfg)
    compiled = strato.compile(model, strato.Strategy(passes=[zero_stage3]), example_inputs=(x, y))
    try:
        verify_collective_schedule(zero_schedule(compiled.context.records["zero"]))
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": None}


SCENARIOS = {"train": scenario_train, "mismatch": scenario_mismatch}


def run(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    scenario = SCENARIOS[spec["kind"]]
    multirank.run_rank(
        rank, world, port, out_dir, lambda: scenario(rank, world, spec, Path(out_dir))
    )
