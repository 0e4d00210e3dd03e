"""Tiny-config Hugging Face models (no download) with a deterministic labelled batch each,
shared by the Hugging Face training tests and their multi-rank worker."""

from __future__ import annotations

import torch

VOCAB = 100


def _token_batch(step: int, size: int, length: int) -> torch.Tensor:
    """Token rows of a learnable pattern (start + stride * position) with 10% noise."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (size, 1), generator=g)
    stride = torch.randint(1, 4, (size, 1), generator=g)
    ids = (start + stride * torch.arange(length)) % VOCAB
    noise = torch.rand(ids.shape, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, ids.shape, generator=g), ids)


FAMILIES = {
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": VOCAB, "n_positions": 64},
        ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": VOCAB,
            "max_position_embeddings": 64,
        },
        ("attention_dropout",),
    ),
    "mistral": (  # every layer attends to the last 4 positions only
        "MistralConfig",
        "MistralForCausalLM",
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": VOCAB,
            "max_position_embeddings": 64,
            "sliding_window": 4,
        },
        ("attention_dropout",),
    ),
    "qwen2": (  # layer 0 full attention, layer 1 a 3-token sliding window
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": VOCAB,
            "max_position_embeddings": 64,
            "use_sliding_window": True,
            "sliding_window": 3,
            "max_window_layers": 1,
        },
        ("attention_dropout",),
    ),
    "bert": (
        "BertConfig",
        "BertForMaskedLM",
        {
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "vocab_size": VOCAB,
            "max_position_embeddings": 64,
        },
        ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        {
            "num_layers": 2,
            "num_decoder_layers": 2,
            "d_model": 32,
            "d_ff": 64,
            "d_kv": 8,
            "num_heads": 4,
            "vocab_size": VOCAB,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
        },
        ("dropout_rate",),
    ),
    "vit": (
        "ViTConfig",
        "ViTForImageClassification",
        {
            "image_size": 16,
            "patch_size": 4,
            "num_channels": 3,
            "num_hidden_layers": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_labels": 5,
        },
        ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    ),
}
"""Family -> (transformers config class, model class, its two-layer sizes, the config
fields that set its dropout)."""


def hf_model(name: str, seed: int = 0, dropout: float = 0.0, **config) -> torch.nn.Module:
    """A two-layer model of the named family. Dropout is off by default (so fp32 and
    low-precision runs see the same network, and runs are comparable step by step);
    `config` overrides the family's sizes or any other config field."""
    import transformers as tf

    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; families: {', '.join(FAMILIES)}")
    config_class, model_class, sizes, dropout_fields = FAMILIES[name]
    torch.manual_seed(seed)
    fields = {**sizes, **{field: dropout for field in dropout_fields}, **config}
    return getattr(tf, model_class)(getattr(tf, config_class)(**fields))


def hf_batch(name: str, step: int, size: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    """Batch `step` of a fixed stream for the named family, labels included."""
    if name == "vit":
        g = torch.Generator().manual_seed(1000 + step)
        labels = torch.randint(0, 5, (size,), generator=g)
        # Each class has its own mean image, so the classifier has something to learn.
        means = torch.linspace(-1, 1, 5)[labels].view(size, 1, 1, 1)
        pixels = means + 0.5 * torch.randn(size, 3, 16, 16, generator=g)
        return {"pixel_values": pixels, "labels": labels}
    ids = _token_batch(step, size, length)
    if name == "bert":  # masked LM: predict 15% of positions, the rest is -100
        g = torch.Generator().manual_seed(2000 + step)
        masked = torch.rand(ids.shape, generator=g) < 0.15
        masked[:, 0] = True
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        return {"input_ids": torch.where(masked, torch.full_like(ids, 3), ids), "labels": labels}
    if name == "t5":  # copy the sequence shifted by one
        return {"input_ids": ids, "labels": torch.roll(ids, 1, dims=1)}
    return {"input_ids": ids, "labels": ids}


def example_kwargs(name: str, **batch_options) -> dict:
    """What strato.compile gets as example_kwargs: batch 0, and use_cache off for decoders."""
    kwargs = hf_batch(name, 0, **batch_options)
    if name in ("gpt2", "llama", "t5"):
        kwargs["use_cache"] = False
    return kwargs


def train_losses(
    engine, name: str, steps: int, rank: int = 0, world: int = 1, per_rank: int = 4
) -> list[float]:
    """Three-call loop over the fixed stream (this rank's slice of each batch); the losses."""
    losses = []
    for step in range(steps):
        batch = hf_batch(name, step, size=per_rank * world)
        local = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
        out = engine(**local)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
    return losses
