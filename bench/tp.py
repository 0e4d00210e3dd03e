"""Tensor parallelism: TP=2 vs DP=2 training (step time, per-rank model-state bytes) and
TP=2 vs one process for serving forwards, on a Llama-style model, in one run.

    .venv/bin/python bench/tp.py [--steps 6] [--layers 4] [--hidden 256] [--new-tokens 16]

Ranks are real processes over gloo (CPU), so the numbers show the communication a
strategy adds on this machine, not GPU speed. Both training runs see the same global batch
(TP: every rank the whole batch; DP: half each). Serving: one forward of a 16-token prompt
of batch 1 (the eval graph), and KV-cache decoding through `compiled.generate` (ms per new
token after the first, median of 3 runs of --new-tokens; each TP rank's caches hold half
the KV heads), with the process CPU time per generated token. DeepSpeed AutoTP (`init_inference(tensor_parallel=...)`) is run when
deepspeed is installed, else the row says so. Writes bench/results/tp.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import llama, write_json  # noqa: E402

BATCH, SEQ, VOCAB = 8, 128, 8000


def _model(args):
    torch.manual_seed(0)
    return llama(args["hidden"], 2 * args["hidden"], args["layers"], 8, 4, VOCAB).train()


def _batch(step: int, size: int) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (size, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def _train(mode: str, args: dict, rank: int, world: int) -> dict:
    import strato

    tp = strato.TensorParallel(size=world) if mode == "tp" else None
    strategy = strato.Strategy(optimizer=strato.AdamW(lr=1e-4), tensor_parallel=tp)
    per_rank = BATCH if mode == "tp" else BATCH // world

    def local(step):
        full = _batch(step, BATCH)
        lo = 0 if mode == "tp" else rank * per_rank
        return {k: v[lo : lo + per_rank] if torch.is_tensor(v) else v for k, v in full.items()}

    engine = strato.compile(_model(args), strategy, example_kwargs=local(0))
    times = []
    for step in range(args["steps"]):
        start = time.perf_counter()
        engine.train_step(**local(step))
        times.append(time.perf_counter() - start)
    stats = engine.stats()
    return {
        "step_s": statistics.median(times[1:]),
        "model_state_bytes": stats["model_state_bytes"],
        "comm_bytes": stats["comm_bytes_by_dim"],
    }


def _serve(mode: str, args: dict, rank: int, world: int) -> dict:
    import strato

    tp = strato.TensorParallel(size=world) if mode == "tp" else None
    model = _model(args).eval()
    ids = _batch(0, 1)["input_ids"][:, :16]
    compiled = strato.compile(
        model,
        strato.Strategy(tensor_parallel=tp),
        example_kwargs={"input_ids": ids, "use_cache": False},
    )
    with torch.no_grad():
        compiled(input_ids=ids, use_cache=False)
        times = []
        for _ in range(args["steps"] * 3):
            start = time.perf_counter()
            compiled(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - start)
        # KV-cache decoding (each rank's caches hold its half of the KV heads under TP).
        compiled.generate(ids, max_new_tokens=4)  # compiles the prefill and decode graphs
        decode, cpu = [], time.process_time()
        for _ in range(3):
            compiled.generate(ids, max_new_tokens=args["new_tokens"])
            run = compiled.last_generation
            decode.append(run.decode_s / (run.new_tokens - 1))
        cpu = (time.process_time() - cpu) / (3 * args["new_tokens"])
    return {
        "forward_ms": 1e3 * statistics.median(times),
        "decode_ms_per_token": 1e3 * statistics.median(decode),
        "generate_cpu_ms_per_token": 1e3 * cpu,
    }


def _worker(rank: int, world: int, port: int, job: tuple, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    kind, mode, args = job
    result = (_train if kind == "train" else _serve)(mode, args, rank, world)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _launch(job: tuple, world: int, out: Path) -> list[dict]:
    from tests.multirank import free_port

    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, job, str(out))) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def _deepspeed_row() -> str:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return "deepspeed is not installed here: AutoTP not measured"
    return "deepspeed is installed, but AutoTP needs `deepspeed --num_gpus 2` launch: run it there"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", default="bench/results/tp.json")
    ns = parser.parse_args()
    args = {
        "steps": ns.steps,
        "layers": ns.layers,
        "hidden": ns.hidden,
        "new_tokens": ns.new_tokens,
    }
    tmp = Path(ns.out).parent / ".tp_runs"
    rows = {}
    for mode in ("tp", "dp"):
        rows[f"train {mode.upper()}=2"] = _launch(("train", mode, args), 2, tmp / f"train_{mode}")[
            0
        ]
    rows["serve TP=2"] = _launch(("serve", "tp", args), 2, tmp / "serve_tp")[0]
    rows["serve 1 process"] = _launch(("serve", "single", args), 1, tmp / "serve_single")[0]
    result = {
        "model": f"Llama {args['layers']} layers, hidden {args['hidden']}, 8 heads / 4 KV, vocab {VOCAB}",
        "batch": BATCH,
        "seq": SEQ,
        "rows": rows,
        "deepspeed_autotp": _deepspeed_row(),
    }
    print(
        f"{'run':<18} {'step s':>8} {'state MiB/rank':>15} {'forward ms':>11} "
        f"{'decode ms/token':>16} {'cpu ms/token':>13}"
    )
    for name, row in rows.items():
        step = f"{row['step_s']:.3f}" if "step_s" in row else "-"
        state = f"{row['model_state_bytes'] / 2**20:.1f}" if "model_state_bytes" in row else "-"
        fwd = f"{row['forward_ms']:.1f}" if "forward_ms" in row else "-"
        dec = f"{row['decode_ms_per_token']:.2f}" if "decode_ms_per_token" in row else "-"
        cpu = (
            f"{row['generate_cpu_ms_per_token']:.2f}" if "generate_cpu_ms_per_token" in row else "-"
        )
        print(f"{name:<18} {step:>8} {state:>15} {fwd:>11} {dec:>16} {cpu:>13}")
    print(result["deepspeed_autotp"])
    print(f"wrote {write_json(result, ns.out)}")


if __name__ == "__main__":
    main()
