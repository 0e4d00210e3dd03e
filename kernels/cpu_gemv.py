"""Strato's AVX2 weight-only int8/int4 matrix-vector kernels (cpu_gemv.c), for decoding on CPU.

At one token per sequence a quantized linear layer is bound by reading its weights, and
aten's packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) need bf16
activations and, on CPUs without AVX-512, run no faster than an fp32 matmul there
(bench/quantize.py). These kernels read Strato's portable formats directly, keep fp32
activations (rounded per row to 16-bit fixed point, finer than bf16) and widen codes in
registers.

The C source is compiled once per machine with the system C compiler ($CC, else cc) into
the kernel cache folder (codegen/cache.py: $STRATO_CACHE_DIR) and loaded with ctypes.
`available()` is False, and the ops keep their other kernels, on CPUs without AVX2 + FMA,
without a compiler, or with STRATO_CPU_GEMV=0; a failed build warns once with the
compiler's message.

Activations are rounded per row to 16-bit fixed point by default (2^-16 of the row's
largest magnitude, about exact); STRATO_CPU_GEMV_ACTIVATIONS=int8 selects kernels that
round them to int8 in blocks of 32 columns instead (llama.cpp's Q8 blocks: u8 x s8
multiply-adds, about 15% faster at int4 g32, error up to 1/254 of each block's largest). The ops compiled graphs call (`strato::cpu_gemv_int8/int4`) also
have C++ kernels, cpu_gemv_ops.cpp, built against torch into the same cache by
`load_native_ops()`, so that inductor and AOTInductor code calls them without Python
(STRATO_CPU_GEMV_NATIVE=0, or no C++ compiler: the Python impls below serve them).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from ..codegen.cache import cache_dir
from ..compiler.errors import StratoError

SOURCE = Path(__file__).with_name("cpu_gemv.c")
MAX_ROWS = 8
"""Input rows (tokens) up to which the GEMV kernels run; larger inputs are matrix products,
which aten's packed kernels do better."""
BLOCK_ROWS = 4
"""Output rows the kernels read together (ROWS in cpu_gemv.c): the blocked layout's unit."""

_FLAGS = ["-O3", "-mavx2", "-mfma", "-shared", "-fPIC"]
"""(AVX2 and FMA only: the library must also run on CPUs that have no more.)"""
_P = ctypes.c_void_p
_I = ctypes.c_int64


def _cpu_supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _compile(compiler: str, out: Path) -> None:
    """Build the shared library at `out` (atomically: ranks may build at once)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        errors = ""
        for extra in (["-fopenmp"], []):  # without OpenMP the kernels run on one thread
            cmd = [compiler, *_FLAGS, *extra, str(SOURCE), "-o", str(target)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(target, out)
                return
            errors = proc.stderr.strip()
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{errors}")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("STRATO_CPU_GEMV", "1").strip() == "0" or not _cpu_supported():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *_FLAGS]).encode())
    path = cache_dir() / f"cpu_gemv_{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _compile(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as exc:
        warnings.warn(
            f"Strato's CPU GEMV kernels are unavailable, so quantized decoding uses aten's "
            f"packed kernels: {exc}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _C = ctypes.c_int
    for name in ("strato_int8_gemv", "strato_int8_gemv_q8"):
        getattr(lib, name).argtypes = [_P, _I, _I, _P, _I, _P, _P, _P, _C, _C]
        getattr(lib, name).restype = None
    for name in ("strato_int4_gemv", "strato_int4_gemv_q8"):
        getattr(lib, name).argtypes = [_P, _I, _I, _P, _I, _P, _P, _I, _P, _C, _C]
        getattr(lib, name).restype = None
    return lib


ACTIVATION_FORMATS = ("int8", "int16")
"""How the kernels round activations: 'int16' rows (default), or 'int8' blocks of 32."""


class GemvConfigError(StratoError, ValueError):
    """An environment variable of the CPU GEMV kernels holds a value they do not know."""


def activation_format() -> str:
    """'int16' or 'int8', from STRATO_CPU_GEMV_ACTIVATIONS (read on every call, as the
    C++ kernels do, so a test or a user can switch it at run time)."""
    value = os.environ.get("STRATO_CPU_GEMV_ACTIVATIONS", "int16").strip() or "int16"
    if value not in ACTIVATION_FORMATS:
        raise GemvConfigError(
            f"STRATO_CPU_GEMV_ACTIVATIONS={value!r} is not an activation format; set it to "
            f"int16 (16-bit fixed point per row, the default) or int8 (blocks of 32)"
        )
    return value


NATIVE_SOURCE = Path(__file__).with_name("cpu_gemv_ops.cpp")
_CXX_FLAGS = ["-O2", "-std=c++20", "-fPIC", "-shared", "-w"]
"""(-w: torch's headers warn by the hundred.)"""


def _native_flags() -> list[str]:
    """Compiler flags that build against this process's torch."""
    from torch.utils import cpp_extension

    libs = cpp_extension.library_paths()
    return [
        *_CXX_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        *(f"-L{p}" for p in libs),
        *(f"-Wl,-rpath,{p}" for p in libs),
    ]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()[-4000:]}")


def _compile_native(compiler: str, cxx: str, flags: list[str], out: Path) -> None:
    """Build the op library at `out`: cpu_gemv.c as an object, linked into the C++ ops."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, target = Path(tmp) / "cpu_gemv.o", Path(tmp) / out.name
        c_flags = [f for f in _FLAGS if f != "-shared"]
        _run([compiler, *c_flags, "-fopenmp", "-c", str(SOURCE), "-o", str(obj)])
        torch_libs = ["-ltorch", "-ltorch_cpu", "-lc10", "-fopenmp"]
        _run([cxx, *flags, str(NATIVE_SOURCE), str(obj), *torch_libs, "-o", str(target)])
        os.replace(target, out)


@functools.cache
def native_ops_path() -> Path | None:
    """The C++ op library for this machine and torch (built on first call), or None where
    the kernels do not run, STRATO_CPU_GEMV_NATIVE=0, or it does not build (which warns
    once with the compiler's message)."""
    if os.environ.get("STRATO_CPU_GEMV_NATIVE", "1").strip() == "0" or _library() is None:
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None or cxx is None:
        return None
    flags = _native_flags()
    key = hashlib.sha256(SOURCE.read_bytes() + NATIVE_SOURCE.read_bytes())
    key.update(" ".join([compiler, cxx, torch.__version__, *_FLAGS, *flags]).encode())
    path = cache_dir() / f"cpu_gemv_ops_{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _compile_native(compiler, cxx, flags, path)
    except (OSError, RuntimeError) as exc:
        warnings.warn(
            f"Strato's C++ GEMV ops are unavailable, so compiled graphs call their Python "
            f"impls (about 10 us more a call): {exc}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return path


def available() -> bool:
    """Whether the kernels run on this machine (builds them on first call)."""
    return _library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _prepared(x: torch.Tensor, *qparams):
    """x as contiguous fp32 and the scales/zeros as fp32 (the kernels read their bytes)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    params = [
        p
        if p is None or (p.dtype == torch.float32 and p.is_contiguous())
        else p.float().contiguous()
        for p in qparams
    ]
    return x, *params


def block_codes(qweight: torch.Tensor) -> torch.Tensor:
    """The kernels' blocked layout of portable int8 [N, K] or int4 [N, Kp / 2] codes:
    [N / BLOCK_ROWS, chunks, BLOCK_ROWS, 16] bytes, 16 bytes of each row of a block in
    turn, rows (and int8 columns, to whole chunks) padded with zeros. The layout is a
    reordering of the same bytes, read as one stream (see cpu_gemv.c)."""
    n, width = qweight.shape
    rows, cols = -n % BLOCK_ROWS, -width % 16
    padded = torch.nn.functional.pad(qweight.detach(), (0, cols, 0, rows))
    blocks = padded.view((n + rows) // BLOCK_ROWS, BLOCK_ROWS, (width + cols) // 16, 16)
    return blocks.permute(0, 2, 1, 3).contiguous()


def _layout(qweight: torch.Tensor, code_dtype: torch.dtype, blocked: bool, n: int) -> int:
    """The codes' bytes per row (padded, when blocked), after checking their layout."""
    if qweight.dtype != code_dtype or not qweight.is_contiguous():
        raise ValueError(
            f"cpu_gemv: expected contiguous {code_dtype} codes, got {qweight.dtype} "
            f"{'' if qweight.is_contiguous() else 'non-contiguous '}{tuple(qweight.shape)}"
        )
    if not blocked:
        if qweight.dim() != 2 or qweight.shape[0] != n:
            raise ValueError(
                f"cpu_gemv: codes {tuple(qweight.shape)} do not have the scales' {n} rows"
            )
        return qweight.shape[1]
    blocks = -(-n // BLOCK_ROWS)
    if qweight.dim() != 4 or qweight.shape[0] != blocks or qweight.shape[2:] != (BLOCK_ROWS, 16):
        raise ValueError(
            f"cpu_gemv: blocked codes for {n} rows must be [{blocks}, chunks, {BLOCK_ROWS}, 16] "
            f"(block_codes builds them), got {tuple(qweight.shape)}"
        )
    return qweight.shape[1] * 16


def int8_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    blocked: bool = False,
) -> torch.Tensor:
    """x [..., K] -> fp32 [..., N] = x @ ((qweight - zeros) * scales).T (per-row scales);
    `qweight` int8 [N, K], or block_codes() of it when `blocked`."""
    lib = _library()
    assert lib is not None, "int8_gemv called where available() is False"
    x, scales, zeros = _prepared(x, scales, zeros)
    k, n = x.shape[-1], scales.shape[0]
    width = _layout(qweight, torch.int8, blocked, n)
    fits = width == k if not blocked else width == -(-k // 16) * 16
    if not fits or scales.shape != (n,) or (zeros is not None and zeros.shape != (n,)):
        raise ValueError(
            f"cpu_gemv.int8_gemv: input [..., {k}] does not fit codes {tuple(qweight.shape)} "
            f"with scales {tuple(scales.shape)}"
        )
    y = torch.empty((*x.shape[:-1], n))  # (new_empty costs 4 us more a call)
    kernel = lib.strato_int8_gemv_q8 if activation_format() == "int8" else lib.strato_int8_gemv
    kernel(
        x.data_ptr(), x.numel() // k, k, qweight.data_ptr(), n, scales.data_ptr(), _ptr(zeros),
        y.data_ptr(), blocked, torch.get_num_threads(),
    )  # fmt: skip
    return y


def int4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    *,
    blocked: bool = False,
) -> torch.Tensor:
    """x [..., K] -> fp32 [..., N] for int4 group-wise weights (groups a multiple of 32),
    `qweight` uint8 [N, Kp / 2] or block_codes() of it when `blocked`; x is zero-padded to
    the weights' padded width Kp."""
    lib = _library()
    assert lib is not None, "int4_gemv called where available() is False"
    x, scales, zeros = _prepared(x, scales, zeros)
    n = scales.shape[0]
    kp = _layout(qweight, torch.uint8, blocked, n) * 2
    groups = (n, kp // group_size)
    if (
        x.shape[-1] > kp
        or group_size % 32
        or kp % group_size
        or scales.shape != groups
        or (zeros is not None and zeros.shape != groups)
    ):
        raise ValueError(
            f"cpu_gemv.int4_gemv: input [..., {x.shape[-1]}] does not fit codes "
            f"{tuple(qweight.shape)} in groups of {group_size} with scales {tuple(scales.shape)}"
        )
    if x.shape[-1] != kp:
        x = torch.nn.functional.pad(x, (0, kp - x.shape[-1]))
    y = torch.empty((*x.shape[:-1], n))  # (new_empty costs 4 us more a call)
    kernel = lib.strato_int4_gemv_q8 if activation_format() == "int8" else lib.strato_int4_gemv
    kernel(
        x.data_ptr(), x.numel() // kp, kp, qweight.data_ptr(), n, scales.data_ptr(), _ptr(zeros),
        group_size, y.data_ptr(), blocked, torch.get_num_threads(),
    )  # fmt: skip
    return y
