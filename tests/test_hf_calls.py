"""Natural calls: the compiled model takes what the model takes (keyword or positional,
left-out arguments at the model's default, optional inputs the example did not have),
equal to eager; what no graph can take is an InputError naming the input."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import grads_of

import strato
from tests.hf_models import hf_batch, hf_model
from tests.training_utils import tiny_gpt

pytest.importorskip("transformers")


def _parity(model, compiled, args=(), kwargs=None, reduce=None):
    """Compiled vs eager: reduce(out) and every gradient within 1e-5. Eager gets
    use_cache=False, which the compiled model passes when the call leaves it out."""
    kwargs = kwargs or {}
    reduce = reduce or (lambda out: out.loss)
    results = []
    for fn, extra in ((model, {"use_cache": False}), (compiled, {})):
        model.zero_grad(set_to_none=True)
        value = reduce(fn(*args, **kwargs, **extra))
        value.backward()
        results.append((value.detach(), grads_of(model)))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=0, msg=name)


def _recaptures(record) -> list[str]:
    return [str(w.message) for w in record if "capturing" in str(w.message)]


def _padded(ids: torch.Tensor) -> torch.Tensor:
    """An attention mask whose first row is left-padded by 3 tokens."""
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return mask


def test_positional_keyword_and_left_out_arguments_share_the_example_graph():
    model = hf_model("llama")
    batch = hf_batch("llama", 0)
    compiled = strato.compile(model, example_kwargs={**batch, "use_cache": False})
    ids = hf_batch("llama", 1, size=3, length=9)["input_ids"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # positional ids, labels by keyword, use_cache left out (captured as False)
        _parity(model, compiled, (ids,), {"labels": ids})
        _parity(model, compiled, (), {"input_ids": ids, "labels": ids})
        _parity(model, compiled, (ids, None, None, None, None, ids))  # None: the defaults
    assert _recaptures(record) == []
    assert len(compiled._recaptured[True]) == 0


@pytest.mark.slow  # ~17 s: three captures of an HF model
def test_optional_inputs_capture_again_once_and_match_eager():
    """attention_mask (with padding), labels left out, return_dict=False: each is captured
    once, with a note naming the argument, then served from the cache."""
    model = hf_model("llama")
    compiled = strato.compile(model, example_kwargs=hf_batch("llama", 0))
    ids = hf_batch("llama", 1, size=3, length=9)["input_ids"]
    cases = [
        (
            {"input_ids": ids, "labels": ids, "attention_mask": _padded(ids)},
            "'attention_mask' given",
        ),
        ({"input_ids": ids}, "'labels' left out"),
        ({"input_ids": ids, "labels": ids, "return_dict": False}, "'return_dict' given"),
    ]
    for kwargs, note in cases:
        reduce = (
            (lambda out: out[0])
            if "return_dict" in kwargs
            else (
                (lambda out: out.loss)
                if "labels" in kwargs
                else lambda out: out.logits.pow(2).mean()
            )
        )
        with pytest.warns(UserWarning, match=note):
            _parity(model, compiled, (), kwargs, reduce)
        with warnings.catch_warnings(record=True) as record:  # kept, at another batch size
            warnings.simplefilter("always")
            other = {k: v[:2] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            _parity(model, compiled, (), other, reduce)
        assert _recaptures(record) == []


def test_engine_trains_with_a_mask_the_example_did_not_have():
    """The issue's user code: compile with ids + labels, train with an attention mask."""
    torch.manual_seed(0)
    model, reference = hf_model("llama"), hf_model("llama")
    strategy = strato.Strategy(optimizer=strato.SGD(lr=0.1, momentum=0.0))
    engine = strato.compile(model, strategy, example_kwargs=hf_batch("llama", 0))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="'attention_mask' given"):
        for step in range(3):
            batch = hf_batch("llama", step, size=3, length=10)
            batch["attention_mask"] = _padded(batch["input_ids"])
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            ref = reference(**batch, use_cache=False)
            ref.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=name)  # SGD: every weight


def test_wrong_rank_or_dtype_names_the_input_and_changes_nothing():
    model = hf_model("llama")
    compiled = strato.compile(model, example_kwargs=hf_batch("llama", 0))
    ids = hf_batch("llama", 1)["input_ids"]
    with pytest.raises(strato.InputError, match=r"'input_ids' is a 2-d float32 tensor.*2-d int64"):
        compiled(input_ids=ids.float(), labels=ids)
    with pytest.raises(strato.InputError, match=r"'labels' is a 3-d int64 tensor"):
        compiled(input_ids=ids, labels=ids[None])
    assert len(compiled._recaptured[True]) == 0
    gpt = strato.compile(tiny_gpt(), example_inputs=(ids % 64,))
    with pytest.raises(strato.InputError, match=r"GPT.forward\(idx, targets\).*'idz'"):
        gpt(ids % 64, idz=ids)


def test_zero3_refuses_a_new_argument_naming_it():
    """ZeRO-3 leaves parameters as shards: no second capture; the error says what to pass."""
    model = hf_model("llama")
    strategy = strato.Strategy(optimizer=strato.AdamW(lr=1e-3), zero=3)
    engine = strato.compile(model, strategy, example_kwargs=hf_batch("llama", 0))
    batch = hf_batch("llama", 1)
    out = engine(**batch)  # the example's arguments at another shape: fine
    engine.backward(out.loss)
    engine.step()
    with pytest.raises(strato.InputError, match=r"'attention_mask' given.*example_kwargs"):
        engine(**batch, attention_mask=torch.ones_like(batch["input_ids"]))


def test_sequence_longer_than_the_position_table_names_the_input_and_the_limit():
    """GPT-2 has a learned table of n_positions rows: a longer call is refused before the
    graph indexes past it (eager raises a bare IndexError), naming the input and both sizes."""
    model = hf_model("gpt2").eval()
    limit = model.config.n_positions
    ids = hf_batch("gpt2", 0, size=2, length=8)["input_ids"]
    compiled = strato.compile(model, example_kwargs={"input_ids": ids})
    longest = torch.randint(0, model.config.vocab_size, (1, limit))
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=longest).logits, model(input_ids=longest).logits)
    too_long = torch.randint(0, model.config.vocab_size, (1, limit + 3))
    with pytest.raises(strato.InputError, match=rf"'input_ids' has {limit + 3} positions.*{limit}"):
        compiled(input_ids=too_long)
