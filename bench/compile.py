"""Compile-time benchmark: strato.compile (capture + all passes) vs raw torch.export.

Model: a Llama-style config of ~100M+ parameters built from a config (random weights).
Runs interleave, so drift on this noisy machine hits both alike; prints a table of
medians and writes JSON.

    python bench/compile.py [--repeats 3] [--out bench/results/compile.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import (  # bench/common.py: scripts here run with bench/ on sys.path
    llama_100m,
    write_json,
)

import strato


def time_raw_export(model, ids, kwargs) -> float:
    start = time.perf_counter()
    torch.export.export(
        model,
        (ids,),
        kwargs,
        dynamic_shapes={"input_ids": {0: torch.export.Dim.AUTO}, "use_cache": None},
        strict=False,
    )
    return time.perf_counter() - start


def time_strato(model, ids, kwargs) -> tuple[float, list]:
    start = time.perf_counter()
    compiled = strato.compile(model, example_inputs=(ids,), example_kwargs=kwargs)
    return time.perf_counter() - start, compiled.history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/compile.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = llama_100m()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 32000, (2, 128))
    kwargs = {"use_cache": False}
    time_raw_export(model, ids, kwargs)  # warm-up: imports and first-use caches for both
    raw, ours, history = [], [], []
    for i in range(args.repeats):
        # Alternate which runs first, so neither always gets the warmer caches.
        if i % 2:
            seconds, history = time_strato(model, ids, kwargs)
            raw.append(time_raw_export(model, ids, kwargs))
        else:
            raw.append(time_raw_export(model, ids, kwargs))
            seconds, history = time_strato(model, ids, kwargs)
        ours.append(seconds)
    result = {
        "model": "llama-style",
        "parameters": params,
        "repeats": args.repeats,
        "raw_export_s": statistics.median(raw),
        "strato_compile_s": statistics.median(ours),
        "ratio": statistics.median(ours) / statistics.median(raw),
        "passes": {r.name: r.seconds for r in history},
    }
    print(f"Llama-style model, {params / 1e6:.1f}M parameters, median of {args.repeats}")
    print(f"{'what':<28}{'seconds':>10}")
    print(f"{'torch.export (raw)':<28}{result['raw_export_s']:>10.3f}")
    print(f"{'strato.compile (all)':<28}{result['strato_compile_s']:>10.3f}")
    for name, seconds in result["passes"].items():
        print(f"{'  pass ' + name:<28}{seconds:>10.3f}")
    print(f"ratio strato / raw export: {result['ratio']:.2f}x (goal <= 1.5x)")
    print(f"wrote {write_json(result, args.out)}")


if __name__ == "__main__":
    main()
