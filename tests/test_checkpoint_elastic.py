"""Elastic restarts: torchrun restarts the group after a rank is killed, the ranks meet again
in the store the dead attempt wrote to, and training resumes from the newest checkpoint.

The store handshake (`runtime/distributed.py`'s join_session) is tested on a real TCPStore
with threads as ranks; the restart itself under torchrun (examples/elastic_train.py)."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch.distributed as dist

from strato.compiler.errors import StratoError
from strato.runtime.distributed import SESSION_PREFIX, join_session
from tests import multirank

TOL = 1e-6


def tcp_store() -> dist.TCPStore:
    """A store server like the one torchrun's agent hosts (and keeps across restarts)."""
    return dist.TCPStore(
        "127.0.0.1", multirank.free_port(), is_master=True, timeout=datetime.timedelta(seconds=30)
    )


def join_all(server: dist.TCPStore, world: int, timeout_s: float = 20) -> list[str]:
    """Every rank of one attempt joins at once (a thread and a store client each)."""
    sessions: list = [None] * world

    def rank(r: int) -> None:
        client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
        try:
            sessions[r] = join_session(client, r, world, timeout_s)
        except Exception as exc:
            sessions[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 10)
    return sessions


def test_every_attempt_agrees_on_a_session_no_earlier_attempt_used():
    """Three attempts in one store: each attempt's ranks agree on one session name, a new one
    each time, although the store still holds every earlier attempt's keys (the stale
    `join` tokens are answered too, and nobody reads those answers)."""
    server = tcp_store()
    seen = []
    for world in (3, 3, 2):  # the last restart at another world size
        sessions = join_all(server, world)
        assert all(isinstance(s, str) for s in sessions), sessions
        assert len(set(sessions)) == 1, sessions
        seen.append(sessions[0])
    assert len(set(seen)) == 3
    # A stale token of a dead rank 1 (what a kill leaves behind) is there before the next
    # attempt starts; the attempt still agrees on a fresh session.
    server.set(f"{SESSION_PREFIX}/join/1", "a-token-of-a-dead-rank")
    sessions = join_all(server, 2)
    assert len(set(sessions)) == 1 and sessions[0] not in seen, sessions


def test_a_rank_that_never_joins_is_named_by_rank_0():
    server = tcp_store()
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
    with pytest.raises(StratoError, match=r"ranks \[1\] of 2 did not join .* within 0.5 s"):
        join_session(client, 0, 2, timeout_s=0.5)
    with pytest.raises(StratoError, match="rank 1 waited 0.5 s .* for rank 0 to admit it"):
        join_session(client, 1, 2, timeout_s=0.5)


TRAIN = ["--steps", "8", "--save-every", "2", "--kill-rank", "1", "--kill-at-step", "5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "STRATO_DIST_TIMEOUT_S": "60"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    """The losses of a run that never stopped: one process on the same global batches."""
    from examples import elastic_train

    _, losses = elastic_train.train(str(tmp_path_factory.mktemp("straight")), 8, save_every=4)
    return losses


def torchrun(*launch: str) -> list[str]:
    from examples import elastic_train

    return [sys.executable, "-m", "torch.distributed.run", *launch, "--max-restarts", "1",
            "--monitor-interval", "0.1", elastic_train.__file__, *TRAIN]  # fmt: skip


def assert_resumed(log: str, result: Path, uninterrupted: dict[int, float]) -> None:
    """One restart, from the newest checkpoint published before the kill (step 4, or 2 when
    step 4's asynchronous save was still being written), then the uninterrupted losses."""
    assert re.search(r"attempt \d+ \(2 ranks\): started afresh", log), log[-4000:]
    resumed = re.findall(r"attempt \d+ \(2 ranks\): resumed from the checkpoint of step (\d+)", log)
    assert len(resumed) == 1 and resumed[0] in ("2", "4"), log[-4000:]
    killed = json.loads(result.read_text())
    assert killed["start"] == int(resumed[0])
    assert sorted(int(s) for s in killed["losses"]) == list(range(killed["start"], 8))
    for step, loss in killed["losses"].items():
        want = uninterrupted[int(step)]
        assert abs(loss - want) <= TOL, (step, loss, want)


@pytest.mark.slow
def test_elastic_restart_after_kill_ends_with_the_uninterrupted_loss(tmp_path, uninterrupted):
    """torchrun --max-restarts 1, 2 ranks ZeRO-2 (examples/elastic_train.py): rank 1 is
    killed with SIGKILL at step 5; torchrun restarts both once, they load the newest
    complete checkpoint and finish with the losses of a run that never stopped. The single
    restart allowed must succeed: without join_session the restarted ranks read the dead
    attempt's gloo addresses."""
    out = tmp_path / "killed.json"
    command = torchrun("--standalone", "--nproc-per-node", "2")
    command += ["--ckpt", str(tmp_path / "ckpt"), "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "attempt 1 (2 ranks): resumed" in log, log[-4000:]  # torchrun's first restart
    assert_resumed(log, out, uninterrupted)


@pytest.mark.slow
def test_elastic_restart_across_two_torchrun_nodes(tmp_path, uninterrupted):
    """Two torchrun agents (--nnodes 2, one rank each, c10d rendezvous): rank 1 is killed.
    The agents may restart for different reasons (a failure on one node, a membership change
    on the other: seen here), and then their restart counts differ; the ranks still meet
    and resume."""
    port = multirank.free_port()
    command = torchrun(
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"strato-elastic-{port}",
    )  # fmt: skip
    command += ["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "killed.json")]
    agents = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
        )
        for _ in range(2)
    ]
    logs = []
    try:
        logs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    log = "\n".join(logs)
    assert all(agent.returncode == 0 for agent in agents), log[-4000:]
    assert_resumed(log, tmp_path / "killed.json", uninterrupted)
