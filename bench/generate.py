"""Generation benchmark on CPU: `compiled.generate` vs transformers' `generate`, one run.

A Llama-style causal LM built from a config (random weights: speed does not depend on the
values; `--model llama100m` is bench/common.py's 134M model, the default a ~30M one so the
default run stays short) generates `--new-tokens` tokens greedily after a random prompt:
transformers' eager `model.generate(do_sample=False)` in fp32 with its dynamic cache, then
Strato's `compiled.generate` (static KV cache, compiled prefill and decode graphs) in fp32,
int8 and int4 g32 weight-only (`--inductor` adds each under
Strategy(inference_backend='inductor')). Every variant is warmed up first (the Strato
'first call' column is that call: compiling both graphs, and inductor's compile), then
timed round by round, interleaved, medians reported. tokens/s counts every new token of
every row over the whole call (prefill included); 'decode tok/s' is the decode steps alone.
'= HF' says whether the greedy tokens equal transformers' (fp32 must). Prints the CPU
features it ran on and a table, and writes JSON.

    python bench/generate.py [--model small|llama100m] [--batch 1] [--prompt 32]
        [--new-tokens 32] [--rounds 3] [--threads 1] [--inductor]
        [--out bench/results/generate.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from common import (  # bench/common.py: scripts here run with bench/ on sys.path
    llama_30m,
    llama_100m,
    write_json,
)

import strato


def cpu_features() -> dict:
    """What the timings depend on: the CPU model, its SIMD flags and torch's dispatch level."""
    flags, model = set(), platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon", "asimd")
    return {
        "cpu": model,
        "simd": [f for f in wanted if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def variants(inductor: bool) -> dict[str, strato.Strategy]:
    schemes = {
        "fp32": None,
        "int8": strato.Quantize(weights="int8"),
        "int4 g32": strato.Quantize(weights="int4", group_size=32),
    }
    backends = ["fx", "inductor"] if inductor else ["fx"]
    return {
        f"strato {name}{' inductor' if backend == 'inductor' else ''}": strato.Strategy(
            quantize=q, inference_backend=backend
        )
        for backend in backends
        for name, q in schemes.items()
    }


def run(args) -> dict:
    torch.manual_seed(0)
    model = llama_100m() if args.model == "llama100m" else llama_30m()
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt))
    new = args.new_tokens
    n_params = sum(p.numel() for p in model.parameters())
    model.generation_config.eos_token_id = None  # every variant makes exactly `new` tokens

    def hf():
        return model.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)

    calls = {"transformers generate fp32": hf}
    first_call_s: dict[str, float] = {}
    engines = {}
    for name, strategy in variants(args.inductor).items():
        engine = strato.compile(
            model, strategy, example_kwargs={"input_ids": prompt, "use_cache": False}
        )
        engines[name] = engine
        calls[name] = lambda e=engine: e.generate(prompt, new)
    outputs = {}
    with torch.no_grad():
        for name, call in calls.items():  # warm-up: compiles Strato's graphs
            start = time.perf_counter()
            outputs[name] = call()
            first_call_s[name] = time.perf_counter() - start
        samples: dict[str, list[float]] = {name: [] for name in calls}
        decode: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - start)
                if name in engines:
                    decode[name].append(engines[name].last_generation.tokens_per_s)
    reference = outputs["transformers generate fp32"]
    baseline = statistics.median(samples["transformers generate fp32"])
    rows = []
    for name in calls:
        seconds = statistics.median(samples[name])
        rows.append(
            {
                "model": f"Llama-style {n_params / 1e6:.0f}M",
                "variant": name,
                "batch": args.batch,
                "prompt": args.prompt,
                "new_tokens": new,
                "seconds": seconds,
                "tokens_per_s": args.batch * new / seconds,
                "speedup": baseline / seconds,
                "decode_tokens_per_s": (
                    args.batch * statistics.median(decode[name]) if name in decode else None
                ),
                "equals_hf": bool(torch.equal(outputs[name], reference)),
                "first_call_s": first_call_s[name],
            }
        )
    return {"meta": {"torch": torch.__version__, **cpu_features()}, "rows": rows}


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(
        f"CPU: {meta['cpu']} | SIMD: {' '.join(meta['simd']) or 'none found'} | torch "
        f"{meta['torch']} dispatch {meta['torch_cpu_capability']} | {meta['threads']} "
        f"thread(s) of {meta['cpu_count']}"
    )
    rows = result["rows"]
    print(f"{rows[0]['model']}, batch {rows[0]['batch']}, prompt {rows[0]['prompt']}, "
          f"{rows[0]['new_tokens']} new tokens, greedy")  # fmt: skip
    header = f"{'variant':<30} {'tok/s':>8} {'speedup':>8} {'decode tok/s':>13} {'= HF':>5} {'first call s':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        decode = f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-"
        print(
            f"{r['variant']:<30} {r['tokens_per_s']:>8.1f} {r['speedup']:>7.2f}x {decode:>13} "
            f"{'yes' if r['equals_hf'] else 'no':>5} {r['first_call_s']:>13.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["small", "llama100m"], default="small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every variant")
    parser.add_argument(
        "--inductor",
        action="store_true",
        help="add each Strato variant under inference_backend='inductor' (compiles for tens "
        "of seconds on its first call; needs a C++ compiler)",
    )
    parser.add_argument("--out", default="bench/results/generate.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    print_table(result)
    print(f"wrote {write_json({'args': vars(args), **result}, args.out)}")


if __name__ == "__main__":
    main()
