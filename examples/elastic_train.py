"""Elastic training: survive a killed rank with torchrun's restarts and Strato checkpoints.

    torchrun --standalone --nproc-per-node 2 --max-restarts 2 examples/elastic_train.py \
        --ckpt out/elastic/ckpt --steps 12 --save-every 2 [--kill-rank 1 --kill-at-step 5]

The pattern: on every (re)start, load the newest complete checkpoint if there is one; save
every few steps (asynchronously: training goes on while it is written). Batches are built
from global sample indices (sample i is the same whatever the world size), so a run that
restarts -- even at another world size, with torchrun's `--nnodes 1:2` ranges -- sees the
same data from where the checkpoint left off and ends with the same loss as one that never
stopped. `--kill-rank/--kill-at-step` kill -9 one rank on the first attempt, to try it.
Each attempt prints which checkpoint step it resumed from (torchrun counts attempts in
TORCHELASTIC_RESTART_COUNT); a plain `python examples/elastic_train.py` runs one process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import strato  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402
from strato.runtime import collectives  # noqa: E402

CFG = GPTConfig(vocab_size=97, seq_len=8, d_model=33, n_layers=2, n_heads=3)
GLOBAL_BATCH = 8


def sample(index: int) -> torch.Tensor:
    """Global sample `index` (seq_len + 1 tokens): a pattern with noise, keyed by the index."""
    g = torch.Generator().manual_seed(index)
    start, stride = torch.randint(0, CFG.vocab_size, (1,), generator=g), 1 + index % 3
    seq = (start + stride * torch.arange(CFG.seq_len + 1)) % CFG.vocab_size
    noise = torch.rand(seq.shape, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, CFG.vocab_size, seq.shape, generator=g), seq)


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of global step `step`: samples step*B + rank*B/N ... (B/N of them)."""
    per_rank = GLOBAL_BATCH // world
    first = step * GLOBAL_BATCH + rank * per_rank
    seqs = torch.stack([sample(i) for i in range(first, first + per_rank)])
    return seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()


def train(
    ckpt: str,
    steps: int,
    save_every: int,
    zero: int = 2,
    kill_rank: int = -1,
    kill_at_step: int = -1,
) -> tuple[int, dict[int, float]]:
    """Resume from the newest complete checkpoint under `ckpt` (if any) and train up to
    `steps`, saving every `save_every` steps. Returns (the step it started at, the
    global-batch mean loss of each step it trained)."""
    torch.manual_seed(0)
    strategy = strato.Strategy(zero=zero, optimizer=strato.AdamW(lr=1e-3))
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    engine = strato.compile(GPT(CFG), strategy, example_inputs=local_batch(0, rank, world))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    start = 0
    if (Path(ckpt) / "latest").exists():
        start = engine.load_checkpoint(ckpt)
    if rank == 0:
        where = f"resumed from the checkpoint of step {start}" if start else "started afresh"
        print(f"attempt {attempt} ({world} ranks): {where}", flush=True)
    losses = {}
    for step in range(start, steps):
        # The first attempt only: torchrun's restart counts can differ between nodes.
        if attempt == 0 and start == 0 and rank == kill_rank and step == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        loss = engine(*local_batch(step, rank, world))
        engine.backward(loss)
        engine.step()
        total = loss.detach().double().reshape(1)
        collectives.all_reduce(total)
        losses[step] = total.item() / world
        if (step + 1) % save_every == 0:
            engine.save_checkpoint(ckpt)
    engine.wait_for_checkpoint()
    return start, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-at-step", type=int, default=-1)
    parser.add_argument("--out", help="rank 0 writes the losses here (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, losses = train(
        args.ckpt, args.steps, args.save_every, args.zero, args.kill_rank, args.kill_at_step
    )
    if collectives.rank() == 0 and args.out:
        Path(args.out).write_text(json.dumps({"start": start, "losses": losses}))


if __name__ == "__main__":
    main()
