"""Checkpoint save: how long the training loop is blocked, async (snapshot to host memory,
background write) vs synchronous (the call returns once the checkpoint is published).

One process, a GPT of ~17M parameters trained with AdamW (so a checkpoint holds parameters
and two moment tensors per parameter, ~200 MB). Each save is taken right after a training
step; "blocked" is the time inside `save_checkpoint`, "next step" the training step that
follows it (which runs while the async writer is busy), "written" the background write.

    .venv/bin/python bench/checkpoint.py [--saves 3] [--out bench/results/checkpoint.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import strato  # noqa: E402
from bench.common import write_json  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402

CFG = GPTConfig(vocab_size=8192, seq_len=64, d_model=512, n_layers=4, n_heads=8)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    seq = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def train_step(engine, step: int) -> float:
    started = time.perf_counter()
    x, y = batch(step)
    engine.backward(engine(x, y))
    engine.step()
    return time.perf_counter() - started


def run(async_save: bool, saves: int, folder: str) -> dict:
    torch.manual_seed(0)
    engine = strato.compile(
        GPT(CFG), strato.Strategy(optimizer=strato.AdamW(lr=1e-4)), example_inputs=batch(0)
    )
    plain = [train_step(engine, s) for s in range(3)][1:]
    blocked, after, written = [], [], []
    for k in range(saves):
        train_step(engine, 10 + k)
        started = time.perf_counter()
        engine.save_checkpoint(folder, keep_last=1, async_save=async_save)
        blocked.append(time.perf_counter() - started)
        after.append(train_step(engine, 100 + k))
        engine.wait_for_checkpoint()
        written.append(engine._last_save_seconds)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
    return {
        "mode": "async" if async_save else "sync",
        "blocked_s": statistics.median(blocked),
        "next_step_s": statistics.median(after),
        "plain_step_s": statistics.median(plain),
        "written_s": statistics.median(written),
        "checkpoint_mb": size / 2**20,
        "parameters": sum(p.numel() for p in engine.model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--out", default="bench/results/checkpoint.json")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.dir or tempfile.mkdtemp(prefix="strato-bench-ckpt-")
    rows = []
    try:
        for async_save in (False, True):
            rows.append(run(async_save, args.saves, os.path.join(root, f"async{async_save}")))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"{'mode':<6} {'blocked s':>10} {'next step s':>12} {'plain step s':>13} "
        f"{'written s':>10} {'MB':>7}"
    )
    for r in rows:
        print(
            f"{r['mode']:<6} {r['blocked_s']:>10.3f} {r['next_step_s']:>12.3f} "
            f"{r['plain_step_s']:>13.3f} {r['written_s']:>10.3f} {r['checkpoint_mb']:>7.1f}"
        )
    sync, async_ = rows
    print(f"async blocks the loop {sync['blocked_s'] / async_['blocked_s']:.1f}x less than sync")
    path = write_json(
        {"rows": rows, "command": "bench/checkpoint.py " + " ".join(sys.argv[1:])}, args.out
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
