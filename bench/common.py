"""What the benchmarks share: the ~100M-parameter Llama-style model and writing results."""

from __future__ import annotations

import json
from pathlib import Path


def llama_100m():
    """A Llama-style causal LM of 134M parameters, built from a config (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def write_json(result: dict, path: str | Path) -> Path:
    """Write `result` as indented JSON, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
