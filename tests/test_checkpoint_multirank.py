"""Checkpoints over real gloo processes (torch.multiprocessing, one thread per rank):
resharding across world sizes and ZeRO stages, the model's state kept current, offline
consolidation, and save_checkpoint called on only some ranks.

Oracle: the run that did not stop. fp32, the same global batch of 8 at every world size,
so the 5 steps after a load must give the uninterrupted run's losses within 1e-6 (the only
difference is the order in which gradients are summed over ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import strato
from tests import checkpoint_worker, multirank

pytestmark = pytest.mark.slow

TOL = 1e-6


def launch(spec: dict, world: int, out: Path, timeout: float = 240) -> list[dict]:
    """Run `spec` on `world` ranks; every rank's result (or fail with its traceback)."""
    return multirank.launch(checkpoint_worker.run, spec, world, out, timeout)


def assert_losses_close(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want) == checkpoint_worker.RESUMED
    worst = max(abs(a - b) for a, b in zip(got, want))
    assert worst <= TOL, f"{what}: losses differ by {worst:.3g} (> {TOL}): {got} vs {want}"


def test_reshard_across_world_sizes_and_stages(tmp_path):
    """Save at 4 ranks under ZeRO-3; load at 4 (stage 3), 2 (stages 1 and 2) and 1 (stage 0).
    Save at 2 under stage 0; load at 4 under stage 3. Each resumes the uninterrupted run."""
    ckpt, ckpt0 = str(tmp_path / "zero3"), str(tmp_path / "stage0")
    four = launch({"kind": "save_zero3", "ckpt": ckpt}, 4, tmp_path / "a")
    reference = four[0]["uninterrupted"]
    assert_losses_close(four[0]["resumed"], reference, "4 ranks ZeRO-3 -> 4 ranks ZeRO-3")

    # Under ZeRO-3 the model holds shards: its state_dict points to full_state_dict.
    assert "engine.full_state_dict()" in four[0]["state_dict_error"]
    # full_state_dict (online) == consolidate (offline), under the model's own names.
    out = strato.consolidate(ckpt, tmp_path / "consolidated")
    from safetensors.torch import load_file

    offline = load_file(str(out / "model.safetensors"))
    online = four[0]["full"]
    assert "lm_head.weight" in online and "lm_head.weight" not in offline  # tied: once
    assert set(online) - {"lm_head.weight"} == set(offline)
    for name, tensor in offline.items():
        assert torch.equal(tensor, online[name]), name
        assert torch.equal(tensor, four[3]["full"][name]), name  # every rank gets it

    two = launch(
        {"kind": "load_zero12_save_stage0", "ckpt": ckpt, "ckpt0": ckpt0}, 2, tmp_path / "b"
    )
    assert_losses_close(two[0]["stage1"], reference, "4 ranks ZeRO-3 -> 2 ranks ZeRO-1")
    assert_losses_close(two[0]["stage2"], reference, "4 ranks ZeRO-3 -> 2 ranks ZeRO-2")
    # Reading parameters straight after a ZeRO-2 step sees the previous values; the
    # state_dict pre-hook lands the gathers first.
    assert two[0]["stale_without_hook"] > 1e-6
    assert two[0]["state_dict_vs_landed"] == 0.0

    one = checkpoint_worker.make_engine(0)
    assert one.load_checkpoint(ckpt) == checkpoint_worker.SAVE_AT
    losses = checkpoint_worker.train(one, checkpoint_worker.AFTER)
    assert_losses_close(losses, reference, "4 ranks ZeRO-3 -> 1 process")

    four = launch({"kind": "load_stage0_into_zero3", "ckpt0": ckpt0}, 4, tmp_path / "c")
    assert_losses_close(
        four[0]["losses"], two[0]["stage0_uninterrupted"], "2 ranks stage 0 -> 4 ranks ZeRO-3"
    )


@pytest.mark.parametrize("call", ["save", "load"])
def test_checkpoint_call_on_one_rank_only_fails_fast_naming_the_others(tmp_path, call):
    """`if rank == 0: engine.save_checkpoint(...)` (or load) under ZeRO-3: rank 0 raises
    within the barrier timeout, saying every rank must call it and naming rank 1 (no
    10-minute hang)."""
    spec = {
        "kind": "partial_call",
        "call": call,
        "ckpt": str(tmp_path / "ckpt"),
        "env": {"STRATO_CHECKPOINT_BARRIER_TIMEOUT_S": "5"},
        "exit_now": True,
    }
    results = launch(spec, 2, tmp_path / "out", timeout=120)
    error = results[0]["error"]
    assert error is not None and "CheckpointError" in error, error
    assert f"{call}_checkpoint must be called on every rank" in error and "[1]" in error, error
    assert results[0]["seconds"] < 30, results[0]["seconds"]
    if call == "save":
        assert not (tmp_path / "ckpt" / "latest").exists()
