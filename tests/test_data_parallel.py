"""Data parallelism over real processes (torchrun, gloo): 2 ranks equal one process on the
concatenated batch; no communication between accumulation boundaries; two torchrun nodes
on one machine equal one node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.multirank import free_port
from tests.training_utils import eager_train, reference_groups, tiny_gpt, without_key_bias

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "training_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TOL = 1e-5


def worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "STRATO_DIST_TIMEOUT_S": "120"}


def torchrun(out: Path, scenario: str, *extra: str, nproc: int = 2, expect_ok: bool = True):
    out.mkdir(parents=True, exist_ok=True)
    cmd = [*TORCHRUN, "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    cmd += [WORKER, "--out", str(out), "--scenario", scenario, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=worker_env())
    if not expect_ok:
        assert proc.returncode != 0
        return proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def two_rank_parity(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("dp_parity")
    return torchrun(out, "parity"), load_file(str(out / "weights.safetensors"))


def test_two_ranks_equal_one_process_on_concatenated_batch(two_rank_parity):
    """AdamW, fp32, 10 steps: world size 2 (batch 4 each) vs eager on the batch of 8."""
    results, weights = two_rank_parity
    assert results["world_size"] == 2
    reference = tiny_gpt(0)
    ref_losses, _ = eager_train(
        reference,
        lambda m: torch.optim.AdamW(reference_groups(m, 0.1), lr=3e-3, fused=True),
        steps=10,
    )
    assert results["losses"] == pytest.approx(ref_losses, abs=TOL)
    for name, p in reference.named_parameters():
        diff = without_key_bias(name, weights[name] - p.detach())  # see its docstring
        assert diff.abs().max().item() < TOL, name
        assert (weights[name] - p.detach()).abs().max().item() < 10 * 3e-3, name
    # Each optimizer step all-reduced every gradient (fp32) plus one flag per parameter; the
    # worker adds one float64 all-reduce of the loss per step.
    n_params = sum(p.numel() for p in reference.parameters())
    n_tensors = len(list(reference.parameters()))
    per_step = 4 * (n_params + n_tensors)
    assert results["comm_bytes_total"]["all_reduce"] == 10 * (per_step + 8)
    # stats()["comm_bytes"] covers the last step: its gradients plus the loss all-reduce that
    # followed the step before it.
    assert results["comm_bytes"]["all_reduce"] == per_step + 8


def test_accumulation_communicates_only_at_boundaries_and_clips_globally(tmp_path):
    """SGD, grad_accumulation 2, grad_clip: 2 ranks x 2 micro-batches of 2 vs eager batch 8."""
    results = torchrun(tmp_path, "accum_clip")
    comm = results["comm_per_micro"]
    assert comm[0::2] == [0] * (len(comm) // 2)  # non-boundary micro-steps send nothing
    assert all(c > 0 for c in comm[1::2])
    reference = tiny_gpt(0)
    ref_losses, ref_norms = eager_train(
        reference,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, fused=True),
        steps=10,
        clip=0.05,
    )
    assert results["losses"] == pytest.approx(ref_losses, abs=TOL)
    assert results["grad_norm"] == pytest.approx(ref_norms[-1], rel=1e-5)
    assert min(ref_norms) > 0.05  # clipping was active
    weights = load_file(str(tmp_path / "weights.safetensors"))
    for name, p in reference.named_parameters():
        assert (weights[name] - p.detach()).abs().max().item() < TOL, name


def test_two_torchrun_nodes_equal_one_node(tmp_path, two_rank_parity):
    """Two torchrun agents (--nnodes 2, one process each) meeting at a loopback c10d
    rendezvous train exactly as one node with two processes."""
    port = free_port()
    cmd = [
        *TORCHRUN,
        "--nnodes", "2",
        "--nproc-per-node", "1",
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-id", f"strato-test-{port}",
        WORKER, "--out", str(tmp_path), "--scenario", "parity",
    ]  # fmt: skip
    agents = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_env()
        )
        for _ in range(2)
    ]
    logs = []
    try:
        for agent in agents:
            logs.append(agent.communicate(timeout=240)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert all(a.returncode == 0 for a in agents), "\n".join(log[-3000:] for log in logs)
    results = json.loads((tmp_path / "results.json").read_text())
    one_node, one_node_weights = two_rank_parity
    assert results["world_size"] == 2
    assert results["losses"] == one_node["losses"]
    weights = load_file(str(tmp_path / "weights.safetensors"))
    assert all(torch.equal(weights[n], one_node_weights[n]) for n in weights)


def test_parameter_no_rank_uses_keeps_no_gradient(tmp_path):
    """A parameter forward never touches stays without a gradient on every rank, as in
    eager, so AdamW's weight decay leaves it alone (a zero gradient would decay it)."""
    torchrun(tmp_path, "parity", "--unused-param", "--steps", "2")
    weights = load_file(str(tmp_path / "weights.safetensors"))
    assert torch.equal(weights["unused"], torch.ones(2, 3))


def test_ranks_started_differently_fail_fast_instead_of_hanging(tmp_path):
    output = torchrun(tmp_path, "parity", "--rank1-lr", "0.5", "--steps", "1", expect_ok=False)
    assert "were started with a different model or strategy than rank 0" in output
