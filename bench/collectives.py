"""gloo collectives: Strato's direct reduce-scatter / all-gather vs gloo's own, next to
all-reduce, on 2 ranks with 1 thread each (the ZeRO benchmark's setting).

Strato's shim (runtime/collectives.py) runs reduce-scatter as one all_to_all plus a local
sum and all-gather as one broadcast per rank; each rank sends the same bytes as gloo's
ring versions. Sizes are the full (unsharded) buffer. Rounds interleave the variants and
report medians. Prints a table and writes JSON.

    .venv/bin/python bench/collectives.py [--sizes-mb 2,8,16,32] [--rounds 5] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import write_json  # bench/common.py: scripts here run with bench/ on sys.path

WORLD = 2


def variants(full: torch.Tensor, shard: torch.Tensor) -> dict:
    from strato.runtime import collectives

    def native(fn):  # the shim's direct algorithms switched off for this call
        def call():
            os.environ["STRATO_GLOO_NATIVE_COLLECTIVES"] = "1"
            try:
                fn()
            finally:
                del os.environ["STRATO_GLOO_NATIVE_COLLECTIVES"]

        return call

    return {
        "all_reduce": lambda: collectives.all_reduce(full),
        "reduce_scatter gloo": native(lambda: collectives.reduce_scatter_tensor(shard, full)),
        "reduce_scatter strato": lambda: collectives.reduce_scatter_tensor(shard, full),
        "all_gather gloo": native(lambda: collectives.all_gather_into_tensor(full, shard)),
        "all_gather strato": lambda: collectives.all_gather_into_tensor(full, shard),
    }


def worker(rank: int, port: int, sizes: list[float], rounds: int, out: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)  # torch 2.13's collective renames
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    for mb in sizes:
        n = int(mb * 2**20 / 4) // WORLD * WORLD
        fns = variants(torch.randn(n), torch.randn(n // WORLD))
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                fn()  # warm up, then time 4 calls
                dist.barrier()
                start = time.perf_counter()
                for _ in range(4):
                    fn()
                samples[name].append((time.perf_counter() - start) / 4 * 1e3)
        results[str(mb)] = {name: statistics.median(s) for name, s in samples.items()}
    if rank == 0:
        write_json(results, Path(out, "rank0.json"))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="2,8,16,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/collectives.json")
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes_mb.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(port, sizes, args.rounds, tmp), nprocs=WORLD)
        results = json.loads(Path(tmp, "rank0.json").read_text())
    names = list(next(iter(results.values())))
    header = f"{'MiB':>5} " + " ".join(f"{n:>22}" for n in names) + f" {'RS x':>6} {'AG x':>6}"
    print(f"ms per call, {WORLD} gloo ranks, 1 thread each (x: strato / gloo)")
    print(header)
    print("-" * len(header))
    for mb, row in results.items():
        rs = row["reduce_scatter strato"] / row["reduce_scatter gloo"]
        ag = row["all_gather strato"] / row["all_gather gloo"]
        row["reduce_scatter_ratio"], row["all_gather_ratio"] = rs, ag
        cells = " ".join(f"{row[n]:22.2f}" for n in names)
        print(f"{float(mb):5.0f} {cells} {rs:6.2f} {ag:6.2f}")
    print(f"\nwrote {write_json({'world_size': WORLD, 'ms': results}, args.out)}")


if __name__ == "__main__":
    main()
