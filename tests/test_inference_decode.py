"""Decode-step graphs lose the copies eager decoding makes, and still decode as transformers.

simplify_inference hands grouped-query attention its grouped keys/values
(`enable_gqa=True`) instead of the expand + reshape copy of every layer's KV cache that
transformers' `repeat_kv` makes, and drops no-op slices. The oracle is transformers'
own greedy `generate` on the same eager model, token for token (fp32), and the same
graph without the pass.
"""

from __future__ import annotations

import torch
from conftest import tiny_llama

import strato
from strato.runtime.generate import generator_for

aten = torch.ops.aten


def _decode_step(compiled):
    return generator_for(compiled).graph(1)


def _attention(gm):
    return [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]


def test_grouped_attention_reads_the_cache_without_copies():
    model = tiny_llama(num_key_value_heads=1, max_position_embeddings=64).eval()
    model.generation_config.eos_token_id = None  # both decode all 6 tokens
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    kwargs = {"example_kwargs": {"input_ids": ids, "use_cache": False}}
    compiled = strato.compile(model, **kwargs)
    out = compiled.generate(ids, 6, eos_token_id=[])
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)

    step = _decode_step(compiled)
    calls = _attention(step.graph)
    assert len(calls) == 2 and all(n.kwargs.get("enable_gqa") for n in calls)
    assert not any(n.target is aten.expand.default for n in step.graph.graph.nodes)
    for n in calls:  # keys/values enter attention with their one kv head, uncopied
        assert n.args[1].meta["val"].shape[1] == 1
    record = step.context.records["simplify_inference"]
    assert record["grouped_attention"] == 2 and record["noop_slices"] > 0

    plain = strato.compile(model, strato.Strategy(disable=["simplify_inference"]), **kwargs)
    assert not any(n.kwargs.get("enable_gqa") for n in _attention(_decode_step(plain).graph))
    assert torch.equal(plain.generate(ids, 6, eos_token_id=[]), out)
