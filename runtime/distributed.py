"""Start torch.distributed from the environment torchrun sets (gloo on CPU, NCCL on GPU).

No launcher of our own: `torchrun --nproc-per-node N script.py` (and its multi-node
flags) set RANK, WORLD_SIZE, MASTER_ADDR/PORT and LOCAL_RANK; a plain `python script.py`
sets none of them and trains as a single process.
"""

from __future__ import annotations

import atexit
import datetime
import os
import time

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def init_from_env(timeout_s: float | None = None) -> bool:
    """Initialise the default process group if torchrun launched us and nobody has yet.

    Returns True when a process group is active afterwards. The timeout (default 600 s,
    or STRATO_DIST_TIMEOUT_S) bounds how long a collective waits for a missing rank, so
    a rank that dies surfaces as an error instead of a hang.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if timeout_s is None:
        timeout_s = float(os.environ.get("STRATO_DIST_TIMEOUT_S", "600"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    atexit.register(destroy_at_exit)
    return True


def destroy_at_exit() -> None:
    """Destroy the process group we created while the interpreter is still whole.

    A process that exits with the group alive leaves gloo's worker threads running into
    interpreter shutdown, where freeing a tensor of the last collective aborts the process
    ("terminate called without an active exception") and torchrun reports a finished run
    as failed. Once dynamo is imported something still holds the group after this, so the
    threads live on: runtime/collectives.py also holds the last collectives' tensors, so
    those threads never need the interpreter to free them.
    """
    if dist.is_available() and dist.is_initialized():
        # A worker thread may be blocked waiting for the GIL to free the last collective's
        # tensors (views our shim does not hold); let it have it before shutdown starts.
        time.sleep(0.05)
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, or a single process: the one that prints and logs."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
