"""Strategy(inference_backend='inductor'): quantized linears lowered to aten's packed CPU
kernels (pass lower_quantized_linears; decode-sized inputs: Strato's GEMV kernels on a
blocked layout), then
torch.compile. The lowered FX graph must give
the same numbers as the Strato ops it replaces (they call the same kernels); the compiled
graph must generate the same tokens.

Tolerance for compiled vs FX logits, BF16_TOL: activations are cast to bf16 before every
quantized matmul, and inductor may round the fp32 glue before a cast differently (fused
RMSNorm, for one), flipping a bf16 rounding (2^-9 relative) and moving logits of these
~0.1-1 magnitude models by up to a few 1e-3 (measured 2e-3)."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tiny_llama

import strato
from strato.kernels import cpu_gemv
from strato.kernels import quantized_linear as ql
from strato.passes.lower_quantized import LOWERED_TARGETS
from strato.runtime.generate import Generator

transformers = pytest.importorskip("transformers")
has_cxx = any(shutil.which(c) for c in ("g++", "clang++", "c++"))
BF16_TOL = 1e-2


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    # K = 96 is padded to the int4 group (64) and the LM head's 250 rows to 16s.
    return tiny_llama(
        vocab_size=250, hidden_size=64, intermediate_size=96, max_position_embeddings=64
    ).eval()


SCHEMES = {
    "int4 sym": strato.Quantize(weights="int4", group_size=64),
    "int4 asym": strato.Quantize(weights="int4", group_size=64, symmetric=False),
    "int8": strato.Quantize(weights="int8"),
}


@pytest.mark.parametrize(
    "scheme", [pytest.param(s, marks=pytest.mark.slow) if s != "int8" else s for s in SCHEMES]
)
def test_lowered_graph_equals_the_quantized_ops(llama, scheme):
    ids = torch.randint(0, 250, (2, 7))
    kwargs = {"example_inputs": (ids,), "example_kwargs": {"use_cache": False}}
    portable = strato.compile(llama, strato.Strategy(quantize=SCHEMES[scheme]), **kwargs)
    lowered = strato.compile(
        llama,
        strato.Strategy(quantize=SCHEMES[scheme], inference_backend="inductor"),
        **kwargs,
    )
    record = lowered.context.records["lower_quantized_linears"]
    ops = [
        n
        for n in portable.graph.graph.nodes
        if n.target in (ql.quant_linear_int4, ql.quant_linear_int8)
    ]
    assert sum(record["lowered"].values()) == len(ops) > 0
    targets = {n.target for n in lowered.graph.graph.nodes if n.op == "call_function"}
    assert targets & set(LOWERED_TARGETS)
    assert not targets & {ql.quant_linear_int4, ql.quant_linear_int8}
    assert not any(name.endswith("qweight") for name, _ in lowered.graph.named_buffers()) or (
        scheme == "int8"  # int8 keeps its weight tensor: the packed kernel reads it as is
    )
    with torch.no_grad():
        want = portable(ids, use_cache=False).logits
        got = lowered.graph(ids, use_cache=False).logits  # the FX graph, not compiled
    assert torch.equal(got, want)


def test_asymmetric_int8_stays_a_strato_op_and_says_why(llama):
    ids = torch.randint(0, 250, (2, 7))  # more rows than the GEMV kernels take
    compiled = strato.compile(
        llama,
        strato.Strategy(
            quantize=strato.Quantize(weights="int8", symmetric=False), inference_backend="inductor"
        ),
        example_inputs=(ids,),
        example_kwargs={"use_cache": False},
    )
    record = compiled.context.records["lower_quantized_linears"]
    assert not record["lowered"]
    assert all("asymmetric" in why for why in record["kept"].values()) and record["kept"]


def test_export_refuses_a_lowered_graph(llama, tmp_path):
    ids = torch.randint(0, 250, (2, 7))
    compiled = strato.compile(
        llama,
        strato.Strategy(quantize=SCHEMES["int8"], inference_backend="inductor"),
        example_inputs=(ids,),
        example_kwargs={"use_cache": False},
    )
    with pytest.raises(strato.StratoError, match="inference_backend='fx'"):
        strato.export(compiled, tmp_path / "model.strato")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not cpu_gemv.available(), reason="Strato's CPU GEMV kernels do not run here")
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_decode_sized_inputs_are_lowered_to_the_blocked_gemv_ops(llama, scheme):
    """A one-token input is lowered to the GEMV op on blocked codes (the portable codes are
    dropped), the record says so, and the graph gives the portable graph's numbers bit for
    bit (the same kernel reads the same bytes, reordered)."""
    ids = torch.randint(0, 250, (1, 1))
    kwargs = {"example_inputs": (ids,), "example_kwargs": {"use_cache": False}}
    portable = strato.compile(llama, strato.Strategy(quantize=SCHEMES[scheme]), **kwargs)
    lowered = strato.compile(
        llama, strato.Strategy(quantize=SCHEMES[scheme], inference_backend="inductor"), **kwargs
    )
    record = lowered.context.records["lower_quantized_linears"]
    ops = [
        n
        for n in portable.graph.graph.nodes
        if n.target in (ql.quant_linear_int4, ql.quant_linear_int8)
    ]
    gemv = f"{scheme.split()[0]} gemv"
    assert record["lowered"] == {gemv: len(ops)} and not record["kept"]
    targets = [n.target for n in lowered.graph.graph.nodes if n.op == "call_function"]
    assert targets.count(ql.cpu_gemv_int8) + targets.count(ql.cpu_gemv_int4) == len(ops)
    buffers = [name for name, _ in lowered.graph.named_buffers()]
    assert not any(name.endswith("qweight") for name in buffers)
    assert sum(name.endswith("__gemv_blocks") for name in buffers) == len(ops)
    with torch.no_grad():
        want = portable(ids, use_cache=False).logits
        assert torch.equal(lowered.graph(ids, use_cache=False).logits, want)


def test_unknown_backend_is_a_strategy_error():
    with pytest.raises(strato.StrategyError, match="inference_backend"):
        strato.Strategy(inference_backend="tvm")
    with pytest.raises(strato.StrategyError, match="stage-3"):
        strato.Strategy(zero=3, optimizer=strato.AdamW(), inference_backend="inductor")


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx, reason="inductor needs a C++ compiler on CPU")
def test_inductor_decode_generates_the_same_tokens(llama):
    """Greedy tokens from the compiled int4 prefill/decode graphs equal the FX graphs';
    logits within BF16_TOL."""
    prompt = torch.randint(0, 250, (1, 6))
    quantize = SCHEMES["int4 sym"]
    fx_gen = Generator(llama, strato.Strategy(quantize=quantize), max_len=32)
    ind_gen = Generator(
        llama, strato.Strategy(quantize=quantize, inference_backend="inductor"), max_len=32
    )
    assert torch.equal(ind_gen.generate(prompt, 6).tokens, fx_gen.generate(prompt, 6).tokens)
    keys, values = fx_gen.empty_cache()
    with torch.no_grad():
        args = (prompt, torch.tensor(0), fx_gen.full_mask(), keys, values)
        want = fx_gen.graph(6)(*args)[0]
        got = ind_gen.graph(6)(*args)[0]
    torch.testing.assert_close(got, want, atol=BF16_TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx, reason="inductor needs a C++ compiler on CPU")
def test_exported_artifact_served_with_inductor(llama, tmp_path):
    """An artifact exported from the portable ('fx') graph, loaded with
    inference_backend='inductor': lowered on load, outputs within BF16_TOL of the plain load."""
    ids = torch.randint(0, 250, (2, 7))
    compiled = strato.compile(
        llama,
        strato.Strategy(quantize=SCHEMES["int4 asym"]),
        example_inputs=(ids,),
        example_kwargs={"use_cache": False},
    )
    path = strato.export(compiled, tmp_path / "model.strato")
    plain = strato.load(path)
    served = strato.load(path, inference_backend="inductor")
    # The artifact keeps batch and length symbolic (one file for every shape); lowering
    # needs fixed row counts, so inductor compiles the portable ops (a known gap).
    assert served.lowering == {"skipped": "input shapes are not all fixed"} and not plain.lowering
    want = plain(ids, use_cache=False).logits
    got = served(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=BF16_TOL, rtol=0)
    with pytest.raises(ValueError, match="inference_backend"):
        strato.load(path, inference_backend="tensorrt")
