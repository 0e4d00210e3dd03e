"""Quantized inference: weight formats, the quantized-linear ops, and the quantize pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import strato
from strato.kernels import quantized_linear as ql

SCHEMES = {
    "int8-sym": lambda w: ql.quantize_int8(w, symmetric=True),
    "int8-asym": lambda w: ql.quantize_int8(w, symmetric=False),
    "int4-g32-sym": lambda w: ql.quantize_int4(w, group_size=32, symmetric=True),
    "int4-g64-asym": lambda w: ql.quantize_int4(w, group_size=64, symmetric=False),
}


def _step(qw: ql.QuantizedWeight) -> torch.Tensor:
    """The quantization step of every weight element, [N, K]."""
    if qw.scheme == "int4":
        return qw.scales.repeat_interleave(qw.group_size, dim=1)[:, : qw.in_features]
    return qw.scales[:, None].expand(qw.out_features, qw.in_features)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(48, 128), (7, 100)])
def test_round_trip_error_is_within_half_a_step(scheme, shape):
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3  # rows of different ranges
    qw = SCHEMES[scheme](w)
    deq = ql.dequantize(qw)
    assert deq.shape == w.shape
    err = (deq - w).abs()
    assert (err <= _step(qw) / 2 * (1 + 1e-5) + 1e-7).all(), f"max err {err.max():.4g}"
    # Not trivially satisfied: the step is a real fraction of the range.
    levels = 15 if qw.scheme == "int4" else 255
    assert (_step(qw) <= 2.0 * w.abs().amax(1, keepdim=True) / (levels - 1) * 1.01).all()


def test_int4_odd_shapes_pad_k_and_n():
    w = torch.randn(7, 100)  # N not a multiple of 16, K not a multiple of the group
    qw = ql.quantize_int4(w, group_size=32)
    assert qw.qweight.shape == (7, 64) and qw.scales.shape == (7, 4)  # K padded to 128
    assert torch.equal(ql.dequantize_int4(qw, padded=True)[:, 100:], torch.zeros(7, 28))
    x = torch.randn(3, 100)
    ref = F.linear(x, ql.dequantize(qw))
    torch.testing.assert_close(ql.call_quantized_linear(x, qw, None), ref, atol=0.05, rtol=0.02)
    with pytest.raises(ql.QuantizationError, match="group_size"):
        ql.quantize_int4(w, group_size=48)
    with pytest.raises(ql.QuantizationError, match="2-D"):
        ql.quantize_int4(torch.randn(4, 4, 4))


def test_pack_unpack_int4_round_trip():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(ql.unpack_int4(ql.pack_int4(codes)), codes)


@pytest.mark.parametrize("scheme", [*SCHEMES, "int8-dynamic"])
def test_quantized_linear_matches_float_reference(scheme):
    n, k = 40, 96
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(2, 5, k)
    if scheme == "int8-dynamic":
        qw = ql.quantize_int8_dynamic(w, x.abs().amax(dim=(0, 1)), alpha=0.5)
    else:
        qw = SCHEMES[scheme](w)
    ref = F.linear(x, ql.dequantize(qw), b)
    with ql.reference_kernels():
        exact = ql.call_quantized_linear(x, qw, b)
    fast = ql.call_quantized_linear(x, qw, b)  # the CPU aten kernels (bf16 activations)
    scale = ref.abs().max()
    if scheme == "int8-dynamic":  # activations are quantized too: 7-bit per-tensor steps
        step = (x * qw.act_scale).abs().max() * 2 / 127
        assert (exact - ref).abs().max() <= step * ql.dequantize(qw).abs().sum(1).max()
        torch.testing.assert_close(fast, exact, atol=1e-4 * scale, rtol=0)
    else:
        torch.testing.assert_close(exact, ref, atol=1e-5 * scale, rtol=0)
        torch.testing.assert_close(fast, exact, atol=1e-2 * scale, rtol=0)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    k = 128
    x = torch.randn(512, k) @ torch.randn(k, k) * 0.3  # correlated features
    w = torch.randn(32, k)
    rtn = ql.quantize_int4(w, group_size=32)
    gptq = ql.quantize_int4(w, group_size=32, hessian=x.double().t() @ x.double())

    def out_err(qw):
        return (x @ ql.dequantize(qw).t() - x @ w.t()).pow(2).mean()

    assert out_err(gptq) < 0.8 * out_err(rtn)


# ---------------------------------------------------------------------- the pass


class MixedLinears(nn.Module):
    """Linear layers written five ways (linear, addmm and mm on W.t(), addmm and mm on a
    weight stored [in, out] as GPT-2's Conv1D does) plus one to skip."""

    STORED_IN_OUT = ("mix_weight", "proj_weight")

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down_weight = nn.Parameter(torch.randn(64, 128) * 0.1)
        self.down_bias = nn.Parameter(torch.randn(64) * 0.1)
        self.gate_weight = nn.Parameter(torch.randn(64, 64) * 0.1)
        self.mix_weight = nn.Parameter(torch.randn(64, 80) * 0.1)  # [in, out]
        self.mix_bias = nn.Parameter(torch.randn(80) * 0.1)
        self.proj_weight = nn.Parameter(torch.randn(80, 72) * 0.1)  # [in, out]
        self.head = nn.Linear(72, 10)

    def forward(self, x):
        h = F.gelu(self.up(x))
        h = torch.addmm(self.down_bias, h, self.down_weight.t())
        h = h + torch.mm(h, self.gate_weight.t())
        h = torch.addmm(self.mix_bias, h, self.mix_weight)
        h = torch.mm(h, self.proj_weight)
        return self.head(h)


def _ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize(
    "quantize",
    [
        strato.Quantize(weights="int8", skip=["head"]),
        strato.Quantize(weights="int4", group_size=32, symmetric=False, skip=["head"]),
        strato.Quantize(weights="int8", activations="int8", skip=["head"]),
    ],
    ids=["int8", "int4-asym", "int8-dyn"],
)
def test_pass_rewrites_linear_addmm_mm_and_matches_dequantized_eager(quantize):
    model = MixedLinears().eval()
    x = torch.randn(16, 64)
    compiled = strato.compile(model, strato.Strategy(quantize=quantize), example_inputs=(x,))
    ops = _ops(compiled.graph)
    quant_ops = [op for op in ops if op.startswith("strato.quant_linear")]
    assert len(quant_ops) == 5, ops
    assert ops.count("aten.linear.default") == 1  # the skipped head
    assert "aten.addmm.default" not in ops and "aten.mm.default" not in ops
    record = compiled.context.records["quantize"]
    assert sorted(rec["weight"] for rec in record["layers"].values()) == [
        "down_weight",
        "gate_weight",
        "mix_weight",
        "proj_weight",
        "up.weight",
    ]
    shapes = {rec["weight"]: rec["shape"] for rec in record["layers"].values()}
    assert shapes["mix_weight"] == [80, 64] and shapes["proj_weight"] == [72, 80]  # [out, in]
    assert record["skipped"] == {"head": "matches skip glob 'head'"}
    assert record["bytes_after"] < record["bytes_before"] / (3 if quantize.weights == "int8" else 5)

    # Oracle: eager PyTorch on the dequantized weights (the activation-quantized scheme
    # only within its quantization noise).
    gm = compiled.graph
    deq = {}
    for rec in record["layers"].values():
        tensors = {role: getattr(gm, name) for role, name in rec["buffers"].items()}
        qw = ql.QuantizedWeight(
            rec["scheme"],
            tensors["qweight"],
            tensors["scales"],
            tensors.get("zeros"),
            rec["shape"][1],
            rec["shape"][0],
            group_size=rec["group_size"],
            act_scale=tensors.get("act_scale"),
        )
        deq[rec["weight"]] = ql.dequantize(qw)
    reference = MixedLinears().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for weight_name, w in deq.items():  # (records hold [out, in] weights)
            stored_in_out = weight_name in MixedLinears.STORED_IN_OUT
            reference.get_parameter(weight_name).copy_(w.t() if stored_in_out else w)
        expected = reference(x)
        with ql.reference_kernels():
            got = compiled(x)
    tol = 1e-5 if quantize.activations is None else 0.05
    torch.testing.assert_close(got, expected, atol=tol * expected.abs().max(), rtol=0)
    # And quantization is close to the float model at all (int4 g32 noise, through five
    # quantized layers of random weights, reaches ~15% of the output range).
    with torch.no_grad():
        float_out = model(x)
    bound = 0.1 if quantize.weights == "int8" else 0.25
    assert (got - float_out).abs().max() < bound * float_out.abs().max()


def test_pass_leaves_training_graph_float_and_explain_counts_bytes():
    model = MixedLinears().eval()
    x = torch.randn(4, 64)
    compiled = strato.compile(
        model,
        strato.Strategy(quantize=strato.Quantize(weights="int4", group_size=32)),
        example_inputs=(x,),
    )
    before = sum(p.numel() * 4 for p in model.parameters())
    explained = compiled.explain()
    record = compiled.context.records["quantize"]
    assert explained.parameter_bytes == before - record["bytes_before"] + record["bytes_after"]
    assert any("quantize" in note for note in explained.notes)
    compiled.train()
    assert not any(op.startswith("strato.quant") for op in _ops(compiled.graph))


def test_quantize_config_errors_name_the_field():
    with pytest.raises(strato.StrategyError, match=r"Quantize.weights: .*'int3'"):
        strato.Quantize(weights="int3")
    with pytest.raises(strato.StrategyError, match="Quantize.group_size"):
        strato.Quantize(weights="int4", group_size=100)
    with pytest.raises(strato.StrategyError, match="Quantize.activations"):
        strato.Quantize(weights="int4", activations="int8")
    with pytest.raises(strato.StrategyError, match="Quantize.method"):
        strato.Quantize(weights="int8", method="gptq")
    with pytest.raises(strato.StrategyError, match="Strategy.quantize"):
        strato.Strategy(quantize="int8")
    strategy = strato.Strategy(quantize=strato.Quantize(weights="int4", skip=["lm_head"]))
    assert strato.Strategy.from_yaml(strategy.to_yaml()) == strategy


class SharedInput(nn.Module):
    """Three projections of one input (like attention q/k/v), one without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 32), nn.Linear(64, 48), nn.Linear(64, 32)
        self.gate = nn.Linear(64, 16, bias=False)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return q.view(*q.shape[:-1], 4, 8).sum(-1), k.sum(-1), v * 2, self.gate(x)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_sibling_layers_are_stacked_without_changing_results(weights):
    model = SharedInput().eval()
    x = torch.randn(2, 3, 64)
    outs = {}
    for stack in (True, False):
        group = {"group_size": 32} if weights == "int4" else {}
        quantize = strato.Quantize(weights=weights, stack_siblings=stack, **group)
        compiled = strato.compile(model, strato.Strategy(quantize=quantize), example_inputs=(x,))
        n_ops = sum(op.startswith("strato.quant_linear") for op in _ops(compiled.graph))
        assert n_ops == (2 if stack else 4)  # q/k/v (with bias) stacked; gate alone
        assert len(compiled.context.records["quantize"]["layers"]) == 4
        with torch.no_grad(), ql.reference_kernels():
            outs[stack] = compiled(x)
    for stacked, single in zip(outs[True], outs[False]):
        torch.testing.assert_close(stacked, single, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("capability", "want"), [("AVX2", "reference"), ("AVX512", "aten")])
def test_many_rows_dequantize_on_cpus_without_avx512(monkeypatch, capability, want):
    """aten's bf16 packed kernels are 2-3x slower than dequantize + fp32 BLAS on AVX2-only
    CPUs at large batch; on AVX-512 CPUs they stay. Both give the weight's product."""
    monkeypatch.setattr(ql, "_cpu_capability", lambda: capability)
    ran = []
    for name in ("int8_linear_reference", "_int8_linear_aten"):
        real = getattr(ql, name)
        monkeypatch.setattr(
            ql, name, lambda *a, _n=name, _f=real: ran.append(_n) or _f(*a), raising=True
        )
    qw = ql.quantize_int8(torch.randn(32, 64))
    x = torch.randn(2, ql.DEQUANTIZE_MIN_ROWS, 64)
    y = ql._int8_impl(x, qw.qweight, qw.scales, qw.zeros, None)
    assert ran == ["int8_linear_reference" if want == "reference" else "_int8_linear_aten"]
    expected = x @ ql.dequantize_int8(qw).t()
    torch.testing.assert_close(y, expected, atol=0.05 if want == "aten" else 1e-4, rtol=0.01)


def test_gptq_batched_over_layers_equals_one_at_a_time():
    """kernels/gptq.py stacks layers of one shape; each layer's codes are those it gets alone
    (asymmetric, K padded to the group size, a dead input column)."""
    from strato.kernels import gptq

    torch.manual_seed(0)
    weights, hessians = [], []
    for _ in range(3):
        x = torch.randn(256, 72) @ torch.randn(72, 72)
        x[:, 5] = 0.0
        hessians.append(x.double().t() @ x.double())
        weights.append(torch.randn(40, 72))
    batched = gptq.quantize_int4_gptq(
        weights, hessians, group_size=32, symmetric=False, names=["a", "b", "c"]
    )
    for w, h, qw in zip(weights, hessians, batched):
        alone = ql.quantize_int4(w, group_size=32, symmetric=False, hessian=h)
        assert torch.equal(qw.qweight, alone.qweight)
        assert torch.equal(qw.scales, alone.scales) and torch.equal(qw.zeros, alone.zeros)
        assert qw.in_features == 72 and qw.out_features == 40
    with pytest.raises(ql.QuantizationError, match=r"layer 'b': hessian must be \[72, 72\]"):
        gptq.quantize_int4_gptq(
            weights[:2],
            [hessians[0], hessians[1][:8, :8]],
            group_size=32,
            symmetric=True,
            names=["layer 'a'", "layer 'b'"],
        )
