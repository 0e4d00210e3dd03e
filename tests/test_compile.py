"""compile(): forward and gradient parity with eager (fp32, atol 1e-6) on several model families."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import TINY_GPT, assert_parity, tiny_llama

import strato
from examples.gpt import GPT


def test_mlp_parity_and_shared_parameters():
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(5, 8)
    compiled = strato.compile(model, example_inputs=(x,))
    assert_parity(model, compiled, (x,))
    # The model's parameters are the single source of truth: same objects, same names.
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]
    assert list(compiled.state_dict()) == list(model.state_dict())
    for name, param in model.named_parameters():
        assert compiled.graph.get_parameter(name) is param


def test_updating_model_weights_changes_compiled_output():
    model = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    compiled = strato.compile(model, example_inputs=(x,))
    with torch.no_grad():
        model.weight.add_(1.0)
    torch.testing.assert_close(compiled(x), model(x), atol=0, rtol=0)


def test_small_gpt_parity_with_targets_and_dynamic_batch():
    model = GPT(TINY_GPT)
    idx = torch.randint(0, TINY_GPT.vocab_size, (2, TINY_GPT.seq_len))
    compiled = strato.compile(model, example_inputs=(idx, idx))
    assert_parity(model, compiled, (idx, idx), reduce=lambda loss: loss)
    # Batch dimension is symbolic: another batch size runs through the same graph.
    idx5 = torch.randint(0, TINY_GPT.vocab_size, (5, TINY_GPT.seq_len))
    assert_parity(model, compiled, (idx5, idx5), reduce=lambda loss: loss)


def test_keyword_inputs():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x, *, scale: torch.Tensor, shift: float = 0.0):
            return self.lin(x) * scale + shift

    model = Scaled()
    x, scale = torch.randn(3, 6), torch.rand(3, 1)
    compiled = strato.compile(
        model, example_inputs=(x,), example_kwargs={"scale": scale, "shift": 0.5}
    )
    assert_parity(model, compiled, (x,), {"scale": scale, "shift": 0.5})


def test_transformer_encoder_parity():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 10, 32)
    compiled = strato.compile(model, example_inputs=(x,))
    assert_parity(model, compiled, (x,))


transformers = pytest.importorskip("transformers")


def _hf_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)
    )
    llama = tiny_llama()
    return {"gpt2": gpt2, "llama": llama}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hugging_face_parity(name):
    model = _hf_models()[name].eval()  # eval: GPT-2's dropout would make runs differ
    ids = torch.randint(0, 100, (2, 12))
    kwargs = {"use_cache": False}
    compiled = strato.compile(model, example_inputs=(ids,), example_kwargs=kwargs)
    assert_parity(model, compiled, (ids,), kwargs, reduce=lambda out: out.logits.pow(2).mean())


def test_hugging_face_default_cache_is_captured_off_with_a_note():
    """A KV-cache object is no graph output: without use_cache in the example, capture
    passes use_cache=False (one warning) and the logits still equal eager's."""
    model = _hf_models()["llama"].eval()
    ids = torch.randint(0, 100, (2, 12))
    with pytest.warns(UserWarning, match="capturing with use_cache=False"):
        compiled = strato.compile(model, example_inputs=(ids,))
    out = compiled(ids)
    assert out.past_key_values is None
    torch.testing.assert_close(out.logits, model(ids).logits, atol=1e-6, rtol=0)


def test_uncapturable_model_names_module_and_line():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # branches on a tensor value: neither export nor FX can trace
                return x * 2
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = DataDependent()

        def forward(self, x):
            return self.inner(x) + 1

    with pytest.raises(strato.CaptureError) as info:
        strato.compile(Outer(), example_inputs=(torch.randn(3),))
    message = str(info.value)
    assert "'inner'" in message
    assert "test_compile.py" in message
    assert "torch.cond" in message


@torch.fx.wrap
def _clamp_if_positive(x):
    # Branches on a value: export cannot trace it, FX keeps it as one opaque call.
    return x.clamp(max=1.0) if x.sum() > 0 else x


def test_falls_back_to_symbolic_trace_when_export_fails():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return _clamp_if_positive(self.lin(x))

    model = Model()
    x = torch.randn(3, 4)
    compiled = strato.compile(model, example_inputs=(x,))
    assert compiled.context.capture_method == "symbolic_trace"
    assert_parity(model, compiled, (x,))
    assert "f32[3, 4]" in compiled.print_graph()
