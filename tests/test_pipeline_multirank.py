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
from tests.pipeline_models import eager_sgd, skip_lm, tokens

pytestmark = pytest.mark.slow

STEPS = 10
TOL = 1e-5
CLIP = 0.5
"""Below every step's gradient norm in these runs, so each step is clipped."""


def launch(spec: dict, world: int, out: Path, timeout: float = 300) -> list[dict]:
    return multirank.launch(pipeline_worker.run, spec, world, out, timeout)


def check_parity(
    results: list[dict],
    name: str,
    batch: int,
    layers: int = 4,
    tol: float = TOL,
    clip: float | None = None,
):
    norms: list[float] = []
    want_losses, want_weights = eager_sgd(
        skip_lm(layers=layers), STEPS, batch, clip=clip, norms=norms
    )
    if clip is not None:  # the norm every rank reports is the whole model's, before clipping
        for rank, result in enumerate(results):
            assert result[name]["grad_norms"] == pytest.approx(norms, rel=1e-5), (name, rank)
        assert min(norms) > clip  # every step clipped: the test would see a wrong norm
    trained = skip_lm(layers=layers)
    trained.load_state_dict(want_weights, strict=False)  # head.weight is tok_emb.weight
    data_parallel = len(results) // results[0][name]["stages"]
    for rank, result in enumerate(results):
        got = result[name]
        assert got["losses"] == pytest.approx(want_losses, abs=tol), (name, rank)
        for key, want in want_weights.items():
            torch.testing.assert_close(got["full"][key], want, atol=tol, rtol=0, msg=(name, key))
        # Eval runs the whole model on every rank (other stages' weights fetched first).
        x, y = tokens(STEPS, batch)
        per_rank = batch // data_parallel
        rows = slice(rank % data_parallel * per_rank, (rank % data_parallel + 1) * per_rank)
        with torch.no_grad():
            want_eval = float(trained(x[rows], y[rows]))
        assert got["eval_loss"] == pytest.approx(want_eval, abs=tol), (name, rank)


def check_stage_local(results: list[dict], name: str) -> None:
    """Each rank holds, reduces and updates only the parameters its stages read (tied ones on
    every stage using them); model-state bytes are those parameters' (SGD without momentum:
    parameter + gradient, 4 bytes each), so the stages' sum is one process's plus the tied
    copies."""
    model = skip_lm()
    numel = {n: p.numel() for n, p in model.named_parameters()}
    for rank, result in enumerate(results):
        got = result[name]
        stages = got["stages"]
        pipeline_rank = rank // (len(results) // stages)
        want = sorted(
            n
            for n, users in got["stage_params"].items()
            if any(s % stages == pipeline_rank for s in users)
        )
        assert got["held"] == want, (name, rank)
        assert got["updated"] == want, (name, rank)
        assert got["model_state_bytes"] == 8 * sum(numel[n] for n in want), (name, rank)
    first, last = results[0][name]["held"], results[-1][name]["held"]
    assert "layers.0.up.weight" in first and "layers.0.up.weight" not in last
    assert "tok_emb.weight" in first and "tok_emb.weight" in last


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
        check_stage_local(results, run["name"])
    # Stage 1 never reads layers.0: its data-parallel ranks do not write it.
    assert results[0]["1f1b"]["stage_params"]["layers.0.up.weight"] == [0]
    assert results[0]["1f1b"]["stage_params"]["tok_emb.weight"] == [0, 1]
    assert "pipeline" in results[0]["1f1b"]["comm_by_dim"]


def test_four_stages(tmp_path):
    runs = [_run("1f1b", 4, "1f1b"), _run("gpipe", 4, "gpipe")]
    results = launch({"runs": runs}, 4, tmp_path)
    for run in runs:
        check_parity(results, run["name"], 8)
    check_stage_local(results, "1f1b")


def test_two_stages_by_two_data_parallel_with_zero(tmp_path):
    runs = [
        _run("zero1", 2, "1f1b", zero=1),
        _run("zero2", 2, "zero_bubble", zero=2),
        _run("dp", 2, "1f1b"),
        _run("zero2_clip", 2, "1f1b", zero=2, grad_clip=CLIP),
    ]
    results = launch({"runs": runs}, 4, tmp_path)
    for run in runs:
        check_parity(results, run["name"], 8, clip=run.get("grad_clip"))
    check_stage_local(results, "dp")


def test_grad_clip_fp16_and_recompute_per_stage(tmp_path):
    """The clipped norm is the whole model's (every stage's parameters, the tied embedding
    once); fp16 overflows found on one stage skip the step on every rank; each stage
    recomputes its own layers (and the last its loss tail)."""
    runs = [
        _run("clip", 2, "zero_bubble", grad_clip=CLIP),
        _run("fp16", 2, "1f1b", precision="fp16", initial_scale=2.0**24),
        _run("recompute", 2, "1f1b", recompute="selective"),
    ]
    results = launch({"runs": runs}, 2, tmp_path)
    check_parity(results, "clip", 8, clip=CLIP)
    check_parity(results, "recompute", 8)
    skipped = {r["fp16"]["skipped_steps"] for r in results}
    assert len(skipped) == 1 and 0 < min(skipped) < STEPS - 3, skipped
    want_losses, want_weights = eager_sgd(skip_lm(), STEPS, 8, skipped=min(skipped))
    for result in results:
        got = result["fp16"]
        assert got["losses"] == pytest.approx(want_losses, abs=1e-2)
        for key, want in want_weights.items():
            torch.testing.assert_close(got["full"][key], want, atol=1e-2, rtol=0, msg=key)


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
