"""One rank of the recompute multi-rank tests (tests/test_recompute_multirank.py): each run of
spec (a list of {zero, policy, precision, dropout}) trains GPT(CFG) with Strategy.recompute
over gloo and writes its losses and full parameters to out_dir/rank<r>.pt."""

from __future__ import annotations

import dataclasses

import torch

from examples.gpt import GPT
from tests import multirank
from tests.zero_worker import CFG, PER_RANK, full_parameters, local_batch

STEPS = 2
LR = 0.1


def train(rank: int, world: int, run: dict) -> dict:
    import strato

    torch.manual_seed(0)
    model = GPT(dataclasses.replace(CFG, dropout=run.get("dropout", 0.0)))
    strategy = strato.Strategy(
        zero=run["zero"],
        optimizer=strato.SGD(lr=LR, momentum=0.0),
        recompute=run["policy"],
        precision=run.get("precision", "fp32"),
    )
    engine = strato.compile(model, strategy, example_inputs=local_batch(0, rank, world))
    torch.manual_seed(100 + rank)  # each rank its own dropout masks, the same in every run
    losses = [engine.train_step(*local_batch(step, rank, world)) for step in range(STEPS)]
    record = engine._graphs[True].ctx.records.get("recompute", {})
    return {
        "losses": losses,
        "params": full_parameters(engine),
        "regions": [r["module"] for r in record.get("regions", [])],
        "regathered": [
            u for r in record.get("regions", []) for u in r["zero3_units_gathered_again"]
        ],
    }


def run(rank: int, world: int, port: int, spec: list[dict], out_dir: str) -> None:
    multirank.run_rank(rank, world, port, out_dir, lambda: [train(rank, world, r) for r in spec])


__all__ = ["PER_RANK", "STEPS", "LR", "run"]
