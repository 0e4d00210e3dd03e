"""engine.train_step on 2 real processes (torchrun, gloo): equal to the three-call loop
under data parallelism and ZeRO-2, with grad_accumulation 1 and 4; ranks that compiled
different models fail at strato.compile naming the first collective that differs."""

from __future__ import annotations

import pytest

from tests.test_data_parallel import torchrun

pytestmark = pytest.mark.slow


def test_train_step_equals_the_three_call_loop_on_two_ranks(tmp_path):
    """Same ops on the same micro-batches: losses and weights bitwise equal on every rank."""
    results = torchrun(tmp_path, "train_step", "--steps", "2")
    assert results["world_size"] == 2
    for rank, combos in enumerate(results["ranks"]):
        assert len(combos) == 4
        for name, r in combos.items():
            assert r["stepped"] == r["looped"], (rank, name)
            assert r["weights_equal"], (rank, name)
    # Each rank trained on its own half: the losses differ between ranks.
    first, second = (combos["accumulation=4,zero=2"]["stepped"] for combos in results["ranks"])
    assert first != second


def test_ranks_with_different_models_get_the_first_differing_collective(tmp_path):
    """Rank 1 has 3 layers, rank 0 has 2. With ZeRO-2 the first difference is the gradient
    reduce-scatter (collective #1, after the stage marker); without ZeRO, the first
    gradient bucket's all-reduce. Every rank raises, from strato.compile, before any other
    collective (rank 0's parameters are broadcast later: they would not fit rank 1's)."""
    per_rank = torchrun(tmp_path, "mismatch")["errors"]
    for rank, errors in enumerate(per_rank):
        for zero, first in [
            ("0", "collective #0: all_reduce(shape=["),
            ("2", "collective #1: reduce_scatter(shape=[2, "),
        ]:
            error = errors[zero]
            assert error is not None, f"rank {rank} did not notice the mismatch (zero={zero})"
            assert error.startswith("CollectiveMismatchError"), error
            assert "were started with a different model or strategy than rank 0" in error
            assert f"rank {1 - rank}: {first}" in error, error
