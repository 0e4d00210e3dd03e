"""Triton dequantize-matmul kernels for the quantized-linear ops (template quant_linear.py.j2).

One kernel source per (bits, zero points, bias) variant, rendered and cached by codegen;
shapes stay runtime arguments. Used when the kernel backend is 'triton' (CUDA, or CPU
under TRITON_INTERPRET=1 for tests).
"""

from __future__ import annotations

import functools

import torch

from ..codegen.cache import load_kernel_module
from ..codegen.render import render_template

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32
"""Tile sizes: BLOCK_K (32) divides every int4 group size (32..256)."""


@functools.cache
def kernel_module(bits: int, has_zeros: bool, has_bias: bool):
    source = render_template(
        "quant_linear.py.j2", bits=bits, has_zeros=has_zeros, has_bias=has_bias
    )
    name = f"quant_linear_int{bits}{'_asym' if has_zeros else ''}{'_bias' if has_bias else ''}"
    return load_kernel_module(source, name)


def _launch(bits, x, qweight, scales, zeros, bias, group_size, k, n):
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if x2.shape[1] != k:  # int4: inputs padded to the packed width
        x2 = torch.nn.functional.pad(x2, (0, k - x2.shape[1]))
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    module = kernel_module(bits, zeros is not None, bias is not None)
    grid = (triton_cdiv(m, BLOCK_M), triton_cdiv(n, BLOCK_N))
    module.quant_linear_kernel[grid](
        x2,
        qweight,
        scales.float().contiguous(),
        zeros.float().contiguous() if zeros is not None else scales,
        bias if bias is not None else scales,
        y,
        m,
        n,
        k,
        x2.stride(0),
        qweight.stride(0),
        scales.shape[-1] if bits == 4 else 1,
        GROUP=group_size,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return y.to(x.dtype).view(*x.shape[:-1], n)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def int8_linear_triton(x, qweight, scales, zeros, bias):
    n, k = qweight.shape
    return _launch(8, x, qweight, scales, zeros, bias, BLOCK_K, k, n)


def int4_linear_triton(x, qweight, scales, zeros, bias, group_size, in_features):
    n = qweight.shape[0]
    return _launch(4, x, qweight, scales, zeros, bias, group_size, qweight.shape[1] * 2, n)
