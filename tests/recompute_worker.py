"""One rank of the recompute multi-rank test (tests/test_recompute_multirank.py): ZeRO-3 with
Strategy.recompute over gloo, writing its losses and full parameters to out_dir/rank<r>.pt."""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from examples.gpt import GPT
from tests.zero_worker import CFG, PER_RANK, local_batch

STEPS = 2
LR = 0.1


def train(rank: int, world: int, policy: str) -> dict:
    import strato

    torch.manual_seed(0)
    strategy = strato.Strategy(zero=3, optimizer=strato.SGD(lr=LR, momentum=0.0), recompute=policy)
    engine = strato.compile(GPT(CFG), strategy, example_inputs=local_batch(0, rank, world))
    losses = [engine.train_step(*local_batch(step, rank, world)) for step in range(STEPS)]
    regions = engine._graphs[True].ctx.records.get("recompute", {}).get("regions", [])
    return {
        "losses": losses,
        "params": engine.manager.full_parameters(),
        "regathered": [u for r in regions for u in r["zero3_units_gathered_again"]],
    }


def run(rank: int, world: int, port: int, policy: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    out = Path(out_dir)
    try:
        torch.save(train(rank, world, policy), out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


__all__ = ["PER_RANK", "STEPS", "LR", "run"]
