"""Training scenarios run in fresh processes (plain python or torchrun) by the data-parallel,
checkpoint and train_step tests. Rank 0 writes results.json (and weights.safetensors) into
--out; the mismatch scenario has every rank write the error it raised."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import strato  # noqa: E402
from strato.runtime import checkpoint, collectives  # noqa: E402
from strato.runtime.distributed import init_from_env  # noqa: E402
from tests.training_utils import batch, tiny_gpt  # noqa: E402

GLOBAL_BATCH = 8


def strategy_for(args) -> strato.Strategy:
    if args.scenario == "parity":
        return strato.Strategy(optimizer=strato.AdamW(lr=3e-3, weight_decay=0.1))
    if args.scenario == "accum_clip":
        return strato.Strategy(
            optimizer=strato.SGD(lr=0.2, momentum=0.9), grad_accumulation=2, grad_clip=0.05
        )
    return strato.Strategy(  # resume
        optimizer=strato.AdamW(lr=3e-3, weight_decay=0.1),
        schedule=strato.WarmupCosine(warmup_steps=3, total_steps=10),
        grad_clip=1.0,
        precision=args.precision,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--scenario",
        choices=["parity", "accum_clip", "resume", "train_step", "mismatch"],
        required=True,
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--load")
    parser.add_argument("--save")
    parser.add_argument("--kill-during-save", action="store_true")
    parser.add_argument(
        "--unused-param", action="store_true", help="add a parameter forward never uses"
    )
    parser.add_argument("--rank1-lr", type=float, help="rank 1 uses another lr (a broken launch)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.scenario in EXTRA_SCENARIOS:
        init_from_env()  # what strato.compile does first: the scenarios need rank and world
        EXTRA_SCENARIOS[args.scenario](args)
        return

    dropout = 0.1 if args.scenario == "resume" else 0.0
    model = tiny_gpt(0, dropout=dropout)
    if args.unused_param:
        model.register_parameter("unused", torch.nn.Parameter(torch.ones(2, 3)))  # decayed group
    strategy = strategy_for(args)
    if args.rank1_lr is not None and os.environ.get("RANK") == "1":
        strategy = strategy.replace(optimizer=strato.AdamW(lr=args.rank1_lr))
    x, y = batch(0, 2)
    engine = strato.compile(model, strategy, example_inputs=(x, y))
    rank, world = collectives.rank(), collectives.world_size()
    if args.load:
        assert engine.load_checkpoint(args.load) == args.start
    per_rank = GLOBAL_BATCH // world
    accumulation = strategy.grad_accumulation
    micro = per_rank // accumulation
    losses, comm_per_micro = [], []
    for step in range(args.start, args.start + args.steps):
        xs, ys = batch(step, GLOBAL_BATCH)
        xs, ys = (
            xs[rank * per_rank : (rank + 1) * per_rank],
            ys[rank * per_rank : (rank + 1) * per_rank],
        )
        for k in range(accumulation):
            before = sum(collectives.comm_bytes().values())
            sl = slice(k * micro, (k + 1) * micro)
            engine.backward(engine(xs[sl], ys[sl]))
            engine.step()
            comm_per_micro.append(sum(collectives.comm_bytes().values()) - before)
        loss = torch.tensor([engine.stats()["loss"]], dtype=torch.float64)
        collectives.all_reduce(loss)  # the global-batch mean, comparable to one process
        losses.append(loss.item() / world)
        if args.save and args.kill_during_save and step == args.start + args.steps - 2:
            engine.save_checkpoint(args.save)
            checkpoint.write_tensors(
                os.path.join(args.out, "weights_at_save.safetensors"),
                {n: p.detach() for n, p in model.named_parameters()},
            )
    if args.save and args.kill_during_save:
        real_write = checkpoint.write_tensors

        def write_then_die(path, tensors):
            real_write(path, tensors)
            with open(path, "r+b") as f:  # a half-written file, then the process dies
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.write_tensors = write_then_die
    if args.save:
        engine.save_checkpoint(args.save)
    if rank == 0:
        stats = engine.stats()
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(
                {
                    "losses": losses,
                    "comm_per_micro": comm_per_micro,
                    "world_size": world,
                    "step": stats["step"],
                    "comm_bytes": stats["comm_bytes"],
                    "comm_bytes_total": stats["comm_bytes_total"],
                    "grad_norm": stats["grad_norm"],
                },
                f,
            )
        checkpoint.write_tensors(
            os.path.join(args.out, "weights.safetensors"),
            {n: p.detach() for n, p in model.named_parameters()},
        )


def train_step_scenario(args) -> None:
    """train_step vs the three-call loop, on this rank's share of each global batch, for
    grad_accumulation 1 and 4 under data parallelism and ZeRO-2: losses and weights."""
    rank, world = collectives.rank(), collectives.world_size()
    per_rank = GLOBAL_BATCH // world
    results = {}
    for accumulation, zero in [(1, 0), (4, 0), (1, 2), (4, 2)]:
        strategy = strato.Strategy(
            optimizer=strato.AdamW(lr=3e-3, weight_decay=0.1),
            grad_accumulation=accumulation,
            zero=zero,
        )
        x, y = batch(0, 2)
        looped = strato.compile(tiny_gpt(0), strategy, example_inputs=(x, y))
        stepped = strato.compile(tiny_gpt(0), strategy, example_inputs=(x, y))
        micro = per_rank // accumulation
        looped_losses, stepped_losses = [], []
        for step in range(args.steps):
            xs, ys = batch(step, GLOBAL_BATCH)
            xs, ys = (
                xs[rank * per_rank : (rank + 1) * per_rank],
                ys[rank * per_rank : (rank + 1) * per_rank],
            )
            for k in range(accumulation):
                sl = slice(k * micro, (k + 1) * micro)
                looped.backward(looped(xs[sl], ys[sl]))
                looped.step()
            looped_losses.append(looped.stats()["loss"])
            stepped_losses.append(stepped.train_step(xs, ys))
        looped.synchronize()
        stepped.synchronize()
        b = dict(stepped.model.named_parameters())
        weights_equal = all(torch.equal(p, b[n]) for n, p in looped.model.named_parameters())
        results[f"accumulation={accumulation},zero={zero}"] = {
            "looped": looped_losses,
            "stepped": stepped_losses,
            "weights_equal": weights_equal,
        }
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, results)
    if rank == 0:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"world_size": world, "ranks": everyone}, f)


def mismatch_scenario(args) -> None:
    """Rank 1 builds a model with one more layer: compiling must fail on every rank with
    the first differing collective, not hang and not with a generic message; once without
    ZeRO and once with ZeRO-2 (the group still works after a mismatch)."""
    rank = collectives.rank()
    errors = {}
    for zero in (0, 2):
        model = tiny_gpt(0, n_layers=3 if rank == 1 else 2)
        strategy = strato.Strategy(optimizer=strato.SGD(lr=0.1), zero=zero)
        try:
            strato.compile(model, strategy, example_inputs=batch(0, 2))
            errors[zero] = None
        except strato.StratoError as exc:
            errors[zero] = f"{type(exc).__name__}: {exc}"
    everyone = [None] * collectives.world_size()
    torch.distributed.all_gather_object(everyone, errors)
    if rank == 0:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"errors": everyone}, f)


EXTRA_SCENARIOS = {"train_step": train_step_scenario, "mismatch": mismatch_scenario}


if __name__ == "__main__":
    main()
