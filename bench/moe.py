"""MoE benchmark: an 8-expert top-2 MoE GPT vs the dense GPT of equal active FLOPs (its MLP
twice as wide: each token runs two experts), both compiled, one process; the experts as
one grouped GEMM vs a per-expert loop (the layer alone, eager forward + backward); and
expert parallelism EP=2 vs EP=1 (every rank all experts, plain data parallelism) on 2
gloo processes, same per-rank batch, with each rank's model-state bytes (parameters +
gradients + AdamW moments) and expert-weight bytes: under EP=2 a rank stores only its 4
experts of each layer. Tokens/s are medians over the timed steps (all ranks' tokens for the
2-process rows), with this process's CPU seconds per step beside wall time (shared cores).
Prints a table, writes JSON.

    .venv/bin/python bench/moe.py [--steps 5] [--out bench/results/moe.json]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import write_json  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402

CFG = GPTConfig(vocab_size=2048, seq_len=64, d_model=128, n_layers=2, n_heads=4)
EXPERTS, TOP_K, D_FF = 8, 2, 4 * CFG.d_model
BATCH = 8


def build(kind: str) -> torch.nn.Module:
    import strato

    torch.manual_seed(0)
    model = GPT(CFG)
    for block in model.blocks:
        if kind == "moe":
            block.mlp = strato.nn.MoE(CFG.d_model, D_FF, EXPERTS, TOP_K, capacity_factor=1.25)
        else:  # equal active FLOPs: top-2 of d_ff-wide experts = one 2 x d_ff-wide MLP
            block.mlp = torch.nn.Sequential(
                torch.nn.Linear(CFG.d_model, TOP_K * D_FF),
                torch.nn.GELU(),
                torch.nn.Linear(TOP_K * D_FF, CFG.d_model),
            )
    return model


def data(step: int, rank: int = 0):
    g = torch.Generator().manual_seed(step * 7 + rank)
    x = torch.randint(0, CFG.vocab_size, (BATCH, CFG.seq_len), generator=g)
    return x, torch.roll(x, -1, dims=1)


def time_train(engine, steps: int, rank: int = 0) -> float:
    """Median seconds per train_step after one warm-up step (wall; CPU time in
    engine.bench_cpu_s)."""
    engine.train_step(*data(0, rank))
    times, cpu = [], []
    for step in range(1, steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        engine.train_step(*data(step, rank))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    engine.bench_cpu_s = statistics.median(cpu)
    return statistics.median(times)


def single_process_rows(steps: int) -> list[dict]:
    import strato

    rows = []
    tokens = BATCH * CFG.seq_len
    for kind in ("dense", "moe"):
        model = build(kind)
        engine = strato.compile(
            model, strato.Strategy(optimizer=strato.AdamW(lr=1e-3)), example_inputs=data(0)
        )
        seconds = time_train(engine, steps)
        rows.append({"row": f"{kind} GPT (compiled, 1 process)", "tokens_per_s": tokens / seconds,
                     "step_s": seconds, "cpu_s": engine.bench_cpu_s})  # fmt: skip
    # The layer alone, eager forward + backward: grouped GEMM vs one matmul per expert.
    from strato.runtime import moe

    layer = strato.nn.MoE(CFG.d_model, D_FF, EXPERTS, TOP_K, drop_tokens=False)
    x = torch.randn(tokens, CFG.d_model)
    for name, loop in (("grouped GEMM", False), ("per-expert loop", True)):
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            routing = layer.route(x)
            dispatch = moe.sort_by_expert(routing, EXPERTS)
            out = moe.combine_local(x, dispatch, layer.w_in, layer.w_out, "gelu", loop=loop)
            out.sum().backward()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times[1:])
        rows.append({"row": f"MoE layer, {name} (eager fwd+bwd)", "tokens_per_s": tokens / seconds,
                     "step_s": seconds})  # fmt: skip
    return rows


def _rank(rank: int, world: int, port: int, size: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    try:
        import strato

        strategy = strato.Strategy(
            optimizer=strato.AdamW(lr=1e-3), moe=strato.ExpertParallel(size=size)
        )
        engine = strato.compile(build("moe"), strategy, example_inputs=data(0, rank))
        seconds = time_train(engine, steps, rank)
        stats = engine.stats()
        experts = sum(layer["expert_weight_bytes"] for layer in stats["moe"].values())
        result = {"step_s": seconds, "cpu_s": engine.bench_cpu_s, "comm_bytes": stats["comm_bytes"],
                  "model_state_bytes": stats["model_state_bytes"], "expert_weight_bytes": experts}  # fmt: skip
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def two_process_rows(steps: int) -> list[dict]:
    rows = []
    for size in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(
                _rank, args=(2, port, size, steps, out), nprocs=2, start_method="spawn"
            )
            results = [torch.load(Path(out) / f"rank{r}.pt") for r in range(2)]
        seconds = max(r["step_s"] for r in results)
        rows.append({"row": f"MoE GPT, EP={size} (2 processes)",
                     "tokens_per_s": 2 * BATCH * CFG.seq_len / seconds, "step_s": seconds,
                     "cpu_s": max(r["cpu_s"] for r in results),
                     "model_state_mib_per_rank": results[0]["model_state_bytes"] / 2**20,
                     "expert_weight_mib_per_rank": results[0]["expert_weight_bytes"] / 2**20,
                     "comm_bytes_rank0": results[0]["comm_bytes"]})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "moe.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = single_process_rows(args.steps) + two_process_rows(args.steps)
    print(f"{'':46} {'tokens/s':>10} {'step s':>8} {'cpu s':>8} {'state MiB/rank':>15} "
          f"{'experts MiB/rank':>17}")  # fmt: skip
    for row in rows:
        state = row.get("model_state_mib_per_rank")
        experts = row.get("expert_weight_mib_per_rank")
        print(f"{row['row']:46} {row['tokens_per_s']:10.0f} {row['step_s']:8.3f} "
              f"{row.get('cpu_s', float('nan')):8.3f} "
              f"{'' if state is None else f'{state:.2f}':>15} "
              f"{'' if experts is None else f'{experts:.2f}':>17}")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f}")
    config = {"gpt": CFG.__dict__, "experts": EXPERTS, "top_k": TOP_K, "d_ff": D_FF,
              "batch_per_rank": BATCH, "threads_per_process": 1, "steps": args.steps}  # fmt: skip
    print("wrote", write_json({"config": config, "rows": rows}, args.out))


if __name__ == "__main__":
    main()
