"""KV-cache generation: compiled prefill/decode graphs match eager greedy decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import strato
from strato.runtime.generate import GenerationError, Generator

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return tiny_llama(
        vocab_size=256, hidden_size=64, intermediate_size=128, max_position_embeddings=64
    ).eval()


def eager_greedy(model, prompt, new_tokens):
    """Greedy decoding by re-running the whole sequence each step (no cache at all)."""
    ids, logits = prompt, []
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(ids, use_cache=False).logits[:, -1]
            logits.append(out)
            ids = torch.cat([ids, out.argmax(-1, keepdim=True)], dim=1)
    return ids, logits


def test_kv_cache_generation_matches_eager(llama):
    prompt = torch.randint(0, 256, (1, 5))
    expected, expected_logits = eager_greedy(llama, prompt, 8)
    generator = Generator(llama, max_len=32)
    result = generator.generate(prompt, 8)
    assert torch.equal(result.tokens, expected)
    assert result.tokens_per_s > 0
    # Each step's logits, through the cache, equal the full recomputation.
    keys, values = generator.empty_cache()
    mask = generator.full_mask()
    decode = generator.graph(1)
    seq = expected[:, :-1]
    with torch.no_grad():
        logits, k, v = generator.graph(5)(seq[:, :5], torch.tensor(0), mask, keys, values)
        keys[:, :, :, :5], values[:, :, :, :5] = k, v
        torch.testing.assert_close(logits, expected_logits[0], atol=1e-5, rtol=1e-5)
        for pos in range(5, seq.shape[1]):
            logits, k, v = decode(seq[:, pos : pos + 1], torch.tensor(pos), mask, keys, values)
            keys[:, :, :, pos : pos + 1], values[:, :, :, pos : pos + 1] = k, v
            torch.testing.assert_close(logits, expected_logits[pos - 4], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # ~12 s; tests/test_export.py's fresh-process artifacts stay in make test
def test_quantized_decode_graph_generates_and_exports(llama, tmp_path):
    strategy = strato.Strategy(quantize=strato.Quantize(weights="int4", group_size=32))
    generator = Generator(llama, strategy, max_len=16)
    prompt = torch.randint(0, 256, (1, 4))
    result = generator.generate(prompt, 6)
    assert result.tokens.shape == (1, 10)
    decode = generator.graph(1)
    # 2 layers x (q/k/v stacked, o, gate/up stacked, down) + lm_head = 9 ops for 15 linears.
    assert sum("quant_linear_int4" in str(n.target) for n in decode.graph.graph.nodes) == 9
    assert len(decode.context.records["quantize"]["layers"]) == 15
    strato.export(decode, tmp_path / "decode.strato")
    served = strato.load(tmp_path / "decode.strato")
    keys, values = generator.empty_cache()
    keys.normal_()
    values.normal_()
    args = (torch.tensor([[7]]), torch.tensor(3), generator.full_mask(), keys, values)
    with torch.no_grad():
        for got, want in zip(served(*args), decode(*args)):
            assert torch.equal(got, want)
    with pytest.raises(GenerationError, match="max_len"):
        generator.generate(prompt, 20)
