"""Strato's CPU GEMV kernels (kernels/cpu_gemv.c) on a decode step's worth of weights:
the portable code layout (what 'fx' graphs run) against the blocked one (what graphs
lowered for inductor run), int16 (default) against int8-block activations
(STRATO_CPU_GEMV_ACTIVATIONS=int8), with fp32 `torch.nn.functional.linear` on the same
shapes and a tensor copy's bandwidth as the limit.

The weights are SmolLM2-135M's (30 layers of stacked q/k/v 960x576, o 576x576, stacked
gate/up 3072x576, down 576x1536, plus the 49152x576 LM head), each matrix its own tensor,
so they come from DRAM as in decoding. One input row, 1 thread by default. Variants
interleave round by round; prints the median milliseconds per pass over all matrices,
the CPU milliseconds, and the bandwidth of the bytes read (codes + scales + zeros), and
writes JSON.

    python bench/gemv.py [--rounds 7] [--threads 1] [--out bench/results/gemv.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from common import write_json  # bench/common.py: scripts here run with bench/ on sys.path

from strato.kernels import cpu_gemv
from strato.kernels import quantized_linear as ql

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]
"""(out, in) features of every quantized linear in one decode step of SmolLM2-135M."""


def variants() -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (one pass over every matrix, bytes of weights that pass reads)."""
    torch.manual_seed(0)
    weights = [torch.randn(n, k) for n, k in SHAPES]
    x = {k: torch.randn(1, k) for k in {k for _, k in SHAPES}}
    q8 = [ql.quantize_int8(w) for w in weights]
    q4 = [ql.quantize_int4(w, group_size=32, symmetric=False) for w in weights]
    b8 = [cpu_gemv.block_codes(q.qweight) for q in q8]
    b4 = [cpu_gemv.block_codes(q.qweight) for q in q4]
    source = torch.empty(64 * 2**20 // 4)
    target = torch.empty_like(source)

    def fp32():
        for w in weights:
            torch.nn.functional.linear(x[w.shape[1]], w)

    def activations(fmt: str, run: Callable[[], None]) -> Callable[[], None]:
        def wrapped():
            os.environ["STRATO_CPU_GEMV_ACTIVATIONS"] = fmt
            run()

        return wrapped

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
                cpu_gemv.int4_gemv(x[q.in_features], codes, q.scales, q.zeros, 32, blocked=blocked)

        return run

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    params8 = nbytes(q.scales for q in q8)
    params4 = nbytes(q.scales for q in q4) + nbytes(q.zeros for q in q4)
    out = {
        "copy 64 MiB": (lambda: target.copy_(source), 2 * nbytes([source])),
        "fp32 linear": (fp32, nbytes(weights)),
    }
    for fmt in ("int16", "int8"):
        out[f"int8 portable, {fmt} act"] = (
            activations(fmt, int8(False)),
            nbytes(q.qweight for q in q8) + params8,
        )
        out[f"int8 blocked, {fmt} act"] = (activations(fmt, int8(True)), nbytes(b8) + params8)
        out[f"int4 g32 portable, {fmt} act"] = (
            activations(fmt, int4(False)),
            nbytes(q.qweight for q in q4) + params4,
        )
        out[f"int4 g32 blocked, {fmt} act"] = (activations(fmt, int4(True)), nbytes(b4) + params4)
    return out


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
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for run, _ in runs.values():  # warm up
        run()
    for _ in range(args.rounds):
        for name, (run, _) in runs.items():
            start, cpu = time.perf_counter(), time.process_time()
            run()
            samples[name].append(
                ((time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3)
            )
    os.environ.pop("STRATO_CPU_GEMV_ACTIVATIONS", None)
    rows = []
    base = statistics.median(s[0] for s in samples["fp32 linear"])
    copy = statistics.median(s[0] for s in samples["copy 64 MiB"])
    copy_gb_s = runs["copy 64 MiB"][1] / copy / 1e6
    print(f"load average {os.getloadavg()[0]:.2f}, threads {torch.get_num_threads()}")
    header = f"{'variant':<30} {'ms/pass':>8} {'cpu ms':>7} {'x fp32':>7} {'bytes':>9} {'GB/s':>6}"
    print(header + f" {'x copy':>7}")
    for name, (_, nbytes) in runs.items():
        ms = statistics.median(s[0] for s in samples[name])
        cpu_ms = statistics.median(s[1] for s in samples[name])
        gb_s = nbytes / ms / 1e6
        rows.append(
            {
                "variant": name,
                "ms": ms,
                "cpu_ms": cpu_ms,
                "speedup": base / ms,
                "bytes": nbytes,
                "gb_s": gb_s,
                "of_copy_bandwidth": gb_s / copy_gb_s,
            }
        )
        print(
            f"{name:<30} {ms:>8.2f} {cpu_ms:>7.2f} {base / ms:>6.2f}x {nbytes / 2**20:>6.1f}MiB"
            f" {gb_s:>6.1f} {gb_s / copy_gb_s:>6.2f}x"
        )
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "matrices": len(SHAPES)}
    print(f"wrote {write_json({'meta': meta, 'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()
