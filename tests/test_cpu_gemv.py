"""Strato's AVX2 GEMV kernels (kernels/cpu_gemv.c) against the dequantize-then-matmul
references, on shapes that are not multiples of the kernels' 4-row blocks or 16/32-column
steps, in both code layouts (portable, and blocked: the same bytes reordered, so the same
results bit for bit, but for int8 rows that end in a partial 32-column block, which the
two layouts sum in different orders), for both activation formats, through the Python
(ctypes) entry points and the C++ op kernels (kernels/cpu_gemv_ops.cpp); and the ops'
choice of them.

Tolerance: the int16 kernels round each row of x to 16-bit fixed point (step amax / 32767,
an error of at most half a step per element), the int8 ones each block of 32 columns to
int8 (step amax_block / 127); both accumulate exactly in int32, then in fp32. The error
of y[m, n] is therefore at most sum_k |w[n, k]| * step(m, k) / 2, plus fp32 rounding of
the sums. TOL_FACTOR doubles that bound."""

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
FORMATS = cpu_gemv.ACTIVATION_FORMATS


@pytest.fixture(params=FORMATS)
def activations(request, monkeypatch):
    """Each test below runs with both activation formats."""
    monkeypatch.setenv("STRATO_CPU_GEMV_ACTIVATIONS", request.param)
    return request.param


def _steps(x: torch.Tensor, activations: str) -> torch.Tensor:
    """The rounding step of every element of x [M, K] in the kernels' activation format."""
    if activations == "int16":
        return (x.abs().amax(dim=1, keepdim=True) / 32767).expand(x.shape)
    blocks = torch.nn.functional.pad(x, (0, -x.shape[1] % 32)).view(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=2, keepdim=True).expand(blocks.shape)
    return (amax / 127).reshape(x.shape[0], -1)[:, : x.shape[1]]


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, activations: str) -> None:
    x64, w64 = x.reshape(-1, x.shape[-1]).double(), w.double()
    want = x64 @ w64.T
    bound = TOL_FACTOR * (_steps(x64, activations) / 2) @ w64.abs().T
    bound = bound + 1e-6 * want.abs() + 1e-6
    err = (y.reshape(want.shape).double() - want).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound {bound.min().item():.3g}"


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize(("n", "k"), [(1, 16), (5, 100), (33, 768), (130, 37), (6, 48)])
def test_int8_gemv_matches_the_dequantized_product(activations, symmetric, rows, n, k):
    torch.manual_seed(n * k + rows)
    qw = ql.quantize_int8(torch.randn(n, k), symmetric=symmetric)
    x = torch.randn(rows, k) * 3
    y = cpu_gemv.int8_gemv(x, qw.qweight, qw.scales, qw.zeros)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    _check(y, x, ql.dequantize_int8(qw), activations)
    blocks = cpu_gemv.block_codes(qw.qweight)
    y_blocked = cpu_gemv.int8_gemv(x, blocks, qw.scales, qw.zeros, blocked=True)
    _check(y_blocked, x, ql.dequantize_int8(qw), activations)
    assert torch.equal(y_blocked, y) or k % 32


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize(("n", "k", "rows"), [(1, 256, 1), (7, 300, 2), (66, 512, 8), (5, 40, 3)])
def test_int4_gemv_matches_the_dequantized_product(activations, symmetric, group_size, n, k, rows):
    torch.manual_seed(n + k + group_size)
    qw = ql.quantize_int4(torch.randn(n, k), group_size=group_size, symmetric=symmetric)
    x = torch.randn(2, rows, k)  # leading dims kept; K padded to the group inside
    y = cpu_gemv.int4_gemv(x, qw.qweight, qw.scales, qw.zeros, group_size)
    assert y.shape == (2, rows, n)
    _check(y, x, ql.dequantize_int4(qw), activations)
    blocks = cpu_gemv.block_codes(qw.qweight)
    y_blocked = cpu_gemv.int4_gemv(x, blocks, qw.scales, qw.zeros, group_size, blocked=True)
    assert torch.equal(y_blocked, y)


def test_int16_activations_are_the_default_and_a_bad_format_is_refused(monkeypatch):
    """The two formats really are different kernels (int8 rounds coarser), and a typo in
    the variable is an error that names it, not a silent fallback."""
    torch.manual_seed(0)
    qw = ql.quantize_int4(torch.randn(64, 256), group_size=32)
    x = torch.randn(1, 256)
    monkeypatch.delenv("STRATO_CPU_GEMV_ACTIVATIONS", raising=False)
    default = cpu_gemv.int4_gemv(x, qw.qweight, qw.scales, qw.zeros, 32)
    monkeypatch.setenv("STRATO_CPU_GEMV_ACTIVATIONS", "int16")
    assert torch.equal(cpu_gemv.int4_gemv(x, qw.qweight, qw.scales, qw.zeros, 32), default)
    monkeypatch.setenv("STRATO_CPU_GEMV_ACTIVATIONS", "int8")
    coarse = cpu_gemv.int4_gemv(x, qw.qweight, qw.scales, qw.zeros, 32)
    want = x.double() @ ql.dequantize_int4(qw).double().T
    assert (default - want).abs().max() < (coarse - want).abs().max()
    monkeypatch.setenv("STRATO_CPU_GEMV_ACTIVATIONS", "fp8")
    with pytest.raises(cpu_gemv.GemvConfigError, match="STRATO_CPU_GEMV_ACTIVATIONS='fp8'"):
        cpu_gemv.int4_gemv(x, qw.qweight, qw.scales, qw.zeros, 32)


def test_int32_sums_do_not_overflow(activations):
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


@pytest.mark.parametrize("group_size", [32, 64])
def test_threads_split_rows_without_changing_results(activations, group_size):
    torch.manual_seed(0)
    q4 = ql.quantize_int4(torch.randn(301, 500), group_size=group_size, symmetric=False)
    q8 = ql.quantize_int8(torch.randn(301, 500), symmetric=False)
    b4, b8 = cpu_gemv.block_codes(q4.qweight), cpu_gemv.block_codes(q8.qweight)
    x = torch.randn(3, 500)
    previous = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = [
                cpu_gemv.int4_gemv(x, q4.qweight, q4.scales, q4.zeros, group_size),
                cpu_gemv.int4_gemv(x, b4, q4.scales, q4.zeros, group_size, blocked=True),
                cpu_gemv.int8_gemv(x, q8.qweight, q8.scales, q8.zeros),
                cpu_gemv.int8_gemv(x, b8, q8.scales, q8.zeros, blocked=True),
            ]
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(out[1], out[2]):
        assert torch.equal(one, two)  # each output row is summed by one thread, in one order
    _check(out[2][1], x, ql.dequantize_int4(q4), activations)


def test_ops_use_the_gemv_for_few_rows_and_the_packed_kernels_for_many(monkeypatch):
    torch.manual_seed(0)
    qw = ql.quantize_int8(torch.randn(64, 128))
    calls = []
    real = cpu_gemv.int8_gemv
    monkeypatch.setattr(cpu_gemv, "int8_gemv", lambda *a: calls.append(1) or real(*a))
    bias = torch.randn(64)
    few, many = torch.randn(1, 1, 128), torch.randn(4, cpu_gemv.MAX_ROWS, 128)
    ql.load_native_gemv_ops()
    gemv_calls = 0 if ql.native_gemv_ops() else 1  # (the C++ kernel serves it, if built)
    y_few = ql.call_quantized_linear(few, qw, bias)
    assert len(calls) == gemv_calls and y_few.shape == (1, 1, 64)
    assert torch.equal(y_few, real(few, qw.qweight, qw.scales, qw.zeros) + bias)
    ql.call_quantized_linear(many, qw, bias)
    assert len(calls) == gemv_calls  # 32 rows: aten's packed kernel
    _check(y_few - bias, few, ql.dequantize_int8(qw), cpu_gemv.activation_format())
    with ql.reference_kernels():
        y_ref = ql.call_quantized_linear(few, qw, bias)
    assert len(calls) == gemv_calls and not torch.equal(y_ref, y_few)  # the reference ran


DECODE_TOL = {"int16": 1e-3, "int8": 3e-2}
"""Logits of the decode step below, GEMV vs reference: six layers of activation rounding on
~1-magnitude logits, 2^-16 relative (int16) or up to 2^-8 of each block's largest (int8;
measured 4e-3, int16 2e-5)."""


def test_quantized_decode_step_matches_the_reference_kernels(activations):
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
        print(f"{quantize.weights} {activations}: {(got - want).abs().max().item():.2g}")
        torch.testing.assert_close(got, want, atol=DECODE_TOL[activations], rtol=0)


# ---------------------------------------------------------------------- the C++ op kernels

needs_native = pytest.mark.skipif(
    not ql.load_native_gemv_ops(),
    reason="the C++ GEMV ops did not build here (no c++, or STRATO_CPU_GEMV_NATIVE=0)",
)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpp_ops_serve_the_gemv_ops_with_the_python_impls_results(monkeypatch, dtype):
    """Once built, the C++ kernels serve strato::cpu_gemv_* (the Python entry points are not
    called) and give the Python impls' results bit for bit (the same C kernels), bias and
    dtype included, on odd shapes, 1-8 rows and 1 and 2 threads."""
    torch.manual_seed(0)
    q4 = ql.quantize_int4(torch.randn(37, 300), group_size=64, symmetric=False)
    q8 = ql.quantize_int8(torch.randn(37, 300))
    b4, b8 = cpu_gemv.block_codes(q4.qweight), cpu_gemv.block_codes(q8.qweight)
    bias = torch.randn(37, dtype=dtype)
    cases = []
    for rows in (1, 5, 8):
        x = torch.randn(1, rows, 300, dtype=dtype)
        cases.append(
            (
                lambda x=x: ql.cpu_gemv_int4(x, b4, q4.scales, q4.zeros, bias, 64),
                lambda x=x: ql._cpu_gemv_int4_impl(x, b4, q4.scales, q4.zeros, bias, 64),
            )
        )
        cases.append(
            (
                lambda x=x: ql.cpu_gemv_int8(x, b8, q8.scales, None, None),
                lambda x=x: ql._cpu_gemv_int8_impl(x, b8, q8.scales, None, None),
            )
        )
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            want = [python() for _, python in cases]
            with monkeypatch.context() as patch:
                for name in ("int4_gemv", "int8_gemv"):
                    patch.setattr(cpu_gemv, name, lambda *a, **k: pytest.fail("Python path ran"))
                got = [native() for native, _ in cases]
            for g, w in zip(got, want):
                assert g.dtype == dtype and g.shape == w.shape and torch.equal(g, w)
    finally:
        torch.set_num_threads(previous)
    dump = torch._C._dispatch_dump("strato::cpu_gemv_int4")
    assert "CPU: registered at" in dump and "cpu_gemv_ops.cpp" in dump


@needs_native
def test_the_cpp_ops_refuse_what_does_not_fit(monkeypatch):
    q4 = ql.quantize_int4(torch.randn(8, 64), group_size=32)
    blocks = cpu_gemv.block_codes(q4.qweight)
    with pytest.raises(ValueError, match="cpu_gemv_int4: input .* does not fit"):
        ql.cpu_gemv_int4(torch.randn(1, 64), blocks, q4.scales[:, :1], None, None, 32)
    with pytest.raises(ValueError, match="blocked codes for 8 rows"):
        ql.cpu_gemv_int4(torch.randn(1, 64), q4.qweight, q4.scales, None, None, 32)
    monkeypatch.setenv("STRATO_CPU_GEMV_ACTIVATIONS", "fp8")
    with pytest.raises(ValueError, match="STRATO_CPU_GEMV_ACTIVATIONS='fp8'"):
        ql.cpu_gemv_int4(torch.randn(1, 64), blocks, q4.scales, None, None, 32)


@needs_native
def test_a_compiled_graph_calls_the_cpp_op():
    """torch.compile of a module calling the op: same numbers as eager, through the C++ op."""
    torch.manual_seed(0)
    q4 = ql.quantize_int4(torch.randn(48, 96), group_size=32)
    blocks = cpu_gemv.block_codes(q4.qweight)

    def step(x):
        return torch.relu(ql.cpu_gemv_int4(x * 2, blocks, q4.scales, None, None, 32))

    x = torch.randn(1, 96)
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    assert torch.equal(compiled(x), step(x))


def test_without_the_cpp_ops_the_python_impls_serve_the_ops(tmp_path):
    """STRATO_CPU_GEMV_NATIVE=0: the ops still run, on the Python impls, with the same numbers."""
    code = (
        "import torch; from strato.kernels import cpu_gemv, quantized_linear as ql\n"
        "torch.manual_seed(0); q = ql.quantize_int4(torch.randn(9, 64), group_size=32)\n"
        "y = ql.cpu_gemv_int4(torch.ones(1, 64), cpu_gemv.block_codes(q.qweight), q.scales,"
        " None, None, 32)\n"
        "print(ql.native_gemv_ops(), 'quantized_linear.py' in"
        " torch._C._dispatch_dump('strato::cpu_gemv_int4').split('CPU:')[1].splitlines()[0],"
        " y.sum().item())"
    )
    runs = {}
    for native in ("0", "1"):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "STRATO_CPU_GEMV_NATIVE": native},
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        runs[native] = proc.stdout.split()
    assert runs["0"][:2] == ["False", "True"]  # served by the Python impl
    if runs["1"][0] == "True":  # (where the C++ ops build) the same sum
        assert runs["1"][1] == "False" and runs["1"][2] == runs["0"][2]


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
