"""Serving benchmark on CPU: quantized decode/prefill speed, its bandwidth bound, first token
from an artifact in a new process, perplexity, and llama.cpp alongside when installed.

The model is SmolLM2-135M's shape (30 layers, d=576, 9 heads / 3 kv heads, 49152-token
vocabulary, tied embedding) with random weights, or `--hf-dir`, a local Transformers model
folder (its tokenizer then gives real perplexity on `--text`). For fp32, int8 and int4 g32
(and int4 GPTQ with `--gptq`, calibrated on text other than the perplexity text) it reports,
through the default `compiled.generate` path (no backend flag):

- decode tokens/s at batch 1 and batch 4 (prompts of 4 different lengths, left-padded;
  aggregate = all rows' tokens per second) and their ratio;
- prefill tokens/s on prompts of 128 and 512 tokens (512 only within the position table);
- the bandwidth-limit ratio: decode seconds per token over (bytes of weights the decode
  graph reads per token / measured memory-copy bandwidth), 1.0 = bandwidth bound;
- first token in a new process: `strato.load` of the exported artifact plus a one-token
  `generate`, minus that call's own prefill;
- GPTQ seconds (calibration + quantization) and perplexity (teacher-forced, on `--text`).

llama.cpp runs a 32-token prompt, decode and 128/512-token prefills with `--gguf`, in a
subprocess of `--llama-python` (an interpreter where `llama_cpp` imports, e.g. its own
venv: a peer, never a dependency); otherwise the table says why it is missing.
The step graphs run as ahead-of-time compiled code (the default; the first run on a machine
compiles them once per variant, then the on-disk cache serves), and the artifact carries
them, so the first-token row times a new process running them; `--portable` serves the
portable FX graphs instead (Strategy(compiled_code=False)). Prints a table, writes JSON.

    python bench/serve.py [--layers 30] [--new-tokens 32] [--threads 2] [--gptq]
        [--hf-dir DIR --text FILE] [--gguf FILE --llama-python PYTHON] [--portable]
        [--out bench/results/serve.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import write_json  # bench/common.py: scripts here run with bench/ on sys.path

import strato


def smollm2_shaped(layers: int, vocab_size: int = 49152):
    """A Llama of SmolLM2-135M's shape, random weights (speed does not depend on values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    )
    return LlamaForCausalLM(config).eval()


def copy_bandwidth(megabytes: int = 256) -> float:
    """Bytes per second a large tensor copy moves (read + write), best of 5."""
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def decode_weight_bytes(compiled) -> int:
    """Bytes of the tensors one decode step reads: every constant of the decode graph, except
    those used only by embedding lookups (a lookup reads one row)."""
    gm = compiled.generator_graph.graph
    total, seen = 0, set()
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        if node.users and all("embedding" in str(user.target) for user in node.users):
            continue
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            total += value.numel() * value.element_size()
    return total


def left_padded(lengths, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def timed_decode(compiled, ids, mask, new: int, rounds: int) -> float:
    """Median decode tokens/s of all rows together."""
    rates = []
    for _ in range(rounds):
        compiled.generate(ids, new, attention_mask=mask, eos_token_id=[])
        rates.append(ids.shape[0] * compiled.last_generation.tokens_per_s)
    return statistics.median(rates)


def timed_prefill(compiled, length: int, vocab: int) -> float:
    ids = torch.randint(3, vocab, (1, length))
    compiled.generate(ids, 1, eos_token_id=[])  # warm-up
    compiled.generate(ids, 1, eos_token_id=[])
    return length / compiled.last_generation.prefill_s


def first_token_in_new_process(compiled, threads: int, vocab: int, code: bool = True) -> dict:
    """Export, then in a fresh interpreter: load + a 1-token generate of a 32-token prompt
    (`code`: the artifact's ahead-of-time compiled step graphs, as strato.load runs them)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.strato"
        start = time.perf_counter()
        strato.export(compiled, path, compiled_code=code)
        export_s = time.perf_counter() - start
        script = (
            "import sys, time, torch\n"
            f"torch.set_num_threads({threads})\n"
            "start = time.perf_counter()\n"
            "import strato\n"
            f"served = strato.load(sys.argv[1], compiled_code={code})\n"
            "loaded = time.perf_counter()\n"
            f"ids = torch.randint(3, {vocab}, (1, 32))\n"
            "served.generate(ids, 1, eos_token_id=[])\n"
            "done = time.perf_counter()\n"
            "print(loaded - start, done - start, served.last_generation.prefill_s)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
        )
        load_s, first_s, prefill_s = map(float, out.stdout.split()[-3:])
        return {
            "artifact_mb": path.stat().st_size / 2**20,
            "export_s": export_s,
            "load_s": load_s,
            "first_token_s": first_s,
            "prefill_s": prefill_s,
            "first_token_minus_prefill_s": first_s - prefill_s,
        }


def perplexity(compiled, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = compiled(input_ids=ids, use_cache=False).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(loss.exp())


def text_ids(args, vocab: int):
    """(held-out ids, calibration batches, reason when perplexity is not meaningful)."""
    if args.hf_dir and args.text:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.hf_dir, local_files_only=True)
        tokens = tokenizer(Path(args.text).read_text(), return_tensors="pt").input_ids[0]
        held_out = tokens[: args.ppl_tokens][None]
        rest = tokens[args.ppl_tokens :]
        batches = [rest[i : i + 128][None] for i in range(0, min(len(rest), 32 * 128), 128)]
        return held_out, [b for b in batches if b.shape[1] == 128], None
    g = torch.Generator().manual_seed(1)
    held_out = torch.randint(3, vocab, (1, args.ppl_tokens), generator=g)
    batches = [torch.randint(3, vocab, (1, 128), generator=g) for _ in range(16)]
    what = "random tokens" if args.hf_dir else "random weights and tokens"
    return held_out, batches, f"{what} (no --text): perplexity only compares variants"


LLAMA_CPP_SCRIPT = """
import json, sys, time
import llama_cpp
gguf, threads, new_tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = llama_cpp.Llama(gguf, n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                        n_batch=512, verbose=False)
vocab = model.n_vocab()
def prompt(n):
    return [3 + (7 * i) % (vocab - 3) for i in range(n)]
def decode():
    model.reset()
    model.eval(prompt(24))
    start = time.perf_counter()
    for _ in range(new_tokens):
        model.eval([int(model.sample(top_k=1))])
    return new_tokens / (time.perf_counter() - start)
def prefill(n):
    model.reset()
    start = time.perf_counter()
    model.eval(prompt(n))
    return n / (time.perf_counter() - start)
decode()
out = {"decode_tokens_per_s": sorted(decode() for _ in range(rounds))[rounds // 2]}
out["prefill_tokens_per_s"] = {n: max(prefill(n) for _ in range(2)) for n in (128, 512)}
print(json.dumps(out))
"""


def llama_cpp_row(args) -> dict:
    """llama.cpp's decode and prefill tokens/s on `--gguf`, run by `--llama-python`."""
    if not args.gguf:
        return {"skipped": "no --gguf file given"}
    python = args.llama_python or sys.executable
    found = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
    if found.returncode:
        return {"skipped": f"llama_cpp does not import in {python} (pip install llama-cpp-python)"}
    cmd = [python, "-c", LLAMA_CPP_SCRIPT, args.gguf, str(args.threads), str(args.new_tokens)]
    out = subprocess.run([*cmd, str(args.rounds)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    result["gguf"] = args.gguf
    return result


def run(args) -> dict:
    if args.hf_dir:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, local_files_only=True).eval()
    else:
        model = smollm2_shaped(args.layers, args.vocab)
    vocab = model.config.vocab_size
    limit = model.config.max_position_embeddings
    held_out, calibration, ppl_note = text_ids(args, vocab)
    variants = {
        "fp32": None,
        "int8": strato.Quantize(weights="int8"),
        "int4 g32": strato.Quantize(weights="int4", group_size=32),
    }
    if args.gptq:
        variants["int4 g32 gptq"] = strato.Quantize(
            weights="int4", group_size=32, method="gptq", calibration=calibration
        )
    wanted = [v.strip() for v in args.variants.split(",")] + (
        ["int4 g32 gptq"] if args.gptq else []
    )
    variants = {name: q for name, q in variants.items() if name in wanted}
    bandwidth = copy_bandwidth()
    example = {"input_ids": torch.randint(3, vocab, (1, 16)), "use_cache": False}
    rows = []
    for name, quantize in variants.items():
        start = time.perf_counter()
        strategy = strato.Strategy(quantize=quantize, compiled_code=not args.portable)
        compiled = strato.compile(model, strategy, example_kwargs=example)
        compile_s = time.perf_counter() - start
        one, one_mask = left_padded([24], vocab)
        four, four_mask = left_padded([24, 17, 9, 30], vocab)
        compiled.generate(one, 2, attention_mask=one_mask, eos_token_id=[])  # builds the graphs
        decode_1 = timed_decode(compiled, one, one_mask, args.new_tokens, args.rounds)
        decode_4 = timed_decode(compiled, four, four_mask, args.new_tokens, args.rounds)
        vars(compiled)["generator_graph"] = compiled._generator.graph(1)
        weight_bytes = decode_weight_bytes(compiled)
        row = {
            "variant": name,
            "compile_s": compile_s,
            "decode_tokens_per_s_batch1": decode_1,
            "decode_tokens_per_s_batch4": decode_4,
            "batch4_over_batch1": decode_4 / decode_1,
            "prefill_tokens_per_s": {
                n: timed_prefill(compiled, n, vocab) for n in (128, 512) if n + 1 <= limit
            },
            "decode_weight_mb": weight_bytes / 2**20,
            "bandwidth_limit_ratio": (1 / decode_1) / (weight_bytes / bandwidth),
            "perplexity": perplexity(compiled, held_out),
        }
        if quantize is not None and quantize.method == "gptq":
            row["gptq_s"] = next(r.seconds for r in compiled.history if r.name == "quantize")
        if not args.skip_first_token:
            row["first_token"] = first_token_in_new_process(
                compiled, args.threads, vocab, not args.portable
            )
        rows.append(row)
    return {
        "meta": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "copy_bandwidth_gb_s": bandwidth / 1e9,
            "model": args.hf_dir or f"SmolLM2-135M-shaped, {args.layers} layers, random weights",
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "perplexity_note": ppl_note,
        },
        "rows": rows,
        "llama.cpp": llama_cpp_row(args),
    }


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(
        f"{meta['model']} ({meta['parameters_m']:.0f}M params) | {meta['threads']} thread(s) of "
        f"{meta['cpu_count']} | copy bandwidth {meta['copy_bandwidth_gb_s']:.1f} GB/s"
    )
    header = (
        f"{'variant':<15} {'dec b1':>8} {'dec b4':>8} {'b4/b1':>6} {'pre128':>8} {'pre512':>8} "
        f"{'bw ratio':>9} {'ppl':>9} {'1st tok-pre s':>14} {'compile s':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        pre = r["prefill_tokens_per_s"]
        first = r.get("first_token", {}).get("first_token_minus_prefill_s")
        print(
            f"{r['variant']:<15} {r['decode_tokens_per_s_batch1']:>8.1f} "
            f"{r['decode_tokens_per_s_batch4']:>8.1f} {r['batch4_over_batch1']:>6.2f} "
            f"{pre.get(128, float('nan')):>8.1f} {pre.get(512, float('nan')):>8.1f} "
            f"{r['bandwidth_limit_ratio']:>9.2f} {r['perplexity']:>9.1f} "
            f"{first if first is not None else float('nan'):>14.2f} {r['compile_s']:>10.1f}"
        )
    for r in result["rows"]:
        first = r.get("first_token")
        if first:
            print(
                f"first token, new process ({r['variant']}): load {first['load_s']:.2f} s, "
                f"import + load + first token {first['first_token_s']:.2f} s (of which prefill "
                f"{first['prefill_s']:.2f} s; goal <= 2 s + prefill), artifact "
                f"{first['artifact_mb']:.0f} MB, export {first['export_s']:.1f} s"
            )
    if meta["perplexity_note"]:
        print(f"perplexity: {meta['perplexity_note']}")
    peer = result["llama.cpp"]
    if "skipped" in peer:
        print(f"llama.cpp: skipped ({peer['skipped']})")
    else:
        pre = peer["prefill_tokens_per_s"]
        print(
            f"llama.cpp ({Path(peer['gguf']).name}): decode {peer['decode_tokens_per_s']:.1f} "
            f"tok/s, prefill 128: {pre['128']:.1f}, 512: {pre['512']:.1f} tok/s"
        )
        for r in result["rows"]:
            print(
                f"  {r['variant']:<15} decode / llama.cpp "
                f"{r['decode_tokens_per_s_batch1'] / peer['decode_tokens_per_s']:.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30, help="layers of the random model")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary of the random model")
    parser.add_argument("--variants", default="fp32,int8,int4 g32", help="comma-separated subset")
    parser.add_argument("--hf-dir", help="a local Transformers causal LM folder instead")
    parser.add_argument("--text", help="held-out text for perplexity (with --hf-dir)")
    parser.add_argument("--ppl-tokens", type=int, default=256)
    parser.add_argument("--gguf", help="the same model as GGUF, for llama.cpp")
    parser.add_argument("--llama-python", help="a Python where llama_cpp imports (its venv)")
    parser.add_argument(
        "--portable", action="store_true", help="portable FX step graphs, no compiled code"
    )
    parser.add_argument("--gptq", action="store_true", help="add int4 g32 GPTQ")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-first-token", action="store_true")
    parser.add_argument("--out", default="bench/results/serve.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    print_table(result)
    print(f"wrote {write_json({'args': vars(args), **result}, args.out)}")


if __name__ == "__main__":
    main()
