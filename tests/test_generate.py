"""compiled.generate on Hugging Face causal LMs equals transformers' own generate.

The oracle is `model.generate` on the same eager model: greedy tokens equal token for token
(fp32), with a left-padded row and an unpadded one in the same batch, for the GPT-2, Llama,
Mistral (sliding window shorter than the prompt) and Qwen2 (mixed full/sliding layers)
families; sampling draws the same tokens as transformers' sampling from the same seed.
"""

from __future__ import annotations

import pytest
import torch

import strato
from strato.runtime.generate import GenerationError, Generator, next_tokens
from tests.hf_models import VOCAB, hf_model

tf = pytest.importorskip("transformers")


def causal_lm(family: str, **changes) -> torch.nn.Module:
    """The family's two-layer causal LM of tests/hf_models.py (no download), in eval mode."""
    return hf_model(family, **changes).eval()


def left_padded_batch(lengths=(4, 9), pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of the given lengths, left-padded with `pad` to the longest, and their mask."""
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,))
        mask[row, width - n :] = 1
    return ids, mask


def compiled_lm(model, strategy=None):
    ids = torch.randint(3, VOCAB, (2, 8))
    return strato.compile(model, strategy, example_kwargs={"input_ids": ids, "use_cache": False})


@pytest.fixture(scope="module")
def llama():
    """A compiled Llama shared by the tests below; they all generate from prompts of the
    left_padded_batch() shape, so they share its prefill and decode graphs."""
    model = causal_lm("llama")
    return model, compiled_lm(model)


def hf_generate(model, ids, mask, new_tokens, **options):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=0, **options
        )


@pytest.mark.parametrize(
    "family", ["gpt2", *(pytest.param(n, marks=pytest.mark.slow) for n in ("mistral", "qwen2"))]
)
def test_greedy_equals_transformers_generate_with_left_padding(family):
    model = causal_lm(family)
    if family == "qwen2":
        assert set(model.config.layer_types) == {"full_attention", "sliding_attention"}
    ids, mask = left_padded_batch()  # row 0 padded, row 1 not
    # compiled.generate runs this Generator (tested on Llama below); its own compile of the
    # model's forward is left out here to keep the test short.
    eos = model.generation_config.eos_token_id
    runner = Generator(model, max_len=32, batch=2)
    got = runner.generate(ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0).tokens
    assert torch.equal(got, hf_generate(model, ids, mask, 12, do_sample=False))


@pytest.mark.slow  # ~10 s; gpt2's left-padding parity above stays in make test
def test_llama_greedy_and_eos_equal_transformers_generate(llama):
    model, compiled = llama
    ids, mask = left_padded_batch()
    free = compiled.generate(ids, 12, attention_mask=mask, eos_token_id=[])
    assert torch.equal(free, hf_generate(model, ids, mask, 12, do_sample=False, eos_token_id=None))
    # An eos id that row 0 produces at its third new token: that row is padded from then on,
    # and generation stops once both rows have ended (or at max_new_tokens).
    eos = int(free[0, 9 + 2])
    got = compiled.generate(ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    want = hf_generate(model, ids, mask, 12, do_sample=False, eos_token_id=eos)
    assert torch.equal(got, want)
    assert (got[0, 9 + 3 :] == 0).all()
    # Defaults come from the model's generation_config, as in transformers.
    before = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        assert torch.equal(compiled.generate(ids, 12, attention_mask=mask, pad_token_id=0), want)
    finally:
        model.generation_config.eos_token_id = before


@pytest.mark.slow
def test_sampling_is_seeded_and_equals_transformers_sampling(llama):
    model, compiled = llama
    ids, mask = left_padded_batch()
    options = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "attention_mask": mask}
    a = compiled.generate(ids, 10, eos_token_id=[], seed=3, **options)
    b = compiled.generate(ids, 10, eos_token_id=[], seed=3, **options)
    c = compiled.generate(
        ids, 10, eos_token_id=[], generator=torch.Generator().manual_seed(4), **options
    )
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The same filtered distribution and the same draws from torch's default generator.
    torch.manual_seed(11)
    ours = compiled.generate(ids, 10, eos_token_id=[], **options)
    torch.manual_seed(11)
    del options["attention_mask"]
    theirs = hf_generate(model, ids, mask, 10, do_sample=True, eos_token_id=None, **options)
    assert torch.equal(ours, theirs)


def test_one_prefill_and_one_decode_graph_serve_every_size(llama):
    model, compiled = llama
    ids, mask = left_padded_batch()
    compiled.generate(ids, 4, attention_mask=mask, eos_token_id=[])
    graphs = dict(compiled._generator._graphs)
    assert sorted(graphs) == ["decode", "prefill"]
    for lengths, new in [((3, 5, 2), 6), ((12,), 30), ((7, 7), 3)]:
        ids, mask = left_padded_batch(lengths)
        got = compiled.generate(ids, new, attention_mask=mask, eos_token_id=[])
        want = hf_generate(model, ids, mask, new, do_sample=False, eos_token_id=None)
        assert torch.equal(got, want), lengths
        assert compiled.last_generation.new_tokens == new
    assert compiled._generator._graphs == graphs  # the same two compiled models


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(3, VOCAB) * 3
    scores = TemperatureLogitsWarper(0.7)(None, logits.clone())
    scores = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, scores))
    want = scores.softmax(-1)
    draws = [
        next_tokens(logits, 0.7, 10, 0.8, torch.Generator().manual_seed(s)) for s in range(200)
    ]
    kept = want > 0
    drawn = torch.zeros_like(kept).scatter_(1, torch.cat(draws, 1), True)
    assert (drawn <= kept).all() and kept.sum(1).min() >= 1  # never a filtered token
    assert torch.equal(next_tokens(logits, 0.0), logits.argmax(-1, keepdim=True))
    assert torch.equal(next_tokens(logits, 1.0, top_k=1), logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("scheme", ["int8", pytest.param("int4", marks=pytest.mark.slow)])
def test_quantized_generation_runs_quantized_graphs_near_fp32(scheme):
    model = causal_lm("llama")
    quantize = strato.Quantize(weights=scheme, **({"group_size": 32} if scheme == "int4" else {}))
    runner = Generator(model, strato.Strategy(quantize=quantize), max_len=16, batch=2)
    ids, mask = left_padded_batch()
    got = runner.generate(ids, 6, attention_mask=mask).tokens
    assert got.shape == (2, 15) and torch.equal(got[:, :9], ids)
    decode = runner.graph(1)
    assert any(f"quant_linear_{scheme}" in str(n.target) for n in decode.graph.graph.nodes)
    # The quantized prefill's next-token logits stay close to the fp32 model's.
    keys, values = runner.empty_cache()
    slots = runner.full_mask()
    slots[:, :9] = mask
    with torch.no_grad():
        logits = runner.graph(9)(ids, torch.tensor(0), slots, keys, values)[0]
        want = model(ids, attention_mask=mask).logits[:, -1]
    cosine = torch.nn.functional.cosine_similarity(logits, want, dim=-1)
    assert cosine.min() > (0.999 if scheme == "int8" else 0.98)


@pytest.mark.slow  # ~9 s
def test_bf16_model_generates_as_transformers_does():
    model = causal_lm("llama").to(torch.bfloat16)
    runner = Generator(model, max_len=16, batch=2)
    assert runner.empty_cache()[0].dtype == torch.bfloat16
    ids, mask = left_padded_batch()
    got = runner.generate(ids, 6, attention_mask=mask).tokens
    assert torch.equal(got, hf_generate(model, ids, mask, 6, do_sample=False, eos_token_id=None))


def test_bad_requests_name_what_is_wrong(llama):
    model, compiled = llama
    ids = torch.randint(3, VOCAB, (1, 40))
    with pytest.raises(GenerationError, match=r"40 \+ max_new_tokens 30 = 70.*= 64"):
        compiled.generate(ids, 30)
    right_padded = torch.ones(1, 40, dtype=torch.long)
    right_padded[0, -3:] = 0
    with pytest.raises(GenerationError, match="left padding"):
        compiled.generate(ids, 4, attention_mask=right_padded)
    with pytest.raises(GenerationError, match="temperature"):
        compiled.generate(ids, 4, temperature=-1.0)
    with pytest.raises(GenerationError, match="max_len=16"):
        Generator(model, max_len=16).generate(ids[:, :10], 8)


def test_generate_needs_a_causal_lm_head():
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        vocab_size=VOCAB, pad_token_id=0,
    )  # fmt: skip
    ids = torch.randint(3, VOCAB, (1, 6))
    compiled = compiled_lm(tf.LlamaModel(config).eval())
    with pytest.raises(GenerationError, match="no causal-LM head"):
        compiled.generate(ids, 4)
    with pytest.raises(GenerationError, match="no causal-LM head"):
        Generator(tf.LlamaForSequenceClassification(config).eval())
    plain = strato.compile(torch.nn.Linear(4, 4), example_inputs=(torch.randn(2, 4),))
    with pytest.raises(GenerationError, match="not a Hugging Face"):
        plain.generate(ids, 4)


@pytest.mark.slow  # two more compiles of prefill and decode graphs (~20 s)
def test_fused_and_training_strategies_generate_as_transformers_does():
    """A fuse=True strategy's step graphs run fused kernels; a training engine generates
    from its current weights through an inference-only copy of its strategy."""
    model = causal_lm("gpt2")
    ids, mask = left_padded_batch()
    runner = Generator(model, strato.Strategy(fuse=True), max_len=16, batch=2)
    got = runner.generate(ids, 6, attention_mask=mask).tokens
    assert runner.graph(1).kernels()
    assert torch.equal(got, hf_generate(model, ids, mask, 6, do_sample=False, eos_token_id=None))

    model = causal_lm("llama")
    engine = strato.compile(
        model,
        strato.Strategy(optimizer=strato.SGD(lr=0.5)),
        example_kwargs={"input_ids": ids, "labels": ids, "use_cache": False},
    )
    engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
    engine.step()
    model.eval()
    got = engine.generate(ids, 6, attention_mask=mask, eos_token_id=[])
    assert torch.equal(got, hf_generate(model, ids, mask, 6, do_sample=False, eos_token_id=None))
