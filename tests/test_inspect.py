"""print_graph, diff and explain read what capture and the passes left on the nodes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import TINY_GPT

import strato
from examples.gpt import GPT


@pytest.fixture(scope="module")
def compiled_gpt():
    model = GPT(TINY_GPT)
    idx = torch.randint(0, TINY_GPT.vocab_size, (2, TINY_GPT.seq_len))
    return model, strato.compile(model, example_inputs=(idx,))


def test_explain_parameter_bytes_equal_exact_sum(compiled_gpt):
    model, compiled = compiled_gpt
    # Tied embedding / LM head weight counts once, as it is stored once.
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    report = compiled.explain()
    assert report.parameter_bytes == expected
    assert report.gradient_bytes == expected  # every parameter trains
    assert report.activation_bytes > 0
    text = str(report)
    assert "parameters" in text and f"{expected:,d}" in text


def test_explain_in_eval_mode_has_no_gradients():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    compiled = strato.compile(model, example_inputs=(torch.randn(3, 4),))
    report = compiled.explain()
    assert report.gradient_bytes == 0
    assert report.parameter_bytes == (4 * 8 + 8 + 8 * 2 + 2) * 4


def test_print_graph_shows_op_shape_and_module(compiled_gpt):
    _, compiled = compiled_gpt
    text = compiled.print_graph()
    line = next(r for r in text.splitlines() if "aten.layer_norm" in r and "blocks.0.ln1" in r)
    assert "f32[" in line and ", 32]" in line
    assert any("aten.linear" in r and "blocks.1.mlp.0" in r for r in text.splitlines())


def test_diff_of_unknown_pass_lists_passes_that_ran(compiled_gpt):
    _, compiled = compiled_gpt
    with pytest.raises(KeyError, match="passes that ran: annotate_metadata"):
        compiled.diff("nope")
    assert isinstance(compiled.diff("eliminate_dead_code"), str)
