"""Strato's AVX2 GEMV kernels (kernels/cpu_gemv.c) against the dequantize-then-matmul
references, on shapes that are not multiples of the kernels' 4-row blocks or 16/32-column
steps, in both code layouts (portable, and blocked: the same bytes reordered, so the same
results bit for bit, but for int8 rows that end in a partial 16-column step, which the
blocked layout pads with zeros and the portable one sums apart), and the ops' choice of
them.

Tolerance: the kernels round each row of x to 16-bit fixed point (step amax / 32767, so
an error of at most half a step per element) and accumulate in int32 / fp32; the error of
y[m, n] is therefore at most sum_k |w[n, k]| * amax_m / 65534, plus fp32 rounding of the
sums. TOL_FACTOR doubles that bound."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import strato
from strato.kernels import cpu_gemv
from strato.kernels import quantized_linear as ql

pytestmark = pytest.mark.skipif(
    not cpu_gemv.available(), reason="Strato's CPU GEMV kernels do not run here (no AVX2 or cc)"
)
TOL_FACTOR = 2.0


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    x64, w64 = x.reshape(-1, x.shape[-1]).double(), w.double()
    want = x64 @ w64.T
    amax = x64.abs().amax(dim=1, keepdim=True)
    bound = TOL_FACTOR * (amax / 65534) * w64.abs().sum(dim=1)[None] + 1e-6 * want.abs() + 1e-6
    err = (y.reshape(want.shape).double() - want).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound {bound.min().item():.3g}"


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize(("n", "k"), [(1, 16), (5, 100), (33, 768), (130, 37)])
def test_int8_gemv_matches_the_dequantized_product(symmetric, rows, n, k):
    torch.manual_seed(n * k + rows)
    qw = ql.quantize_int8(torch.randn(n, k), symmetric=symmetric)
    x = torch.randn(rows, k) * 3
    y = cpu_gemv.int8_gemv(x, qw.qweight, qw.scales, qw.zeros)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    _check(y, x, ql.dequantize_int8(qw))
    blocks = cpu_gemv.block_codes(qw.qweight)
    y_blocked = cpu_gemv.int8_gemv(x, blocks, qw.scales, qw.zeros, blocked=True)
    _check(y_blocked, x, ql.dequantize_int8(qw))
    assert torch.equal(y_blocked, y) or k % 16


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize(("n", "k", "rows"), [(1, 256, 1), (7, 300, 2), (66, 512, 8)])
def test_int4_gemv_matches_the_dequantized_product(symmetric, group_size, n, k, rows):
    torch.manual_seed(n + k + group_size)
    qw = ql.quantize_int4(torch.randn(n, k), group_size=group_size, symmetric=symmetric)
    x = torch.randn(2, rows, k)  # leading dims kept; K padded to the group inside
    y = cpu_gemv.int4_gemv(x, qw.qweight, qw.scales, qw.zeros, group_size)
    assert y.shape == (2, rows, n)
    _check(y, x, ql.dequantize_int4(qw))
    blocks = cpu_gemv.block_codes(qw.qweight)
    y_blocked = cpu_gemv.int4_gemv(x, blocks, qw.scales, qw.zeros, group_size, blocked=True)
    assert torch.equal(y_blocked, y)


def test_int32_sums_do_not_overflow():
    """The largest codes times the largest activations over a long row: 127 * 32767 * 8192
    would overflow int32 four times over without the kernels' periodic flush to fp32."""
    k = 8192
    qweight = torch.full((4, k), 127, dtype=torch.int8)
    scales = torch.ones(4)
    y = cpu_gemv.int8_gemv(torch.ones(1, k), qweight, scales, None)
    # (exact but for the fp32 rounding of the fixed-point step 1 / 32767)
    torch.testing.assert_close(y, torch.full((1, 4), 127.0 * k), rtol=1e-6, atol=0)
    codes = torch.full((4, k // 2), 0xFF, dtype=torch.uint8)  # u = 15 everywhere, z = 8
    y4 = cpu_gemv.int4_gemv(torch.ones(1, k), codes, torch.ones(4, k // 256), None, 256)
    torch.testing.assert_close(y4, torch.full((1, 4), 7.0 * k), rtol=1e-6, atol=0)


def test_mismatched_tensors_are_refused_before_the_kernel_reads_them():
    qw = ql.quantize_int8(torch.randn(8, 64))
    with pytest.raises(ValueError, match="does not fit"):
        cpu_gemv.int8_gemv(torch.randn(1, 32), qw.qweight, qw.scales, None)
    with pytest.raises(ValueError, match="contiguous torch.int8 codes"):
        cpu_gemv.int8_gemv(torch.randn(1, 8), qw.qweight.t(), qw.scales, None)
    q4 = ql.quantize_int4(torch.randn(8, 64), group_size=32)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_gemv.int4_gemv(torch.randn(1, 64), q4.qweight, q4.scales[:, :1], None, 32)
    with pytest.raises(ValueError, match="blocked codes for 8 rows"):  # portable, not blocked
        cpu_gemv.int4_gemv(torch.randn(1, 64), q4.qweight, q4.scales, None, 32, blocked=True)
    with pytest.raises(ValueError, match="do not have the scales' 4 rows"):
        cpu_gemv.int8_gemv(torch.randn(1, 64), qw.qweight, qw.scales[:4], None)


def test_threads_split_rows_without_changing_results():
    torch.manual_seed(0)
    qw = ql.quantize_int4(torch.randn(300, 512), group_size=64)
    x = torch.randn(3, 512)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gemv.int4_gemv(x, qw.qweight, qw.scales, qw.zeros, 64)
        torch.set_num_threads(2)
        two = cpu_gemv.int4_gemv(x, qw.qweight, qw.scales, qw.zeros, 64)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)  # each output row is summed by one thread, in one order


def test_ops_use_the_gemv_for_few_rows_and_the_packed_kernels_for_many(monkeypatch):
    torch.manual_seed(0)
    qw = ql.quantize_int8(torch.randn(64, 128))
    calls = []
    real = cpu_gemv.int8_gemv
    monkeypatch.setattr(cpu_gemv, "int8_gemv", lambda *a: calls.append(1) or real(*a))
    bias = torch.randn(64)
    few, many = torch.randn(1, 1, 128), torch.randn(4, cpu_gemv.MAX_ROWS, 128)
    y_few = ql.call_quantized_linear(few, qw, bias)
    assert len(calls) == 1 and y_few.shape == (1, 1, 64)
    ql.call_quantized_linear(many, qw, bias)
    assert len(calls) == 1  # 32 rows: aten's packed kernel
    _check(y_few - bias, few, ql.dequantize_int8(qw))
    with ql.reference_kernels():
        ql.call_quantized_linear(few, qw, bias)
    assert len(calls) == 1


def test_quantized_decode_step_matches_the_reference_kernels():
    """A one-token step through a quantized Llama: GEMV kernels vs dequantize-then-matmul."""
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=250, hidden_size=64, intermediate_size=96).eval()
    ids = torch.randint(0, 250, (1, 1))
    for quantize in (
        strato.Quantize(weights="int8"),
        strato.Quantize(weights="int4", group_size=32),
    ):
        compiled = strato.compile(
            model,
            strato.Strategy(quantize=quantize),
            example_inputs=(ids,),
            example_kwargs={"use_cache": False},
        )
        with torch.no_grad():
            got = compiled(ids, use_cache=False).logits
            with ql.reference_kernels():
                want = compiled(ids, use_cache=False).logits
        # Six layers of 16-bit activation rounding (2^-16 relative) on ~1-magnitude logits.
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)


def _available_in_a_fresh_process(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    code = "from strato.kernels import cpu_gemv; print(cpu_gemv.available())"
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "STRATO_CACHE_DIR": str(tmp_path), **env},
        timeout=120,
    )


def test_switch_and_broken_compiler_fall_back_with_a_warning(tmp_path):
    off = _available_in_a_fresh_process(tmp_path, STRATO_CPU_GEMV="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "False"
    broken = _available_in_a_fresh_process(tmp_path, CC="false")
    assert broken.returncode == 0, broken.stderr
    assert broken.stdout.strip() == "False"
    assert "CPU GEMV kernels are unavailable" in broken.stderr and "false" in broken.stderr
    assert not list(tmp_path.glob("*.so"))  # nothing half-built left behind
