"""Shared by the multi-rank tests: a free loopback port, a launcher of spawned ranks (real
processes over gloo; each worker writes rank{r}.pt, or rank{r}.err with its traceback), and
the body every spawned worker runs (`run_rank`)."""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
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


def run_rank(
    rank: int,
    world: int,
    port: int,
    out_dir: str,
    work: Callable[[], Any],
    timeout_s: float = 60,
    env: dict[str, str] | None = None,
    exit_now: bool = False,
) -> None:
    """One spawned rank: one thread, join the gloo group on `port`, save what `work()`
    returns to out_dir/rank{r}.pt (or its traceback to rank{r}.err, and re-raise), leave
    the group. `exit_now`: the test broke the group on purpose, so exit without waiting
    for the peers."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )
    out = Path(out_dir)
    try:
        torch.save(work(), out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if not exit_now:
            dist.destroy_process_group()
    if exit_now:
        os._exit(0)
