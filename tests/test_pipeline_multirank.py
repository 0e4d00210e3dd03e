"""Pipeline parallelism over real gloo processes (torch.multiprocessing, one thread per rank).

Oracle: one eager process training SkipLM (a residual from the embedding to the head that
crosses every cut, and a token embedding tied to the LM head) on the whole batch with SGD,
so no zero-gradient rounding noise is amplified (DEVELOPERS.md on Adam): fp32 losses and
final weights agree within 1e-5 over 10 steps. The loss every rank returns is the step's
mean over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import multirank, pipeline_worker
from tests.pipeline_models import eager_sgd, skip_lm

pytestmark = pytest.mark.slow

STEPS = 10
TOL = 1e-5


def launch(spec: dict, world: int, out: Path, timeout: float = 300) -> list[dict]:
    return multirank.launch(pipeline_worker.run, spec, world, out, timeout)


def check_parity(results: list[dict], name: str, batch: int, layers: int = 4, tol: float = TOL):
    want_losses, want_weights = eager_sgd(skip_lm(layers=layers), STEPS, batch)
    for rank, result in enumerate(results):
        got = result[name]
        assert got["losses"] == pytest.approx(want_losses, abs=tol), (name, rank)
        for key, want in want_weights.items():
            torch.testing.assert_close(got["full"][key], want, atol=tol, rtol=0, msg=(name, key))


def _run(name, stages, schedule, m=4, **more):
    return {
        "name": name,
        "stages": stages,
        "schedule": schedule,
        "microbatches": m,
        "batch": 8,
        "steps": STEPS,
        **more,
    }


def test_two_stages_every_schedule(tmp_path):
    runs = [
        _run("gpipe", 2, "gpipe"),
        _run("1f1b", 2, "1f1b"),
        _run("zero_bubble", 2, "zero_bubble"),
        _run("interleaved", 2, "interleaved", virtual_stages=2),
    ]
    results = launch({"runs": runs}, 2, tmp_path)
    for run in runs:
        check_parity(results, run["name"], 8)
    # Stage 1 never reads layers.0: its data-parallel ranks do not write it.
    assert results[0]["1f1b"]["stage_params"]["layers.0.up.weight"] == [0]
    assert results[0]["1f1b"]["stage_params"]["tok_emb.weight"] == [0, 1]
    assert "pipeline" in results[0]["1f1b"]["comm_by_dim"]


def test_four_stages(tmp_path):
    runs = [_run("1f1b", 4, "1f1b"), _run("gpipe", 4, "gpipe")]
    results = launch({"runs": runs}, 4, tmp_path)
    for run in runs:
        check_parity(results, run["name"], 8)


def test_two_stages_by_two_data_parallel_with_zero(tmp_path):
    runs = [
        _run("zero1", 2, "1f1b", zero=1),
        _run("zero2", 2, "zero_bubble", zero=2),
        _run("dp", 2, "1f1b"),
    ]
    results = launch({"runs": runs}, 4, tmp_path)
    for run in runs:
        check_parity(results, run["name"], 8)


def test_checkpoint_loads_into_a_run_without_pipeline_and_back(tmp_path):
    results = launch({"dir": str(tmp_path / "ckpt")}, 2, tmp_path / "out")
    for r in results:
        for name, want in results[0]["piped"].items():
            torch.testing.assert_close(r["plain"][name], want, atol=0, rtol=0, msg=name)
            torch.testing.assert_close(
                r["back"][name], results[0]["plain_after"][name], atol=0, rtol=0, msg=name
            )
        assert r["step"] == 4
        # Same weights and AdamW states: the next step agrees with the plain run.
        assert r["back_loss"] == pytest.approx(r["plain_next_loss"], abs=1e-6)


def test_bf16_trains(tmp_path):
    runs = [_run("bf16", 2, "1f1b", precision="bf16")]
    results = launch({"runs": runs}, 2, tmp_path)
    want_losses, _ = eager_sgd(skip_lm(), STEPS, 8)
    for result in results:
        got = result["bf16"]["losses"]
        assert got == pytest.approx(want_losses, abs=5e-2)
        assert got[-1] < got[0]
