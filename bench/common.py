"""What the benchmarks share: Llama-style models built from configs, and writing results."""

from __future__ import annotations

import json
from pathlib import Path


def llama(
    hidden_size: int,
    intermediate_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab_size: int,
):
    """A Llama-style causal LM of these sizes (512 positions), random weights, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def llama_100m():
    """A Llama-style causal LM of 134M parameters (12 layers, d=768), random weights."""
    return llama(768, 2048, layers=12, heads=12, kv_heads=12, vocab_size=32000)


def llama_30m():
    """A Llama-style causal LM of about 30M parameters (6 layers, d=512), random weights."""
    return llama(512, 1376, layers=6, heads=8, kv_heads=4, vocab_size=16000)


def write_json(result: dict, path: str | Path) -> Path:
    """Write `result` as indented JSON, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
