"""Activation recomputation composed with data parallel and ZeRO-1/2/3 on 2 gloo ranks
(torch.multiprocessing). Dropout off: losses and SGD-updated weights match one eager process
on the concatenated batch within 1e-5 (ranks draw their own dropout masks, eager cannot).
Dropout on, fp32/bf16/fp16: each recompute run equals the same strategy without
recomputation, so the recomputed forward replayed every rank's masks and casts."""

from __future__ import annotations

import pytest
import torch

from examples.gpt import GPT
from tests import multirank, recompute_worker
from tests.training_utils import batch
from tests.zero_worker import CFG

pytestmark = pytest.mark.slow
WORLD = 2
POLICIES = ("full", "selective")


def eager_reference():
    torch.manual_seed(0)
    model = GPT(CFG)
    sgd = torch.optim.SGD(model.parameters(), lr=recompute_worker.LR)  # no momentum
    losses = []
    for step in range(recompute_worker.STEPS):
        loss = model(*batch(step, recompute_worker.PER_RANK * WORLD, CFG))
        loss.backward()
        sgd.step()
        sgd.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, dict(model.named_parameters())


def assert_matches_eager(results: list[dict]) -> None:
    ref_losses, ref_params = eager_reference()
    mean = sum(r["losses"][-1] for r in results) / WORLD
    assert abs(mean - ref_losses[-1]) <= 1e-5, (mean, ref_losses)
    for result in results:
        for name, value in ref_params.items():
            torch.testing.assert_close(result["params"][name], value.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_zero3_two_ranks_with_recompute_match_eager(policy, tmp_path):
    spec = [{"zero": 3, "policy": policy}]
    results = [
        ranks[0] for ranks in multirank.launch(recompute_worker.run, spec, WORLD, tmp_path, 150)
    ]
    for result in results:
        assert result["regathered"] == ["blocks.0", "blocks.1"]
    assert_matches_eager(results)


def test_data_parallel_and_zero12_with_recompute_match_eager(tmp_path):
    spec = [{"zero": zero, "policy": p} for zero in (0, 1, 2) for p in POLICIES]
    per_rank = multirank.launch(recompute_worker.run, spec, WORLD, tmp_path, 300)
    for k, run in enumerate(spec):
        results = [ranks[k] for ranks in per_rank]
        assert results[0]["regions"][:2] == ["blocks.0", "blocks.1"], run
        assert "<tail>" in results[0]["regions"], run
        assert_matches_eager(results)


@pytest.mark.parametrize("zero,precision", [(0, "bf16"), (2, "fp16"), (3, "fp32")])
def test_dropout_and_half_precision_recompute_equal_no_recompute(zero, precision, tmp_path):
    policies = ("none", *POLICIES)
    spec = [{"zero": zero, "policy": p, "precision": precision, "dropout": 0.1} for p in policies]
    for ranks in multirank.launch(recompute_worker.run, spec, WORLD, tmp_path, 280):
        base = ranks[0]
        for policy, result in zip(policies[1:], ranks[1:]):
            assert result["losses"] == pytest.approx(base["losses"], abs=1e-6), policy
            for name, value in base["params"].items():
                torch.testing.assert_close(
                    result["params"][name], value, atol=1e-6, rtol=0, msg=f"{policy} {name}"
                )
