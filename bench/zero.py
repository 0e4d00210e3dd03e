"""ZeRO benchmark: Strato stages 0-3 vs torch DDP vs FSDP2 (fully_shard) vs DeepSpeed
stages 0-3 (when `deepspeed` imports), on the reference GPT (4 layers, d_model 256, vocab
8192, seq 128), batch 4 per rank, fp32 AdamW, 2 gloo ranks, 1 thread per rank; and
4-rank rows: Strato's hybrid sharding on a replicate=2 x shard=2 mesh ('strato-N/2x2',
with its bytes sent per mesh dimension) next to DDP on 4 ranks ('ddp/4').
DDP and FSDP2 also run with torch's fused AdamW ('+fused'), the kernel Strato's AdamW
picks on CPU, so the table separates the optimizer kernel from the sharding.

Each (framework, stage) runs in its own pair of processes, so peak RSS is its own; runs
interleave over repeats, so drift on this shared machine hits all alike. Prints median
step time, peak RSS and model-state bytes per rank (parameters + gradients + optimizer
states, measured from the tensors each framework holds) with ratios, and writes JSON.

    .venv/bin/python bench/zero.py [--steps 6] [--repeats 2] [--out bench/results/zero.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import first_error, launch_ranks, run_rank  # noqa: E402
from examples.gpt import GPT, REFERENCE  # noqa: E402

PER_RANK = 4
WORLD = 2
LR = 1e-3


def data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * WORLD + rank)
    x = torch.randint(0, REFERENCE.vocab_size, (PER_RANK, REFERENCE.seq_len), generator=g)
    return x, torch.roll(x, -1, dims=1)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and ties counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "to_local"):  # DTensor (FSDP2): what this rank holds
            t = t.to_local()
        if t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


# ---------------------------------------------------------------------- the frameworks


def run_strato(stage: int, steps: int, rank: int, mesh: tuple[int, int] | None = None):
    import strato

    torch.manual_seed(0)
    model = GPT(REFERENCE)
    strategy = strato.Strategy(
        zero=stage,
        optimizer=strato.AdamW(lr=LR, weight_decay=0.01),
        mesh=strato.Mesh(replicate=mesh[0], shard=mesh[1]) if mesh else strato.Mesh(),
    )
    engine = strato.compile(model, strategy, example_inputs=data(0, rank))
    times = []
    for step in range(steps):
        start = time.perf_counter()
        loss = engine(*data(step, rank))
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
    stats = engine.stats()  # comm_bytes_by_dim: payload bytes of the last step
    return times, stats["model_state_bytes"], float(loss.detach()), stats["comm_bytes_by_dim"]


def torch_adamw(params, fused: bool) -> torch.optim.AdamW:
    """torch's default AdamW (a per-tensor loop on CPU), or its fused kernel, which is
    what Strato's AdamW picks on CPU: the '+fused' runs separate the optimizer's share."""
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01, fused=fused or None)


def run_ddp(steps: int, rank: int, fused: bool):
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(GPT(REFERENCE))
    optimizer = torch_adamw(model.parameters(), fused)
    times, state = [], 0
    for step in range(steps):
        start = time.perf_counter()
        loss = model(*data(step, rank))
        loss.backward()
        optimizer.step()
        state = storage_bytes(
            [
                *model.parameters(),
                *(p.grad for p in model.parameters()),
                *optimizer_tensors(optimizer),
            ]
        )
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times, state, float(loss.detach())


def run_fsdp2(steps: int, rank: int, fused: bool):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = GPT(REFERENCE)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch_adamw(model.parameters(), fused)
    times, state = [], 0
    for step in range(steps):
        start = time.perf_counter()
        loss = model(*data(step, rank))
        loss.backward()
        optimizer.step()
        state = storage_bytes(
            [
                *model.parameters(),
                *(p.grad for p in model.parameters()),
                *optimizer_tensors(optimizer),
            ]
        )
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times, state, float(loss.detach())


def run_deepspeed(stage: int, steps: int, rank: int):
    import deepspeed

    torch.manual_seed(0)
    model = GPT(REFERENCE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    config = {
        "train_micro_batch_size_per_gpu": PER_RANK,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    times, state = [], 0
    for step in range(steps):
        start = time.perf_counter()
        loss = engine(*data(step, rank))
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
    held = [
        *engine.module.parameters(),
        *optimizer_tensors(getattr(optimizer, "optimizer", optimizer)),
    ]
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        held += list(getattr(optimizer, attr, []) or [])
    for p in engine.module.parameters():
        held.append(getattr(p, "ds_tensor", None))
    state = storage_bytes(held)
    return times, state, float(loss.detach())


def worker(rank: int, world: int, port: int, out: str, variant: tuple, steps: int) -> None:
    framework, stage, _, mesh = variant

    def work() -> dict:
        if framework == "deepspeed":
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        else:
            dist.init_process_group(
                "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
            )
        run = {
            "strato": lambda: run_strato(stage, steps, rank, mesh),
            "ddp": lambda: run_ddp(steps, rank, fused=False),
            "ddp+fused": lambda: run_ddp(steps, rank, fused=True),
            "fsdp2": lambda: run_fsdp2(steps, rank, fused=False),
            "fsdp2+fused": lambda: run_fsdp2(steps, rank, fused=True),
            "deepspeed": lambda: run_deepspeed(stage, steps, rank),
        }[framework]
        times, state_bytes, loss, *by_dim = run()  # (Strato also returns bytes by dimension)
        return {
            "times": times,
            "model_state_bytes": state_bytes,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "loss": loss,
            "comm_bytes_by_dim": by_dim[0] if by_dim else {},
        }

    run_rank(rank, world, port, out, work, DS_ACCELERATOR="cpu")


def launch(variant: tuple, steps: int) -> dict:
    ranks = launch_ranks(worker, variant[2], variant, steps)
    if first_error(ranks):
        return {"error": first_error(ranks)}
    warm = [t for r in ranks for t in r["times"][2:]] or [t for r in ranks for t in r["times"]]
    return {
        "step_s": statistics.median(warm),
        "peak_rss": max(r["peak_rss"] for r in ranks),
        "model_state_bytes": max(r["model_state_bytes"] for r in ranks),
        "loss": ranks[0]["loss"],
        "comm_bytes_by_dim": ranks[0]["comm_bytes_by_dim"],
    }


def ideal_model_state(stage: int, psi: int, n: int = WORLD) -> float:
    """fp32 AdamW per rank (ZeRO paper, n shards): parameters 4, gradients 4, moments 8
    bytes/element."""
    return {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n, 3: 16 * psi / n}[
        stage
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per run (first 2 are warm-up)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/zero.json")
    parser.add_argument("--only", default="", help="comma-separated names, e.g. strato-3,fsdp2")
    args = parser.parse_args()

    variants = [("strato", s, WORLD, None) for s in range(4)]
    variants += [(f, s, WORLD, None) for f, s in [("ddp", 0), ("ddp+fused", 0), ("fsdp2", 3)]]
    variants += [("fsdp2+fused", 3, WORLD, None)]
    try:
        import deepspeed  # noqa: F401

        variants += [("deepspeed", s, WORLD, None) for s in range(4)]
    except Exception as exc:  # not installed, or fails to import on this machine
        print(f"deepspeed not importable ({type(exc).__name__}: {exc}); skipping it")
    hybrid = (2, 2)  # (replicate, shard)
    variants += [("strato", s, 4, hybrid) for s in (1, 2, 3)] + [("ddp", 0, 4, None)]

    def variant_name(v: tuple) -> str:
        framework, stage, world, mesh = v
        base = f"{framework}-{stage}" if framework in ("strato", "deepspeed") else framework
        if mesh:
            return f"{base}/{mesh[0]}x{mesh[1]}"
        return base if world == WORLD else f"{base}/{world}"

    name = {v: variant_name(v) for v in variants}
    if args.only:
        wanted = set(args.only.split(","))
        variants = [v for v in variants if name[v] in wanted]

    psi = sum(p.numel() for p in GPT(REFERENCE).parameters())
    runs: dict[str, list[dict]] = {name[v]: [] for v in variants}
    for repeat in range(args.repeats):
        for v in variants:
            result = launch(v, args.steps)
            runs[name[v]].append(result)
            status = result.get("error", "").strip().splitlines()[-1:] or [
                f"{result['step_s'] * 1e3:.0f} ms/step"
            ]
            print(f"repeat {repeat} {name[v]:<12} {status[0]}", flush=True)

    rows = {}
    for v in variants:
        ok = [r for r in runs[name[v]] if "error" not in r]
        if not ok:
            rows[name[v]] = {"error": runs[name[v]][0]["error"]}
            continue
        stage, world, mesh = v[1], v[2], v[3]
        shards = mesh[1] if mesh else world
        state = max(r["model_state_bytes"] for r in ok)
        rows[name[v]] = {
            "world_size": world,
            "mesh": {"replicate": mesh[0], "shard": mesh[1]} if mesh else None,
            "step_s": statistics.median(r["step_s"] for r in ok),
            "peak_rss": max(r["peak_rss"] for r in ok),
            "model_state_bytes": state,
            "ideal_model_state_bytes": ideal_model_state(stage, psi, shards),
            "state_vs_ideal": state / ideal_model_state(stage, psi, shards),
            "loss": ok[0]["loss"],
            "comm_bytes_by_dim": ok[0]["comm_bytes_by_dim"],
        }
    base = {k: rows.get(k, {}) for k in ("ddp", "ddp+fused", "fsdp2")}
    base_4 = rows.get("ddp/4", {})
    print(
        f"\nReference GPT: {psi:,} parameters, {WORLD} gloo ranks, batch {PER_RANK}/rank, fp32 AdamW"
    )
    header = (
        f"{'run':<12} {'step ms':>8} {'x DDP':>6} {'x DDP+fused':>11} {'x FSDP2':>7} "
        f"{'peak RSS MiB':>12} {'state MiB':>9} {'x ideal':>7}"
    )
    print(header)
    print("-" * len(header))
    for run_name, row in rows.items():
        if "error" in row:
            print(f"{run_name:<12} failed: {row['error'].strip().splitlines()[-1]}")
            continue
        vs = {
            k: row["step_s"] / b["step_s"] if "step_s" in b else float("nan")
            for k, b in base.items()
        }
        if row["world_size"] == 4:  # 4-rank rows: against DDP on 4 ranks
            vs = {k: float("nan") for k in vs}
            vs["ddp"] = row["step_s"] / base_4["step_s"] if "step_s" in base_4 else float("nan")
        row["step_vs_ddp"], row["step_vs_fsdp2"] = vs["ddp"], vs["fsdp2"]
        row["step_vs_ddp_fused"] = vs["ddp+fused"]
        print(
            f"{run_name:<12} {row['step_s'] * 1e3:8.0f} {vs['ddp']:6.2f} {vs['ddp+fused']:11.2f} "
            f"{vs['fsdp2']:7.2f} "
            f"{row['peak_rss'] / 2**20:12.0f} {row['model_state_bytes'] / 2**20:9.2f} "
            f"{row['state_vs_ideal']:7.3f}"
        )
    print(
        "\n'x DDP' of the 4-rank rows is against ddp/4. Payload bytes per mesh dimension, one step:"
    )
    for run_name, row in rows.items():
        if row.get("comm_bytes_by_dim"):
            dims = "; ".join(
                f"{dim}: " + ", ".join(f"{k} {n / 2**20:.2f} MiB" for k, n in sorted(kinds.items()))
                for dim, kinds in sorted(row["comm_bytes_by_dim"].items())
            )
            print(f"  {run_name:<12} {dims}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "config": {
                    "model": REFERENCE.__dict__,
                    "parameters": psi,
                    "world_size": WORLD,
                    "batch_per_rank": PER_RANK,
                    "steps": args.steps,
                    "repeats": args.repeats,
                    "torch": torch.__version__,
                },
                "results": rows,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
