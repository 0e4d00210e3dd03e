"""Start torch.distributed from the environment torchrun sets (gloo on CPU, NCCL on GPU).

No launcher of our own: `torchrun --nproc-per-node N script.py` (and its multi-node
flags) set RANK, WORLD_SIZE, MASTER_ADDR/PORT and LOCAL_RANK; a plain `python script.py`
sets none of them and trains as a single process.

Restarts (`torchrun --max-restarts`, `--nnodes 1:2`): torchrun's agent hosts the store the
workers meet in and (c10d rendezvous, torch 2.13) keeps the same one for every restart:
the restarted ranks get the same MASTER_PORT and find the killed attempt's keys there.
The process group's keys (gloo's peer addresses, each group's sequence numbers) carry no
attempt in their names, so the ranks of a restart would read the dead attempt's addresses
and fail in gloo's connectFullMesh with "Connection refused", or wait out the timeout.
`init_from_env` therefore gives the process group a namespace of its own per attempt
(`join_session`), agreed over the store by the ranks that are alive now.
"""

from __future__ import annotations

import atexit
import datetime
import os
import time
import uuid

import torch
import torch.distributed as dist

from ..compiler.errors import StratoError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SESSION_PREFIX = "strato/session"
"""Store keys of the per-attempt handshake live under this name (see join_session)."""


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
    timeout = datetime.timedelta(seconds=timeout_s)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # torch's env:// rendezvous: a client of the agent's store under torchrun (rank 0 hosts
    # one on MASTER_PORT otherwise).
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    session = join_session(store, rank, world_size, timeout_s)
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        store=dist.PrefixStore(f"strato/{session}", store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
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


def join_session(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> str:
    """A name that every rank of this attempt agrees on and no earlier attempt used.

    The store may hold keys of earlier attempts (killed ranks cannot clean up), so no key a
    rank reads can be trusted to be fresh unless it is named by something fresh: each rank
    r > 0 writes a new random token under `join/r`; rank 0 answers every token it sees
    there with this attempt's session name (a stale token gets an answer nobody reads)
    until every rank has confirmed under the new session's name, which only this attempt
    can have written. Raises, naming the ranks that never joined, after `timeout_s`.
    """
    if world_size == 1:
        return uuid.uuid4().hex
    if rank != 0:
        token = uuid.uuid4().hex
        store.set(f"{SESSION_PREFIX}/join/{rank}", token)
        session = _wait_get(store, f"{SESSION_PREFIX}/welcome/{token}", timeout_s, rank)
        store.set(f"{SESSION_PREFIX}/{session}/joined/{rank}", "1")
        return session
    session = uuid.uuid4().hex
    answered: dict[int, bytes] = {}
    waiting = set(range(1, world_size))
    deadline = time.monotonic() + timeout_s
    while waiting:
        for r in sorted(waiting):
            join = f"{SESSION_PREFIX}/join/{r}"
            if store.check([join]):
                token = store.get(join)
                if answered.get(r) != token:
                    store.set(f"{SESSION_PREFIX}/welcome/{token.decode()}", session)
                    answered[r] = token
            if store.check([f"{SESSION_PREFIX}/{session}/joined/{r}"]):
                waiting.discard(r)
        if waiting and time.monotonic() > deadline:
            raise StratoError(
                f"init_from_env: ranks {sorted(waiting)} of {world_size} did not join the process "
                f"group within {timeout_s:g} s (STRATO_DIST_TIMEOUT_S); every rank must start "
                "(see their logs for why they did not)."
            )
        time.sleep(0.005)
    return session


def _wait_get(store: dist.Store, key: str, timeout_s: float, rank: int) -> str:
    try:
        store.wait([key], datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:  # DistStoreError on a timeout
        raise StratoError(
            f"init_from_env: rank {rank} waited {timeout_s:g} s (STRATO_DIST_TIMEOUT_S) for "
            f"rank 0 to admit it to the process group ({exc}); rank 0 did not start or "
            "failed (see its log)."
        ) from None
    return store.get(key).decode()


def is_main_process() -> bool:
    """Rank 0, or a single process: the one that prints and logs."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
