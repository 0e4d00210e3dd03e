"""The Triton dequantize-matmul kernels (template quant_linear.py.j2) under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402

from strato.kernels import quantized_linear as ql  # noqa: E402

SCHEMES = {
    "int8-sym": lambda w: ql.quantize_int8(w),
    "int8-asym": lambda w: ql.quantize_int8(w, symmetric=False),
    "int4-g32-sym": lambda w: ql.quantize_int4(w, group_size=32),
    "int4-g64-asym": lambda w: ql.quantize_int4(w, group_size=64, symmetric=False),
}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(40, 96), (7, 100)], ids=["even", "odd"])
def test_triton_kernel_matches_reference(scheme, shape, monkeypatch):
    n, k = shape
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(2, 9, k)
    qw = SCHEMES[scheme](w)
    with ql.reference_kernels():
        expected = ql.call_quantized_linear(x, qw, b)
    monkeypatch.setenv("STRATO_KERNELS", "triton")
    assert ql._kernel(x) == "triton"
    got = ql.call_quantized_linear(x, qw, b if n % 2 == 0 else None)
    if n % 2:
        expected = expected - b
    torch.testing.assert_close(got, expected, atol=1e-4 * expected.abs().max(), rtol=0)
