"""Quantized linear layers: weight formats, their plain-torch references, and custom ops.

Weight formats (device-neutral; what graphs and exported artifacts hold):

- int8 per output channel: `qweight` int8 [N, K]; `scales` f32 [N]; `zeros` f32 [N]
  (integer zero points) or None when symmetric. w = (q - z) * s.
- int4 group-wise along K: `qweight` uint8 [N, Kp // 2], two 4-bit codes per byte
  (low nibble = even column); `scales`, `zeros` f32 [N, Kp // group_size]. Codes u are
  in [0, 15]; w = (u - z) * s, with z = 8 when symmetric (`zeros` None). K is padded with
  zero weights to Kp, a multiple of the group size, and inputs are padded to match.
- int8 weights with int8 dynamic activations: symmetric int8 weights as above, times a
  per-input-channel SmoothQuant factor; inputs are multiplied by `act_scale` (the
  inverse factor) and quantized per tensor at run time (unsigned 7-bit, as fbgemm wants).

The ops pick a kernel by device: Triton dequantize-matmul kernels when the backend is
'triton' (kernels/backend.py); on CPU, for inputs of at most `cpu_gemv.MAX_ROWS` rows
(decoding), Strato's AVX2 GEMV kernels (kernels/cpu_gemv.c) where they build; for inputs
of at least `DEQUANTIZE_MIN_ROWS` rows on CPUs without AVX-512, dequantize + fp32 BLAS;
else the aten packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, fbgemm
`quantized::linear_dynamic`), which are fast only with bf16 activations, so inputs are
cast to bf16 around them; otherwise the plain-torch reference (dequantize, then matmul).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
import types
import warnings
from collections.abc import Iterator

import attrs
import torch
from torch.utils.weak import WeakTensorKeyDictionary

from ..compiler.errors import StratoError
from . import cpu_gemv
from .backend import kernel_backend

INT4_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes the CPU int4 kernel supports (and the Triton kernels are tuned for)."""


GPTQ_DAMPING = 0.1
"""Added to the Hessian diagonal before GPTQ, as a fraction of its mean."""


class QuantizationError(StratoError, ValueError):
    """A weight cannot be quantized with the requested scheme."""


# ---------------------------------------------------------------------- weight formats


@attrs.frozen
class QuantizedWeight:
    """The packed tensors of one quantized weight, and the scheme that reads them."""

    scheme: str
    """'int8', 'int4' or 'int8_dynamic'."""
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    in_features: int
    out_features: int
    group_size: int = 0
    """int4 only: input columns sharing one scale and zero point."""
    act_scale: torch.Tensor | None = None
    """int8_dynamic only: per-input-channel multiplier applied to inputs (SmoothQuant)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to register on a graph, by role."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        if self.act_scale is not None:
            out["act_scale"] = self.act_scale
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _check_weight(weight: torch.Tensor, name: str) -> torch.Tensor:
    if weight.dim() != 2:
        raise QuantizationError(
            f"{name}: expected a 2-D [out, in] weight, got {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise QuantizationError(f"{name}: expected a floating-point weight, got {weight.dtype}")
    return weight.detach().float()


def quantize_int8(
    weight: torch.Tensor, *, symmetric: bool = True, name: str = "weight"
) -> QuantizedWeight:
    """Per-output-channel int8: symmetric scales absmax/127, or asymmetric min/max over 255 steps."""
    w = _check_weight(weight, name)
    n, k = w.shape
    if symmetric:
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scales[:, None]).clamp(-127, 127)
        zeros = None
    else:
        lo = w.amin(dim=1).clamp(max=0.0)
        hi = w.amax(dim=1).clamp(min=0.0)
        scales = ((hi - lo) / 255.0).clamp(min=1e-12)
        zeros = torch.round(-128.0 - lo / scales).clamp(-128, 127)
        q = torch.round(w / scales[:, None] + zeros[:, None]).clamp(-128, 127)
    return QuantizedWeight("int8", q.to(torch.int8).contiguous(), scales.contiguous(), zeros, k, n)


def dequantize_int8(qw: QuantizedWeight) -> torch.Tensor:
    q = qw.qweight.float()
    if qw.zeros is not None:
        q = q - qw.zeros[:, None]
    return q * qw.scales[:, None]


def _int4_qparams(groups: torch.Tensor, symmetric: bool):
    """Scale and zero point (codes u in [0, 15], w = (u - z) s) of each group (last dim)."""
    if symmetric:
        scales = (groups.abs().amax(dim=-1) / 7.0).clamp(min=1e-12)
        return scales, torch.full_like(scales, 8.0)
    lo = groups.amin(dim=-1).clamp(max=0.0)
    hi = groups.amax(dim=-1).clamp(min=0.0)
    scales = ((hi - lo) / 15.0).clamp(min=1e-12)
    return scales, torch.round(-lo / scales).clamp(0, 15)


def _int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    return torch.round(w / scales[..., None] + zeros[..., None]).clamp(0, 15)


def quantize_int4(
    weight: torch.Tensor,
    *,
    group_size: int = 128,
    symmetric: bool = True,
    hessian: torch.Tensor | None = None,
    name: str = "weight",
) -> QuantizedWeight:
    """Group-wise int4 along the input dimension; K is zero-padded to a multiple of `group_size`.

    Plain round-to-nearest, or GPTQ when `hessian` (X^T X of calibration inputs, [K, K])
    is given: columns are quantized in order and each one's rounding error is spread over
    the columns not yet quantized, weighted by the inverse Hessian.
    """
    w = _check_weight(weight, name)
    if group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(
            f"{name}: int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}"
        )
    n, k = w.shape
    kp = -(-k // group_size) * group_size
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    if hessian is None:
        groups = w.view(n, kp // group_size, group_size)
        scales, zeros = _int4_qparams(groups, symmetric)
        codes = _int4_codes(groups, scales, zeros).view(n, kp)
    else:
        if hessian.shape != (k, k):
            raise QuantizationError(
                f"{name}: hessian must be [{k}, {k}], got {tuple(hessian.shape)}"
            )
        codes, scales, zeros = _gptq_int4(w, hessian, group_size, symmetric)
    packed = pack_int4(codes.to(torch.uint8))
    return QuantizedWeight(
        "int4",
        packed,
        scales.contiguous(),
        None if symmetric else zeros.contiguous(),
        k,
        n,
        group_size=group_size,
    )


def _int4_qparams_mse(groups: torch.Tensor, symmetric: bool, steps: int = 20):
    """Like `_int4_qparams`, but each group's range is shrunk (1.0 down to 0.5 of min/max)
    to whichever clip minimises its squared rounding error: outliers cost less. The group
    ranges are read once; each candidate's error is computed in place in one buffer."""
    if symmetric:
        extent = groups.abs().amax(dim=-1)
    else:
        lo = groups.amin(dim=-1).clamp(max=0.0)
        hi = groups.amax(dim=-1).clamp(min=0.0)
    best_scales = best_zeros = best_err = None
    work = torch.empty_like(groups)
    for ratio in torch.linspace(1.0, 0.5, steps, dtype=groups.dtype):
        if symmetric:  # (as _int4_qparams on groups * ratio)
            scales = (extent * ratio / 7.0).clamp(min=1e-12)
            zeros = torch.full_like(scales, 8.0)
        else:
            scales = ((hi * ratio - lo * ratio) / 15.0).clamp(min=1e-12)
            zeros = torch.round(-(lo * ratio) / scales).clamp(0, 15)
        # work = ((round(g / s + z).clamp(0, 15) - z) * s - g)^2
        torch.div(groups, scales[..., None], out=work)
        work.add_(zeros[..., None]).round_().clamp_(0, 15).sub_(zeros[..., None])
        work.mul_(scales[..., None]).sub_(groups).square_()
        err = work.sum(dim=-1)
        if best_err is None:
            best_scales, best_zeros, best_err = scales, zeros, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scales = torch.where(better, scales, best_scales)
        best_zeros = torch.where(better, zeros, best_zeros)
    return best_scales, best_zeros


def _gptq_int4(w: torch.Tensor, hessian: torch.Tensor, group_size: int, symmetric: bool):
    """GPTQ for one [N, Kp] weight (kernels/gptq.py, which batches layers of one shape)."""
    from .gptq import gptq_int4

    codes, scales, zeros = gptq_int4(w[None], hessian[None], group_size, symmetric)
    return codes[0], scales[0], zeros[0]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] uint8 codes in [0, 15] -> [N, K // 2] bytes, even column in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: [N, K // 2] bytes -> [N, K] uint8 codes."""
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).view(packed.shape[0], -1)


def dequantize_int4(qw: QuantizedWeight, *, padded: bool = False) -> torch.Tensor:
    """The float weight [N, K] (or [N, Kp] with the zero padding when `padded`)."""
    codes = unpack_int4(qw.qweight).float()
    n, kp = codes.shape
    groups = codes.view(n, kp // qw.group_size, qw.group_size)
    zeros = qw.zeros if qw.zeros is not None else torch.full_like(qw.scales, 8.0)
    w = ((groups - zeros[..., None]) * qw.scales[..., None]).view(n, kp)
    return w if padded else w[:, : qw.in_features]


def quantize_int8_dynamic(
    weight: torch.Tensor,
    act_absmax: torch.Tensor | None,
    *,
    alpha: float | None = 0.5,
    name: str = "weight",
) -> QuantizedWeight:
    """Symmetric int8 weights for int8 dynamic activations, SmoothQuant-balanced.

    With calibrated per-input-channel activation maxima and `alpha`, the factor
    s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) moves quantization difficulty from
    activations to weights: W' = W * s and x' = x / s give the same product.
    """
    w = _check_weight(weight, name)
    act_scale = None
    if act_absmax is not None and alpha is not None:
        w_absmax = w.abs().amax(dim=0).clamp(min=1e-5)
        a = act_absmax.float().clamp(min=1e-5)
        smooth = (a.pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)
        w = w * smooth[None, :]
        act_scale = (1.0 / smooth).contiguous()
    qw = quantize_int8(w, symmetric=True, name=name)
    return attrs.evolve(qw, scheme="int8_dynamic", act_scale=act_scale)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The float weight a quantized weight stands for (SmoothQuant factor folded back out)."""
    if qw.scheme == "int4":
        return dequantize_int4(qw)
    w = dequantize_int8(qw)
    if qw.act_scale is not None:
        w = w * qw.act_scale[None, :]
    return w


# ---------------------------------------------------------------------- kernel choice

# One switch per process even if this file is imported under two package names (pytest
# can import the checkout both as `strato` and by its folder name): the ops are registered
# once, by whichever copy came first, and must see the switch the other copy sets.
_holder = sys.modules.setdefault(
    "_strato_quantized_linear_state", types.ModuleType("_strato_quantized_linear_state")
)
if not hasattr(_holder, "local"):
    _holder.local = threading.local()
_state = _holder.local


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run the quantized ops through their plain-torch references (tests compare against it)."""
    previous = getattr(_state, "reference", False)
    _state.reference = True
    _native_reference_kernels(True)
    try:
        yield
    finally:
        _state.reference = previous
        _native_reference_kernels(previous)


def _kernel(x: torch.Tensor) -> str:
    if getattr(_state, "reference", False):
        return "reference"
    if x.device.type == "cpu" and not os.environ.get("STRATO_KERNELS"):
        return "aten"  # the common case, decided without the backend's checks (once a token)
    backend = kernel_backend(x.device)
    if backend == "triton":
        return "triton"
    return "aten" if x.device.type == "cpu" else "reference"


# Packed layouts derived from the stored format, built once per weight tensor.
_cpu_int4_packs = WeakTensorKeyDictionary()
_fbgemm_packs = WeakTensorKeyDictionary()
_bf16_scales = WeakTensorKeyDictionary()


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _rows(x: torch.Tensor) -> int:
    """Rows of the [rows, in_features] matrix the op multiplies (tokens, when decoding)."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias if bias.dtype == y.dtype else y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], n)


# ---------------------------------------------------------------------- references


def int8_linear_reference(x, qweight, scales, zeros, bias):
    w = dequantize_int8(
        QuantizedWeight("int8", qweight, scales, zeros, qweight.shape[1], qweight.shape[0])
    )
    y = _flat(x).float() @ w.t()
    return _finish(y, x, bias, qweight.shape[0])


def int4_linear_reference(x, qweight, scales, zeros, bias, group_size, in_features):
    n = qweight.shape[0]
    qw = QuantizedWeight("int4", qweight, scales, zeros, in_features, n, group_size=group_size)
    y = _flat(x).float() @ dequantize_int4(qw).t()
    return _finish(y, x, bias, n)


def dynamic_act_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric 7-bit activation scale and zero point (fbgemm's reduce_range)."""
    lo = x.min().clamp(max=0.0).float()
    hi = x.max().clamp(min=0.0).float()
    scale = ((hi - lo) / 127.0).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, 127)
    return scale, zero


def int8_dynamic_linear_reference(x, qweight, scales, act_scale, bias):
    xf = _flat(x).float()
    if act_scale is not None:
        xf = xf * act_scale
    a_scale, a_zero = dynamic_act_qparams(xf)
    xq = torch.round(xf / a_scale + a_zero).clamp(0, 127) - a_zero
    acc = xq.double() @ qweight.double().t()  # exact integer accumulation
    y = (acc * (a_scale.double() * scales.double())).float()
    return _finish(y, x, bias, qweight.shape[0])


# ---------------------------------------------------------------------- CPU fast paths


def _int8_linear_aten(x, qweight, scales, zeros, bias):
    xb = _flat(x).to(torch.bfloat16)
    scales_bf16 = _bf16_scales.get(scales)
    if scales_bf16 is None:  # static per layer: cast once, not once per token
        scales_bf16 = _bf16_scales[scales] = scales.to(torch.bfloat16)
    y = torch._weight_int8pack_mm(xb, qweight, scales_bf16).float()
    if zeros is not None:  # (q - z) s = q s - z s: subtract row-sum(x) * z s
        y = y - xb.float().sum(dim=1, keepdim=True) * (zeros * scales)[None, :]
    return _finish(y, x, bias, qweight.shape[0])


def _cpu_int4_pack(qweight, scales, zeros, group_size):
    """aten's CPU int4 layout: N padded to 16, bf16 (scale, zero) with w = (u - 8) s + zero."""
    packed = _cpu_int4_packs.get(qweight)
    if packed is None:
        codes = unpack_int4(qweight).to(torch.int32)
        n = codes.shape[0]
        n16 = -(-n // 16) * 16
        z = zeros if zeros is not None else torch.full_like(scales, 8.0)
        scale_zero = torch.stack([scales, (8.0 - z) * scales], dim=-1)  # [N, G, 2]
        if n16 != n:
            codes = torch.nn.functional.pad(codes, (0, 0, 0, n16 - n), value=8)
            scale_zero = torch.nn.functional.pad(scale_zero, (0, 0, 0, 0, 0, n16 - n))
        weight = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        packed = (weight, scale_zero.transpose(0, 1).contiguous().to(torch.bfloat16))
        _cpu_int4_packs[qweight] = packed
    return packed


def _int4_linear_aten(x, qweight, scales, zeros, bias, group_size, in_features):
    n = qweight.shape[0]
    weight, scale_zero = _cpu_int4_pack(qweight, scales, zeros, group_size)
    xb = _flat(x).to(torch.bfloat16)
    kp = qweight.shape[1] * 2
    if kp != in_features:
        xb = torch.nn.functional.pad(xb, (0, kp - in_features))
    y = torch._weight_int4pack_mm_for_cpu(xb, weight, group_size, scale_zero)
    return _finish(y[:, :n], x, bias, n)


@functools.cache
def _fbgemm_available() -> bool:
    engines = torch.backends.quantized.supported_engines
    return hasattr(torch.ops.quantized, "linear_dynamic") and (
        "fbgemm" in engines or "x86" in engines
    )


def _int8_dynamic_linear_aten(x, qweight, scales, act_scale, bias):
    cached = _fbgemm_packs.get(qweight)
    if cached is None or cached[1] is not bias:
        with warnings.catch_warnings():  # fbgemm's prepack still takes a quantized tensor
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*deprecated")
            qt = torch._make_per_channel_quantized_tensor(
                qweight, scales.double(), torch.zeros_like(scales, dtype=torch.long), 0
            )
        float_bias = None if bias is None else bias.detach().float()
        cached = (torch.ops.quantized.linear_prepack(qt, float_bias), bias)  # bias added in-kernel
        _fbgemm_packs[qweight] = cached
    xf = _flat(x).float()
    if act_scale is not None:
        xf = xf * act_scale
    y = torch.ops.quantized.linear_dynamic(xf.contiguous(), cached[0], True)
    return _finish(y, x, None, qweight.shape[0])


# ---------------------------------------------------------------------- custom ops
# Defined with torch.library.Library rather than @custom_op: the ops run once per linear
# layer per token when decoding, and custom_op's Python wrapper costs ~10 us a call.

_SCHEMAS = {
    "quant_linear_int8": "(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias) -> Tensor",
    "quant_linear_int4": "(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, "
    "int group_size, int in_features) -> Tensor",
    "quant_linear_int8_dynamic": "(Tensor x, Tensor qweight, Tensor scales, Tensor? act_scale, "
    "Tensor? bias) -> Tensor",
    # Decode graphs lowered for this CPU (passes/lower_quantized.py): the GEMV kernels on
    # codes in their blocked layout (cpu_gemv.block_codes), N from the scales.
    "cpu_gemv_int8": "(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias) -> Tensor",
    "cpu_gemv_int4": "(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias, "
    "int group_size) -> Tensor",
}


DEQUANTIZE_MIN_ROWS = 128
"""On CPUs without AVX-512, inputs of at least this many rows are multiplied as
dequantize + fp32 BLAS, 2-3x faster there than aten's bf16 packed kernels at 1024 rows."""


@functools.cache
def _cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def dequantize_wins(rows: int) -> bool:
    """Whether an 'aten'-kernel call on `rows` rows runs dequantize + fp32 matmul instead."""
    return rows >= DEQUANTIZE_MIN_ROWS and not _cpu_capability().startswith("AVX512")


def uses_cpu_gemv(rows: int, group_size: int = 32) -> bool:
    """Whether an 'aten'-kernel call on `rows` input rows runs Strato's CPU GEMV instead."""
    return 0 < rows <= cpu_gemv.MAX_ROWS and group_size % 32 == 0 and cpu_gemv.available()


def _gemv_finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The GEMV kernels' fp32 output [..., N] in x's dtype, plus the bias."""
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def _int8_impl(x, qweight, scales, zeros, bias):
    """y = x @ ((qweight - zeros) * scales).T + bias, int8 per-channel weights."""
    kernel = _kernel(x)
    if kernel == "triton":
        from .quantized_linear_triton import int8_linear_triton

        return int8_linear_triton(x, qweight, scales, zeros, bias)
    if kernel == "aten" and uses_cpu_gemv(_rows(x)):
        load_native_gemv_ops()  # (the first call: later ones go to the C++ kernel, if it built)
        return _gemv_finish(cpu_gemv.int8_gemv(x, qweight, scales, zeros), x, bias)
    if kernel == "aten" and qweight.shape[1] % 16 == 0 and not dequantize_wins(_rows(x)):
        return _int8_linear_aten(x, qweight, scales, zeros, bias)  # (it misreads other K)
    return int8_linear_reference(x, qweight, scales, zeros, bias)


def _int4_impl(x, qweight, scales, zeros, bias, group_size, in_features):
    """y = x @ W.T + bias with W int4 group-wise (see the module docstring for the layout)."""
    kernel = _kernel(x)
    if kernel == "triton":
        from .quantized_linear_triton import int4_linear_triton

        return int4_linear_triton(x, qweight, scales, zeros, bias, group_size, in_features)
    if kernel == "aten" and uses_cpu_gemv(_rows(x), group_size):
        load_native_gemv_ops()
        return _gemv_finish(cpu_gemv.int4_gemv(x, qweight, scales, zeros, group_size), x, bias)
    if kernel == "aten" and not dequantize_wins(_rows(x)):
        return _int4_linear_aten(x, qweight, scales, zeros, bias, group_size, in_features)
    return int4_linear_reference(x, qweight, scales, zeros, bias, group_size, in_features)


def _int8_dynamic_impl(x, qweight, scales, act_scale, bias):
    """int8 weights and per-tensor dynamically quantized (7-bit) int8 activations."""
    if _kernel(x) == "aten" and _fbgemm_available():
        return _int8_dynamic_linear_aten(x, qweight, scales, act_scale, bias)
    return int8_dynamic_linear_reference(x, qweight, scales, act_scale, bias)


def _cpu_gemv_int8_impl(x, codes, scales, zeros, bias):
    load_native_gemv_ops()  # (the first call: later ones go to the C++ kernel, if it built)
    return _gemv_finish(cpu_gemv.int8_gemv(x, codes, scales, zeros, blocked=True), x, bias)


def _cpu_gemv_int4_impl(x, codes, scales, zeros, bias, group_size):
    load_native_gemv_ops()
    y = cpu_gemv.int4_gemv(x, codes, scales, zeros, group_size, blocked=True)
    return _gemv_finish(y, x, bias)


_GEMV_OPS = ("cpu_gemv_int8", "cpu_gemv_int4")
_holder.native_lock = getattr(_holder, "native_lock", None) or threading.Lock()


def load_native_gemv_ops() -> bool:
    """Serve the quantized-linear ops' CPU GEMV calls by C++ kernels (cpu_gemv_ops.cpp,
    built once per machine): `strato::cpu_gemv_int8/int4`, and `quant_linear_int8/int4`
    on 1-8 input rows, so compiled code calls them without Python. True if they serve
    them now; where they do not build, the Python impls stay (False)."""
    if getattr(_holder, "native", None) is not None:
        return _holder.native
    with _holder.native_lock:
        if getattr(_holder, "native", None) is None:
            path = cpu_gemv.native_ops_path()
            if path is not None:
                _holder.python_gemv_library._destroy()  # one CPU kernel per op
                torch.ops.load_library(str(path))
                switch = ctypes.CDLL(str(path)).strato_gemv_reference_kernels
                switch.argtypes, switch.restype = [ctypes.c_int], ctypes.c_int
                _holder.native_reference_switch = switch
                _native_reference_kernels(getattr(_state, "reference", False))
            _holder.native = path is not None
    return _holder.native


def native_gemv_ops() -> bool:
    """Whether the C++ kernels serve the GEMV calls of the quantized ops in this process."""
    return bool(getattr(_holder, "native", False))


def _native_reference_kernels(on: bool) -> None:
    """Tell the C++ kernels (if loaded) that this thread is inside reference_kernels()."""
    switch = getattr(_holder, "native_reference_switch", None)
    if switch is not None:
        switch(int(on))


def _fake_out(x: torch.Tensor, qweight: torch.Tensor, *rest) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _fake_gemv_out(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *rest):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def _register_ops() -> None:
    if hasattr(torch.ops.strato, "quant_linear_int8"):
        return  # registered by another import of this file (see `_holder` above)
    library = torch.library.Library("strato", "FRAGMENT")
    impls = {
        "quant_linear_int8": (_int8_impl, "CompositeExplicitAutograd", _fake_out),
        "quant_linear_int4": (_int4_impl, "CompositeExplicitAutograd", _fake_out),
        "quant_linear_int8_dynamic": (_int8_dynamic_impl, "CompositeExplicitAutograd", _fake_out),
        "cpu_gemv_int8": (_cpu_gemv_int8_impl, "CPU", _fake_gemv_out),
        "cpu_gemv_int4": (_cpu_gemv_int4_impl, "CPU", _fake_gemv_out),
    }
    # The GEMV ops' Python CPU kernels live in their own library, which
    # load_native_gemv_ops() destroys when the C++ ones load.
    python_gemv_library = torch.library.Library("strato", "IMPL", "CPU")
    for name, schema in _SCHEMAS.items():
        impl, key, fake = impls[name]
        library.define(name + schema)
        if name in _GEMV_OPS:
            python_gemv_library.impl(name, impl)
        else:
            library.impl(name, impl, key)
        torch.library.register_fake(f"strato::{name}", fake, lib=library)
    for name in ("quant_linear_int8", "quant_linear_int4"):  # what the C++ kernels call
        library.define(f"_{name}_python{_SCHEMAS[name]}")  # for all they do not serve
        library.impl(f"_{name}_python", impls[name][0], "CompositeExplicitAutograd")
    _holder.library = library  # the registrations live as long as these objects
    _holder.python_gemv_library = python_gemv_library


_register_ops()
quant_linear_int8 = torch.ops.strato.quant_linear_int8.default
quant_linear_int4 = torch.ops.strato.quant_linear_int4.default
quant_linear_int8_dynamic = torch.ops.strato.quant_linear_int8_dynamic.default
cpu_gemv_int8 = torch.ops.strato.cpu_gemv_int8.default
cpu_gemv_int4 = torch.ops.strato.cpu_gemv_int4.default


def call_quantized_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None):
    """Run the op for `qw` eagerly (tests and benchmarks; graphs call the ops directly)."""
    if qw.scheme == "int8":
        return quant_linear_int8(x, qw.qweight, qw.scales, qw.zeros, bias)
    if qw.scheme == "int4":
        return quant_linear_int4(
            x, qw.qweight, qw.scales, qw.zeros, bias, qw.group_size, qw.in_features
        )
    return quant_linear_int8_dynamic(x, qw.qweight, qw.scales, qw.act_scale, bias)
