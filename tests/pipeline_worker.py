"""One rank of a pipeline test: started by tests/test_pipeline_multirank.py (spawn, gloo,
one thread); trains one engine per run of the spec and writes what it measured to
out_dir/rank<r>.pt."""

from __future__ import annotations

import torch

from tests import multirank
from tests.pipeline_models import LR, skip_lm, tokens


def train(run: dict, rank: int, world: int) -> dict:
    import strato

    stages = run["stages"]
    data_parallel = world // stages
    size, steps = run["batch"], run["steps"]
    strategy = strato.Strategy(
        optimizer=strato.SGD(lr=LR, momentum=0.0),
        zero=run.get("zero", 0),
        precision=run.get("precision", "fp32"),
        grad_clip=run.get("grad_clip"),
        recompute=run.get("recompute"),
        loss_scaling=strato.LossScaling(initial_scale=run.get("initial_scale", 2.0**16)),
        pipeline=strato.Pipeline(
            stages=stages,
            microbatches=run["microbatches"],
            schedule=run["schedule"],
            virtual_stages=run.get("virtual_stages", 1),
        ),
    )
    dp_rank = rank % data_parallel  # pipeline is the outermost mesh dimension
    per_rank = size // data_parallel

    def local(step: int):
        x, y = tokens(step, size)
        sl = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        return x[sl], y[sl]

    engine = strato.compile(skip_lm(layers=run.get("layers", 4)), strategy, example_inputs=local(0))
    losses, grad_norms = [], []
    for step in range(steps):
        losses.append(engine.train_step(*local(step)))
        grad_norms.append(engine.stats()["grad_norm"])
    timeline = engine.timeline()
    held = sorted(n for n, p in engine.model.named_parameters() if p.numel())
    updated = sorted(n for g in engine.manager.optimizer.param_groups for n in g["names"])
    state_bytes = engine.stats()["model_state_bytes"]
    full = engine.full_state_dict()
    engine.eval()  # the whole model runs: other stages' weights are fetched first
    with torch.no_grad():
        eval_loss = float(engine(*local(steps)))
    engine.train()
    return {
        "stages": stages,
        "losses": losses,
        "full": {k: v.float() for k, v in full.items()},
        "bubble": timeline.bubble(),
        "stage_params": engine.context.records["pipeline_cut"]["param_stages"],
        "comm_by_dim": engine.stats()["comm_bytes_by_dim"],
        "held": held,
        "updated": updated,
        "model_state_bytes": state_bytes,
        "eval_loss": eval_loss,
        "grad_norms": grad_norms,
        "skipped_steps": engine.stats()["skipped_steps"],
    }


def checkpoint_round_trip(spec: dict, rank: int, world: int) -> dict:
    """Train pipelined (P = world, AdamW), save; load into data parallel over the same ranks;
    train a step there, save; load back into a fresh pipelined engine."""
    import strato

    size = 8

    def engine(pipeline):
        strategy = strato.Strategy(optimizer=strato.AdamW(lr=1e-2), pipeline=pipeline)
        return strato.compile(skip_lm(seed=rank), strategy, example_inputs=tokens(0, size))

    piped = engine(strato.Pipeline(stages=world, microbatches=4))
    for step in range(3):
        piped.train_step(*tokens(step, size))
    piped.save_checkpoint(spec["dir"] + "/piped", async_save=False)
    piped_full = piped.full_state_dict()
    plain = engine(None)
    plain.load_checkpoint(spec["dir"] + "/piped")
    plain_full = plain.full_state_dict()
    plain_loss = plain.train_step(*tokens(3, size))
    plain.save_checkpoint(spec["dir"] + "/plain", async_save=False)
    plain_after = plain.full_state_dict()
    back = engine(strato.Pipeline(stages=world, microbatches=4))
    step = back.load_checkpoint(spec["dir"] + "/plain")
    return {
        "piped": piped_full,
        "plain": plain_full,
        "plain_after": plain_after,
        "back": back.full_state_dict(),
        "step": step,
        "plain_loss": plain_loss,
        "back_loss": back.train_step(*tokens(4, size)),
        "plain_next_loss": plain.train_step(*tokens(4, size)),
    }


def work(rank: int, world: int, spec: dict) -> dict:
    if "dir" in spec:
        return checkpoint_round_trip(spec, rank, world)
    return {run["name"]: train(run, rank, world) for run in spec["runs"]}


def run(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    multirank.run_rank(
        rank, world, port, out_dir, lambda: work(rank, world, spec), env={"OMP_NUM_THREADS": "1"}
    )


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(1)
