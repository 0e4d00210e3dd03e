"""Shared helpers: tiny models and the eager-parity oracle."""

from __future__ import annotations

import os

import pytest
import torch

# generate and export compile step graphs to native code by default (about a minute per
# graph on 2 cores): the suite serves the portable graphs unless a test asks for compiled
# code (tests/test_generate_compiled.py, tests/test_export_compiled.py).
os.environ.setdefault("STRATO_COMPILED_CODE", "0")

from examples.gpt import GPTConfig

TINY_GPT = GPTConfig(vocab_size=97, seq_len=16, d_model=32, n_layers=2, n_heads=4)


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def forward_backward(fn, model, args, kwargs, reduce=lambda out: out.float().pow(2).mean()):
    """Run fn(*args, **kwargs), backprop a scalar made from its output; return (out, grads)."""
    model.zero_grad(set_to_none=True)
    out = fn(*args, **kwargs)
    loss = reduce(out)
    loss.backward()
    return out, grads_of(model)


def assert_parity(model, compiled, args, kwargs=None, *, atol=1e-6, reduce=None, seed=0):
    """Compiled forward and gradients equal eager within atol (same RNG seed for both)."""
    kwargs = kwargs or {}
    reduce = reduce or (lambda out: out.float().pow(2).mean())
    torch.manual_seed(seed)
    ref_out, ref_grads = forward_backward(model, model, args, kwargs, reduce)
    torch.manual_seed(seed)
    out, grads = forward_backward(compiled, model, args, kwargs, reduce)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=0)
    assert grads.keys() == ref_grads.keys() and grads, "compiled run produced other gradients"
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=0, msg=name)


def tiny_llama(**changes):
    """A two-layer Hugging Face Llama built from a config (grouped-query attention, no
    download); `changes` override config fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "vocab_size": 100,
        **changes,
    }
    return LlamaForCausalLM(LlamaConfig(**config))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
