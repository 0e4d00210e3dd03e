"""Strato's CPU GEMV kernels (kernels/cpu_gemv.c) on a decode step's worth of weights:
the portable code layout (what 'fx' graphs run) against the blocked one (what graphs
lowered for inductor run), with fp32 `torch.nn.functional.linear` on the same shapes.

The weights are those of the 134M Llama-style model in bench/quantize.py (12 layers of
stacked q/k/v, o, stacked gate/up and down projections, plus the 32000-row LM head), each
matrix its own tensor, so the 110 MB of int8 codes come from DRAM as in decoding. One
input row, 1 thread by default. Variants interleave round by round; prints the median
milliseconds per pass over all matrices and the bandwidth of the weights read, and writes
JSON.

    python bench/gemv.py [--rounds 7] [--threads 1] [--out bench/results/gemv.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import write_json  # bench/common.py: scripts here run with bench/ on sys.path

from strato.kernels import cpu_gemv
from strato.kernels import quantized_linear as ql

SHAPES = [(2304, 768), (768, 768), (4096, 768), (768, 2048)] * 12 + [(32000, 768)]
"""(out, in) features of every quantized linear in one decode step of the 134M model."""


def variants() -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (one pass over every matrix, bytes of weights that pass reads)."""
    torch.manual_seed(0)
    weights = [torch.randn(n, k) for n, k in SHAPES]
    x = {k: torch.randn(1, k) for k in {k for _, k in SHAPES}}
    q8 = [ql.quantize_int8(w) for w in weights]
    q4 = [ql.quantize_int4(w, group_size=128) for w in weights]
    b8 = [cpu_gemv.block_codes(q.qweight) for q in q8]
    b4 = [cpu_gemv.block_codes(q.qweight) for q in q4]

    def fp32():
        for w in weights:
            torch.nn.functional.linear(x[w.shape[1]], w)

    def int8(blocked: bool):
        def run():
            for q, b in zip(q8, b8):
                codes = b if blocked else q.qweight
                cpu_gemv.int8_gemv(x[q.in_features], codes, q.scales, q.zeros, blocked=blocked)

        return run

    def int4(blocked: bool):
        def run():
            for q, b in zip(q4, b4):
                codes = b if blocked else q.qweight
                cpu_gemv.int4_gemv(x[q.in_features], codes, q.scales, q.zeros, 128, blocked=blocked)

        return run

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    return {
        "fp32 linear": (fp32, nbytes(weights)),
        "int8 portable": (int8(False), nbytes(q.qweight for q in q8)),
        "int8 blocked": (int8(True), nbytes(b8)),
        "int4 g128 portable": (int4(False), nbytes(q.qweight for q in q4)),
        "int4 g128 blocked": (int4(True), nbytes(b4)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/gemv.json")
    args = parser.parse_args()
    if not cpu_gemv.available():
        raise SystemExit("Strato's CPU GEMV kernels do not run here (x86-64 AVX2 and cc needed)")
    torch.set_num_threads(args.threads)
    runs = variants()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for run, _ in runs.values():  # warm up
        run()
    for _ in range(args.rounds):
        for name, (run, _) in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) * 1e3)
    rows = []
    base = statistics.median(samples["fp32 linear"])
    print(f"{'variant':<20} {'ms/pass':>8} {'x fp32':>7} {'weights':>9} {'GB/s':>6}")
    for name, (_, nbytes) in runs.items():
        ms = statistics.median(samples[name])
        rows.append(
            {
                "variant": name,
                "ms": ms,
                "speedup": base / ms,
                "bytes": nbytes,
                "gb_s": nbytes / ms / 1e6,
            }
        )
        print(
            f"{name:<20} {ms:>8.2f} {base / ms:>6.2f}x {nbytes / 2**20:>6.1f}MiB {nbytes / ms / 1e6:>6.1f}"
        )
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "matrices": len(SHAPES)}
    print(f"wrote {write_json({'meta': meta, 'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
