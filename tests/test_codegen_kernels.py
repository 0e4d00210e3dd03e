"""Every kernel template (and the hand-written attention kernel) under TRITON_INTERPRET=1
matches its torch reference, forward and backward, in fp32, bf16 and fp16, on shapes that
are not multiples of the block size and span several programs (the interpreter's blocks
hold 4096 elements). The oracle is the reference ops run in fp32 on the
same (rounded) inputs; low-precision kernels compute in fp32 and round once, so they sit
within a few ulps of it.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

from strato.codegen.region import (  # noqa: E402
    Ref,
    Region,
    RegionOp,
    run_reference,
    seeded_dropout,
)
from strato.kernels.attention import attention, attention_packed, covers_exactly  # noqa: E402
from strato.kernels.fused import fused_op  # noqa: E402
from strato.kernels.launch import count_launches  # noqa: E402

aten = torch.ops.aten
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True)
def _triton(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("STRATO_KERNELS", "triton")
    monkeypatch.setenv("STRATO_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))


def close(actual, expected, dtype, what):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol, msg=what)


def check_region(region: Region, inputs: list[torch.Tensor], dtype):
    """Run the region's fused op (Triton) and the fp32 reference; compare values and grads."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    with count_launches() as launched:
        outs = fused_op(region)(leaves)
        grads = [torch.randn_like(o) for o in outs]
        wrt = [x for x in leaves if x.requires_grad]
        got = torch.autograd.grad(outs, wrt, grads)
    assert launched.launches == {f"{region.kind}_forward": 1, f"{region.kind}_backward": 1}
    ref_leaves = [
        x.detach().float().requires_grad_(True) if x.is_floating_point() else x for x in inputs
    ]
    ref_outs = run_reference(region, ref_leaves)
    want = torch.autograd.grad(
        ref_outs, [x for x in ref_leaves if x.requires_grad], [g.float() for g in grads]
    )
    for k, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == r.dtype or region.output_dtypes[k] == o.dtype
        assert o.shape == r.shape
        close(o, r, dtype, f"output {k}")
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == wrt[k].dtype and g.shape == wrt[k].shape
        close(g, w, dtype, f"grad of input {k}")


def op(name, target, *args, **kwargs):
    return RegionOp(name, target, tuple(args), kwargs)


def region(kind, ops, n_inputs, dtype, outputs, out_dtypes=None, **extra):
    return Region(
        kind=kind,
        name=f"test:{kind}",
        ops=tuple(ops),
        n_inputs=n_inputs,
        input_dtypes=(dtype,) * n_inputs,
        outputs=tuple(outputs),
        output_dtypes=tuple(out_dtypes or [dtype] * len(outputs)),
        **extra,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_pointwise_bias_gelu_residual(dtype):
    # (x + bias) -> gelu(tanh) * 0.5 + residual; the pre-activation is exported too.
    ops = [
        op("pre", aten.add.Tensor, Ref("in0"), Ref("in1")),
        op("act", aten.gelu.default, Ref("pre"), approximate="tanh"),
        op("half", aten.mul.Tensor, Ref("act"), 0.5),
        op("out", aten.add.Tensor, Ref("half"), Ref("in2"), alpha=2),
    ]
    r = region("pointwise", ops, 3, dtype, ["out", "pre"])
    x, bias, res = (
        torch.randn(7, 9, 71, dtype=dtype),
        torch.randn(71, dtype=dtype),
        torch.randn(7, 9, 71, dtype=dtype),
    )
    check_region(r, [x, bias, res], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pointwise_unary_chain_and_cast(dtype):
    ops = [
        op("a", aten.silu.default, Ref("in0")),
        op("b", aten.tanh.default, Ref("in1")),
        op("c", aten.sub.Tensor, Ref("a"), Ref("b")),
        op("d", aten.mul.Tensor, Ref("c"), Ref("in2")),
        op("e", aten.pow.Tensor_Scalar, Ref("in0"), 2),
        op("f", aten.add.Tensor, Ref("e"), 1.0),
        op("g", aten.rsqrt.default, Ref("f")),
        op("h", aten.div.Tensor, Ref("d"), Ref("g")),
        op("i", aten.neg.default, Ref("h")),
        op("j", aten.relu.default, Ref("i")),
        op("k", aten.exp.default, Ref("in1")),
        op("l", aten.sigmoid.default, Ref("k")),
        op("m", aten.mul.Tensor, Ref("j"), Ref("l")),
        op("n", aten._to_copy.default, Ref("m"), dtype=torch.float32),
    ]
    r = region("pointwise", ops, 3, dtype, ["n"], [torch.float32])
    x, y = torch.randn(61, 83, dtype=dtype), torch.randn(61, 83, dtype=dtype)
    scale = torch.tensor(1.5, dtype=dtype)  # a 0-d tensor operand
    check_region(r, [x, y, scale], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_residual_bias_layer_norm(dtype):
    # h = x + bias + residual (exported), y = layer_norm(h) * w + b
    ops = [
        op("xb", aten.add.Tensor, Ref("in0"), Ref("in1")),
        op("h", aten.add.Tensor, Ref("xb"), Ref("in2")),
        op("y", aten.layer_norm.default, Ref("h"), [37], Ref("in3"), Ref("in4"), 1e-5, False),
    ]
    r = region("row", ops, 5, dtype, ["h", "y"], row_op="y", column_inputs=(1,))
    n = (3, 50, 37)
    inputs = [
        torch.randn(n, dtype=dtype),
        torch.randn(37, dtype=dtype),
        torch.randn(n, dtype=dtype),
    ]
    inputs += [1 + 0.1 * torch.randn(37, dtype=dtype), torch.randn(37, dtype=dtype)]
    check_region(r, inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_rms_norm(dtype):
    ops = [
        op("s", aten.mul.Tensor, Ref("in0"), 2.0),
        op("y", aten.rms_norm.default, Ref("s"), [45], Ref("in1"), None),
    ]
    r = region("row", ops, 2, dtype, ["y"], row_op="y")
    check_region(r, [torch.randn(130, 45, dtype=dtype), torch.randn(45, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["softmax", "log_softmax"])
def test_row_softmax_with_scale_and_mask(dtype, kind):
    target = aten.softmax.int if kind == "softmax" else aten.log_softmax.int
    ops = [
        op("s", aten.mul.Tensor, Ref("in0"), 0.3),
        op("m", aten.add.Tensor, Ref("s"), Ref("in1")),
        op("y", target, Ref("m"), -1),
    ]
    r = region("row", ops, 2, dtype, ["y"], row_op="y")
    t = 19
    mask = torch.full((t, t), float("-inf")).triu(1).to(dtype)
    check_region(r, [torch.randn(4, 5, t, t, dtype=dtype), mask], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", [1, 2])
def test_cross_entropy(dtype, reduction):
    ops = [
        op("loss", aten.cross_entropy_loss.default, Ref("in0"), Ref("in1"), None, reduction, -100)
    ]
    r = Region(
        kind="cross_entropy",
        name="test:ce",
        ops=tuple(ops),
        n_inputs=2,
        input_dtypes=(dtype, torch.int64),
        outputs=("loss",),
        output_dtypes=(dtype,),
    )
    targets = torch.randint(0, 37, (150,))
    targets[[2, 5]] = -100  # ignored rows
    check_region(r, [3 * torch.randn(150, 37, dtype=dtype), targets], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [True, False])
def test_attention(dtype, masked):
    b, h, t, d = 2, 3, 13, 10
    qkv = torch.randn(b, t, 3, h, d, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3))
    mask = torch.full((t, t), float("-inf")).triu(1).to(dtype) if masked else None
    with count_launches() as launched:
        out = attention(q, k, v, mask, 0.3)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, [q, k, v], grad)
    assert launched.launches == {"attention_forward": 1, "attention_backward": 1}
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    scores = ref_in[0] @ ref_in[1].transpose(-2, -1) * 0.3
    ref = (scores + mask.float() if masked else scores).softmax(-1) @ ref_in[2]
    want = torch.autograd.grad(ref, ref_in, grad.float())
    close(out, ref, dtype, "attention output")
    for name, g, w in zip("qkv", got, want):
        close(g, w, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_packed_writes_one_gradient(dtype):
    b, t, h, d = 2, 11, 2, 12
    c = h * d
    qkv = torch.randn(b, t, 3 * c, dtype=dtype, requires_grad=True)
    views = [qkv[..., i * c : (i + 1) * c].view(b, t, h, d).transpose(1, 2) for i in range(3)]
    layouts = [x for view in views for x in (view.storage_offset(), *view.stride())]
    assert covers_exactly(t * 3 * c, layouts, [h, t, d])
    mask = torch.full((t, t), float("-inf")).triu(1).to(dtype)
    out = attention_packed(qkv, layouts, [h, t, d], True, mask, 0.25)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, [qkv], grad)
    ref_qkv = qkv.detach().float().requires_grad_()
    q, k, v = (ref_qkv[..., i * c : (i + 1) * c].view(b, t, h, d).transpose(1, 2) for i in range(3))
    ref = ((q @ k.transpose(-2, -1)) * 0.25 + mask.float()).softmax(-1) @ v
    (want,) = torch.autograd.grad(ref, [ref_qkv], grad.float())
    close(out, ref, dtype, "packed attention output")
    close(got, want, dtype, "dqkv")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_mask_is_random_and_the_backward_reuses_it(monkeypatch, backend, dtype):
    monkeypatch.setenv("STRATO_KERNELS", backend)
    p = 0.3
    ops = [
        RegionOp("d", seeded_dropout, (Ref("in0"), p, Ref("seed"), 0)),
        op("y", aten.add.Tensor, Ref("d"), Ref("in1")),
    ]
    r = region("pointwise", ops, 2, dtype, ["y"])
    x = (torch.rand(80, 53) + 1).to(dtype).requires_grad_()
    res = torch.randn(80, 53, dtype=dtype)
    y, seed = fused_op(r)([x, res])
    (gx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    kept = (y - res).float().abs() > 1e-6
    assert 0.62 < kept.float().mean().item() < 0.78  # about 1 - p of the elements survive
    scale = 1 / (1 - p)
    torch.testing.assert_close(
        (y - res)[kept].float(), (x[kept] * scale).float(), atol=TOL[dtype] * 4, rtol=TOL[dtype]
    )
    torch.testing.assert_close(gx.float(), kept.float() * scale, atol=TOL[dtype], rtol=0)
    y2, seed2 = fused_op(r)([x, res])
    assert int(seed2) != int(seed) and not torch.equal(y2, y)
