"""simplify_inference: eval graphs lose asserts, no-op casts and duplicates, and still match eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import assert_parity, tiny_llama

import strato


class Repeats(nn.Module):
    """Recomputes one mask per layer and casts to the dtype it already has, as HF models do."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            mask = ~torch.ones(8, 8, dtype=torch.bool).tril(-1)[1]
            x = layer(x.to(torch.float32)).masked_fill(mask, 0.0)
            x = torch.nn.functional.dropout(x, 0.5, self.training)
        return x


def _calls(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


def test_eval_graph_merges_duplicates_and_matches_eager():
    model = Repeats().eval()
    x = torch.randn(4, 8)
    compiled = strato.compile(model, example_inputs=(x,))
    record = compiled.context.records["simplify_inference"]
    assert record["merged"] >= 2  # the per-layer masks become one
    assert _calls(compiled.graph, torch.ops.aten.bitwise_not.default) == 1
    assert _calls(compiled.graph, torch.ops.aten._assert_tensor_metadata.default) == 0
    # Eval: no gradients needed for parity of values, but they must flow all the same.
    assert_parity(model, compiled, (x,))


def test_training_graph_is_left_alone():
    model = Repeats().train()
    x = torch.randn(4, 8)
    compiled = strato.compile(model, example_inputs=(x,))
    assert compiled.context.records["simplify_inference"] == {"skipped": "training graph"}
    # Random ops are never merged: each layer keeps its own dropout.
    assert _calls(compiled.graph, torch.ops.aten.dropout.default) == 3
    assert_parity(model, compiled, (x,))


def test_hugging_face_llama_eval_graph_shrinks_and_matches():
    model = tiny_llama().eval()
    ids = torch.randint(0, 100, (2, 12))
    kwargs = {"use_cache": False}
    full = strato.compile(
        model,
        strato.Strategy(disable=["simplify_inference"]),
        example_inputs=(ids,),
        example_kwargs=kwargs,
    )
    simplified = strato.compile(model, example_inputs=(ids,), example_kwargs=kwargs)
    assert len(simplified.graph.graph.nodes) < len(full.graph.graph.nodes)
    assert_parity(model, simplified, (ids,), kwargs, reduce=lambda out: out.logits.pow(2).mean())


class NoGradRotary(nn.Module):
    """Computes rotary-style angles under torch.no_grad(), as HF rotary embeddings do."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))

    def forward(self, x):
        with torch.no_grad():
            t = torch.arange(x.shape[1], dtype=torch.float32)
            angles = torch.outer(t, self.inv_freq).repeat(1, 2)
        return self.proj(x) * angles.cos() + x * angles.sin()


def test_grad_mode_regions_are_inlined_so_the_graph_exports(tmp_path):
    """Export wraps a torch.no_grad() block in a wrap_with_set_grad_enabled submodule, which an
    eval graph inlines (and can then export). Our own module, so the test does not depend on
    how a given transformers release writes its rotary embedding."""
    model = NoGradRotary().eval()
    x = torch.randn(2, 5, 8)
    hop = torch.ops.higher_order.wrap_with_set_grad_enabled
    full = strato.compile(
        model, strato.Strategy(disable=["simplify_inference"]), example_inputs=(x,)
    )
    assert _calls(full.graph, hop) >= 1  # what capture gives
    simplified = strato.compile(model, example_inputs=(x,))
    assert simplified.context.records["simplify_inference"]["inlined_grad_mode_regions"] >= 1
    assert _calls(simplified.graph, hop) == 0
    assert not any(
        n.op == "get_attr" and n.target.startswith("submod") for n in simplified.graph.graph.nodes
    )
    assert_parity(model, simplified, (x,))
    served = strato.load(strato.export(simplified, tmp_path / "rotary.strato"))
    with torch.no_grad():
        assert torch.equal(served(x), simplified(x))


@pytest.mark.slow  # ~12 s; the HF Llama eval-graph test above stays in make test
def test_hugging_face_llama_eval_graph_exports(tmp_path):
    """The same on a real HF Llama (whose rotary embedding may or may not use no_grad)."""
    model = tiny_llama().eval()
    ids = torch.randint(0, 100, (2, 12))
    kwargs = {"use_cache": False}
    simplified = strato.compile(model, example_inputs=(ids,), example_kwargs=kwargs)
    hop = torch.ops.higher_order.wrap_with_set_grad_enabled
    assert _calls(simplified.graph, hop) == 0
    served = strato.load(strato.export(simplified, tmp_path / "llama.strato"))
    with torch.no_grad():
        assert torch.equal(served(ids, **kwargs).logits, simplified(ids, **kwargs).logits)
