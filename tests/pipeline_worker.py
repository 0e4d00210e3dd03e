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
    losses = [engine.train_step(*local(step)) for step in range(steps)]
    timeline = engine.timeline()
    full = engine.full_state_dict()
    return {
        "losses": losses,
        "full": {k: v.float() for k, v in full.items()},
        "bubble": timeline.bubble(),
        "stage_params": engine.context.records["pipeline_cut"]["param_stages"],
        "comm_by_dim": engine.stats()["comm_bytes_by_dim"],
    }


def work(rank: int, world: int, spec: dict) -> dict:
    return {run["name"]: train(run, rank, world) for run in spec["runs"]}


def run(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    multirank.run_rank(
        rank, world, port, out_dir, lambda: work(rank, world, spec), env={"OMP_NUM_THREADS": "1"}
    )


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(1)
