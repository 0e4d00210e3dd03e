"""Fusion benchmark: kernel launches and intermediate bytes per forward+backward, eager
vs Strategy(fuse=True), on the reference GPT; and wall time side by side (on CUDA the
fused model runs its Triton kernels, on CPU its torch references; --torch-compile adds
torch.compile(model) to the timing, default on CUDA).

Counts are hardware-independent: every ATen op that computes (views and bare
allocations excluded) is one launch and writes its outputs' bytes; every Strato Triton
kernel is one launch and writes the tensors it fills. The fused model runs its Triton
kernels (on CPU through TRITON_INTERPRET=1) so the count is what a GPU would launch.

    .venv/bin/python bench/fusion.py [--batch 2] [--iters 10] [--torch-compile]
                                     [--out bench/results/fusion.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch._library.custom_ops as custom_ops

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import strato  # noqa: E402
from examples.gpt import GPT, REFERENCE  # noqa: E402
from strato.kernels.launch import count_launches, kernel_running  # noqa: E402

# No kernel behind these: bare allocations, and _unsafe_view (a view without alias info).
NO_LAUNCH = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "_unsafe_view",
}


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class LaunchCounter(TorchDispatchMode):
    """Counts computing ATen ops and their output bytes; Strato ops are counted from the
    inside (their Triton kernels through `count_launches`, their ATen ops here)."""

    def __init__(self):
        super().__init__()
        self.launches: Counter[str] = Counter()
        self.bytes_by_op: Counter[str] = Counter()
        self.bytes_written = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "strato":
            # Run the op's Python body with this mode on, to see the ATen ops its
            # wrapper runs around its Triton kernel (private API; bench only).
            opdef = custom_ops._maybe_get_opdef(func._schema.name)
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if _is_view(func) or name in NO_LAUNCH or func.namespace == "prim" or kernel_running():
            return out
        name = str(func.overloadpacket.__name__)
        self.launches[name] += 1
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes_written += t.numel() * t.element_size()
                self.bytes_by_op[name] += t.numel() * t.element_size()
        return out


def count_step(model, idx) -> dict:
    """Launches and bytes written by one forward+backward of `model(idx, idx)`."""
    model.zero_grad(set_to_none=True)
    with count_launches() as triton_count, LaunchCounter() as aten_count:
        loss = model(idx, idx)
        loss.backward()
    total = aten_count.launches.total() + triton_count.total
    return {
        "loss": loss.item(),
        "launches": total,
        "aten_launches": aten_count.launches.total(),
        "triton_launches": triton_count.total,
        "bytes_written": aten_count.bytes_written + triton_count.bytes_written,
        "by_op": dict((aten_count.launches + Counter(triton_count.launches)).most_common()),
        "bytes_by_op": dict(
            (aten_count.bytes_by_op + Counter(triton_count.bytes_by_kernel)).most_common()
        ),
    }


def time_steps(models: dict, idx, iters: int) -> dict[str, float]:
    """Median seconds of one forward+backward per model, runs interleaved so that load
    from other processes hits every model alike (the first round warms up)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    sync = torch.cuda.synchronize if idx.is_cuda else (lambda: None)
    for i in range(iters + 1):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            model(idx, idx).backward()
            sync()
            if i:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-compile", action="store_true", default=torch.cuda.is_available())
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fusion.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = REFERENCE
    model = GPT(cfg).to(device)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len), device=device)
    fused = strato.compile(model, strato.Strategy(fuse=True), example_inputs=(idx, idx))

    eager = count_step(model, idx)
    os.environ["STRATO_KERNELS"] = "triton"
    after = count_step(fused, idx)
    os.environ.pop("STRATO_KERNELS")
    # Timing with each backend's default: Triton on CUDA, the torch references on CPU.
    timed = {"eager": model, "fused": fused}
    if args.torch_compile:
        timed["torch.compile"] = torch.compile(model)
    seconds = time_steps(timed, idx, args.iters)
    eager_s, fused_s = seconds["eager"], seconds["fused"]
    fused_how = "Triton" if device == "cuda" else "torch references"

    launch_cut = 1 - after["launches"] / eager["launches"]
    bytes_cut = 1 - after["bytes_written"] / eager["bytes_written"]
    rows = [
        ("kernel launches / fwd+bwd", eager["launches"], after["launches"], f"-{launch_cut:.1%}"),
        (
            "intermediate MiB written / fwd+bwd",
            f"{eager['bytes_written'] / 2**20:.1f}",
            f"{after['bytes_written'] / 2**20:.1f}",
            f"-{bytes_cut:.1%}",
        ),
        ("loss", f"{eager['loss']:.6f}", f"{after['loss']:.6f}", ""),
        (
            f"{device.upper()} ms / fwd+bwd (fused: {fused_how})",
            f"{eager_s * 1e3:.1f}",
            f"{fused_s * 1e3:.1f}",
            f"x{fused_s / eager_s:.2f}",
        ),
    ]
    if "torch.compile" in seconds:
        rows.append(
            ("  torch.compile(model) ms / fwd+bwd", "", f"{seconds['torch.compile'] * 1e3:.1f}", "")
        )
    print(
        f"GPT {cfg.n_layers} layers, d_model {cfg.d_model}, seq {cfg.seq_len}, "
        f"vocab {cfg.vocab_size}, batch {args.batch}; "
        f"{len(fused.kernels())} fused regions"
    )
    print(f"{'':44} {'eager':>10} {'fused':>10} {'change':>8}")
    for name, a, b, change in rows:
        print(f"{name:44} {a!s:>10} {b!s:>10} {change:>8}")
    print(
        "goals: launches -40% or better, bytes -30% or better:",
        "met" if launch_cut >= 0.4 and bytes_cut >= 0.3 else "NOT met",
    )
    if device != "cuda":
        print("GPU timing: not measured (no GPU in this run).")
    result = {
        "config": {
            "model": vars(cfg) if hasattr(cfg, "__dict__") else str(cfg),
            "batch": args.batch,
        },
        "eager": eager,
        "fused": after,
        "launch_reduction": launch_cut,
        "bytes_reduction": bytes_cut,
        "device": device,
        "seconds_per_step": seconds,
        "regions": [
            {k: r[k] for k in ("name", "kind", "kernel", "nodes")} for r in fused.kernels()
        ],
        "gpu_timing": "measured" if device == "cuda" else "not measured",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
