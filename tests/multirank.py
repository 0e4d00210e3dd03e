"""Shared by the multi-rank tests: a free loopback port and a launcher of spawned ranks
(real processes over gloo; each worker writes rank{r}.pt, or rank{r}.err with its traceback)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run: Callable, spec: Any, world: int, out: Path, timeout: float) -> list:
    """Run `run(rank, world, port, spec, out)` on `world` spawned ranks; every rank's result,
    or fail with the ranks' tracebacks, or name the ranks still running after `timeout` s."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=run, args=(r, world, port, spec, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} did not finish in {timeout}s (a hang)"
    errors = [out / f"rank{r}.err" for r in range(world) if (out / f"rank{r}.err").exists()]
    assert not errors, "\n".join(e.read_text() for e in errors)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
