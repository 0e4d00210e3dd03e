"""What this machine computes natively: bf16/fp16 detection for `Strategy(precision="auto")`.

bf16 only pays where the hardware has bf16 arithmetic: CUDA GPUs of compute capability
>= 8.0, x86 CPUs with AVX-512-BF16 or AMX, Arm CPUs with the BF16 extension. Elsewhere
torch emulates it and a bf16 matmul is several times slower than fp32 (10-20x on AVX2
CPUs). Detection asks torch (its cpuinfo-based checks) and reads /proc/cpuinfo where
there is one; it never guesses from a model or CPU name.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import attrs
import torch

from .errors import StrategyError


@attrs.frozen
class PrecisionSupport:
    """Whether one device computes a low precision natively, and the evidence."""

    device: str
    """'cpu' or 'cuda:N'."""
    dtype: str
    """'bf16' or 'fp16'."""
    native: bool
    reason: str
    """One line naming what was checked and what it said."""
    signals: dict[str, Any] = attrs.field(factory=dict)
    """The raw detection results (for benchmarks' JSON)."""


@functools.cache
def _cpuinfo_flags() -> frozenset[str] | None:
    """Feature flags of the first CPU in /proc/cpuinfo (x86 'flags', Arm 'Features')."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def _torch_cpu_check(name: str) -> bool | None:
    check = getattr(torch.cpu, name, None)
    if check is None:
        return None
    try:
        return bool(check())
    except Exception:  # a build without cpuinfo: no answer from torch
        return None


def _mkldnn_bf16() -> bool | None:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return None


@functools.cache
def cpu_support(dtype: str = "bf16") -> PrecisionSupport:
    """Native bf16 (AVX-512-BF16, AMX, Arm BF16) or fp16 (AVX-512-FP16, AMX-FP16) on this CPU."""
    flags = _cpuinfo_flags()
    signals: dict[str, Any] = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16_supported": _mkldnn_bf16(),
    }
    if dtype == "bf16":
        signals["torch_avx512_bf16"] = _torch_cpu_check("_is_avx512_bf16_supported")
        signals["torch_amx_tile"] = _torch_cpu_check("_is_amx_tile_supported")
        wanted = ("avx512_bf16", "amx_bf16", "bf16")  # 'bf16': Arm's BF16 extension
        torch_native = signals["torch_avx512_bf16"] or signals["torch_amx_tile"]
    else:
        signals["torch_amx_fp16"] = _torch_cpu_check("_is_amx_fp16_supported")
        wanted = ("avx512_fp16", "amx_fp16")
        torch_native = signals["torch_amx_fp16"]
    found = sorted(f for f in wanted if flags and f in flags)
    signals["cpuinfo_flags"] = found if flags is not None else None
    native = bool(found) or bool(torch_native)
    if native:
        evidence = ", ".join(found) if found else "torch.cpu reports it"
        reason = f"this CPU computes {dtype} natively ({evidence})"
    elif flags is None and torch_native is None:
        reason = (
            f"no CPU feature information (no /proc/cpuinfo, torch.cpu cannot tell): {dtype} "
            "assumed emulated"
        )
    else:
        reason = (
            f"this CPU ({signals['cpu_capability']}) has no native {dtype} "
            f"({' / '.join(wanted[:2])} absent): torch emulates it, slower than fp32"
        )
    return PrecisionSupport("cpu", dtype, native, reason, signals)


def cuda_support(device: torch.device, dtype: str = "bf16") -> PrecisionSupport:
    """bf16 is native from compute capability 8.0 (Ampere); fp16 on every CUDA GPU torch runs."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = f"cuda:{index}"
    signals = {"capability": f"{major}.{minor}", "name": torch.cuda.get_device_name(index)}
    if dtype == "fp16":
        return PrecisionSupport(name, dtype, True, f"{signals['name']}: native fp16", signals)
    if torch.version.hip:  # ROCm: ask torch, which knows which gfx archs have bf16
        with torch.cuda.device(index):
            native = bool(torch.cuda.is_bf16_supported(including_emulation=False))
    else:  # what torch.cuda.is_bf16_supported(including_emulation=False) checks, per device
        native = major >= 8
    signals["is_bf16_supported"] = native
    reason = f"{signals['name']} (compute capability {major}.{minor}) " + (
        "computes bf16 natively" if native else "has no native bf16 (needs 8.0+)"
    )
    return PrecisionSupport(name, dtype, native, reason, signals)


def precision_support(device: torch.device | str = "cpu", dtype: str = "bf16") -> PrecisionSupport:
    """Native support for `dtype` ('bf16' or 'fp16') on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_support(device, dtype)
    if device.type == "cpu":
        return cpu_support(dtype)
    return PrecisionSupport(str(device), dtype, False, f"unknown device type {device.type}")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model computes: its first parameter's (or buffer's) device, else CPU."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@attrs.frozen
class PrecisionChoice:
    """The precision a compilation runs in, and why (recorded for `explain()`)."""

    requested: str
    precision: str
    reason: str

    def record(self) -> dict[str, str]:
        return {"requested": self.requested, "precision": self.precision, "reason": self.reason}


_warned_emulated: set[tuple[str, str]] = set()


def choose_precision(requested: str, device: torch.device | str = "cpu") -> PrecisionChoice:
    """'auto' becomes bf16 where `device` computes it natively, else fp32. An explicit
    bf16/fp16 stays, but warns once per process and device when it is emulated there."""
    if requested == "fp32":
        return PrecisionChoice("fp32", "fp32", "as requested")
    if requested == "auto":
        support = precision_support(device, "bf16")
        return PrecisionChoice("auto", "bf16" if support.native else "fp32", support.reason)
    if requested not in ("bf16", "fp16"):
        raise StrategyError(
            f"Strategy.precision: expected 'auto', 'fp32', 'bf16' or 'fp16', got {requested!r}."
        )
    support = precision_support(device, requested)
    if not support.native and (support.device, requested) not in _warned_emulated:
        _warned_emulated.add((support.device, requested))
        warnings.warn(
            f"Strategy(precision={requested!r}): {support.reason}; fp32 is faster here "
            "(precision='auto' picks the fast one). Training continues in "
            f"{requested}.",
            stacklevel=4,  # choose_precision <- resolve_precision <- strato.compile <- caller
        )
    return PrecisionChoice(requested, requested, support.reason)


def resolve_precision(strategy, model: torch.nn.Module):
    """The strategy with its precision made concrete for `model`'s device, and the choice."""
    choice = choose_precision(strategy.precision, model_device(model))
    if choice.precision != strategy.precision:
        strategy = strategy.replace(precision=choice.precision)
    return strategy, choice
