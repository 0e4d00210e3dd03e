"""Dynamic batch and sequence: one compile serves batches 1, 2, 3, 7 and three lengths, in
training and eval, equal to eager (fp32, atol 1e-5), with no second capture. Where a size
cannot be symbolic, the graph is captured again once per size, with a note naming the
input and dimension, and at most MAX_RECAPTURES such graphs are kept."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from conftest import assert_parity

import strato
from strato.runtime.compiled_model import MAX_RECAPTURES
from tests.hf_models import hf_batch, hf_model
from tests.training_utils import tiny_gpt

pytest.importorskip("transformers")

SHAPES = [(1, 12), (2, 12), (3, 12), (7, 12), (3, 5), (3, 20)]
"""Batches 1, 2, 3, 7 and lengths 5, 12, 20 (the example is batch 2, length 12)."""


def _recaptures(record) -> list[str]:
    return [str(w.message) for w in record if "capturing" in str(w.message)]


@pytest.mark.parametrize(
    "name", ["llama", *(pytest.param(n, marks=pytest.mark.slow) for n in ("gpt2", "bert"))]
)
def test_hf_any_batch_and_length_train_and_eval(name):
    model = hf_model(name)
    # use_cache=False for eager too: its KV cache is no graph output (see test_hf_calls).
    no_cache = {"use_cache": False} if name != "bert" else {}
    example = {**hf_batch(name, 0, size=2, length=12), **no_cache}
    compiled = strato.compile(model, example_kwargs=example)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for b, t in SHAPES:
            kwargs = {**hf_batch(name, 1, size=b, length=t), **no_cache}
            assert_parity(model, compiled, (), kwargs, atol=1e-5, reduce=lambda out: out.loss)
        compiled.eval()
        for b, t in SHAPES:
            kwargs = {**hf_batch(name, 2, size=b, length=t), **no_cache}
            with torch.no_grad():
                out, ref = compiled(**kwargs), model(**kwargs)
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert _recaptures(record) == []


def test_our_gpt_sequence_length_is_symbolic():
    """Captured at its full length 16 (the length a sliced mask buffer used to pin)."""
    model = tiny_gpt()
    x = torch.randint(0, 64, (2, 16))
    compiled = strato.compile(model, example_inputs=(x, x))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for b, t in [(1, 16), (3, 9), (7, 4)]:
            y = torch.randint(0, 64, (b, t))
            assert_parity(model, compiled, (y, y), atol=1e-5, reduce=lambda loss: loss)
    assert _recaptures(record) == []


class PinnedLength(nn.Module):
    """Scales by the length as a Python float: export must specialise the length."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) / float(x.shape[1])


def test_fixed_dimension_captures_again_with_a_note_and_a_bounded_cache():
    model = PinnedLength()
    compiled = strato.compile(model, example_inputs=(torch.randn(2, 8, 4),))
    with pytest.warns(UserWarning, match=r"x\.size\(\)\[1\] == 8"):
        assert_parity(model, compiled, (torch.randn(3, 5, 4),))
    with warnings.catch_warnings(record=True) as record:  # that graph is kept
        warnings.simplefilter("always")
        assert_parity(model, compiled, (torch.randn(4, 5, 4),))
    assert _recaptures(record) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for length in range(9, 9 + MAX_RECAPTURES):
            assert_parity(model, compiled, (torch.randn(2, length, 4),))
    assert len(compiled._recaptured[True]) == MAX_RECAPTURES
    assert_parity(model, compiled, (torch.randn(2, 8, 4),))  # the example's graph stays
