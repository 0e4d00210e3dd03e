"""Tensor parallelism in one process: the config, its Strategy field and mesh dimension,
bad input, and the pass at size 1 (every rewrite made, every collective a no-op), which
must train exactly like eager. Multi-rank parity is in test_tensor_parallel_multirank.py."""

from __future__ import annotations

import pytest
import torch

import strato
from tests import tp_worker


def test_config_validates_and_round_trips():
    tp = strato.TensorParallel(size=2, plan={"layers.*.mlp.up": "column"})
    assert tp.plan == (("layers.*.mlp.up", "column"),)
    strategy = strato.Strategy(tensor_parallel=tp)
    assert strategy.mesh.tensor == 2  # the config sets the mesh dimension
    again = strato.Strategy.from_yaml(strategy.to_yaml())
    assert again == strategy
    with pytest.raises(strato.StrategyError, match="TensorParallel.size"):
        strato.TensorParallel(size=0)
    with pytest.raises(strato.StrategyError, match="unknown style 'colum'.*'column'"):
        strato.TensorParallel(size=2, plan={"mlp.*": "colum"})


def test_mesh_and_config_sizes_must_agree():
    with pytest.raises(strato.StrategyError, match=r"TensorParallel.size=2 but Mesh.tensor=4"):
        strato.Strategy(tensor_parallel=strato.TensorParallel(size=2), mesh=strato.Mesh(tensor=4))
    with pytest.raises(strato.StrategyError, match="no tensor_parallel is set"):
        strato.Strategy(mesh=strato.Mesh(tensor=2))
    same = strato.Strategy(
        tensor_parallel=strato.TensorParallel(size=2), mesh=strato.Mesh(tensor=2)
    )
    assert same.mesh.tensor == 2
    assert strato.Mesh.dimension_names()[-1] == "tensor"  # innermost


def test_size_must_divide_the_world():
    with pytest.raises(strato.StrategyError, match="tensor=2.*world size 3"):
        strato.Strategy(tensor_parallel=strato.TensorParallel(size=2)).mesh.sizes(3)


def test_plan_glob_matching_nothing_names_near_modules():
    model = tp_worker.build_model("gpt")
    strategy = strato.Strategy(
        tensor_parallel=strato.TensorParallel(size=1, plan={"blocks.*.mlpp.0": "column"})
    )
    x = tp_worker.global_batch("gpt", 0)["idx"]
    with pytest.raises(
        strato.StratoError,
        match=r"'blocks.\*.mlpp.0' matches no module.*Near matches: .*blocks.0.mlp.0",
    ):
        strato.compile(model, strategy, example_inputs=(x,))


@pytest.mark.parametrize(
    "name",
    [
        "gpt",
        pytest.param("llama", marks=pytest.mark.slow),
        pytest.param("gpt2", marks=pytest.mark.slow),
    ],
)
def test_size_one_rewrites_and_trains_like_eager(name):
    """At size 1 the pass still finds every block and rewrites it (copy/reduce around each,
    vocab-parallel embedding and loss), so the rewrite's math is checked against eager."""
    steps = 2
    want_losses, want = tp_worker.eager_train(name, steps)
    spec = {"model": name, "size": 1}
    engine = tp_worker.make_engine(spec, rank=0, world=1)
    record = engine.context.records["tensor_parallel"]
    assert len(record["row"]) == 4 and len(record["column"]) >= 4, record
    assert record["vocab"], record
    graph = str(engine.graph.graph)
    assert "tp_reduce" in graph and "tp_copy" in graph
    losses = [engine.train_step(**tp_worker.global_batch(name, s)) for s in range(steps)]
    torch.testing.assert_close(losses, want_losses, atol=1e-5, rtol=0)
    got = engine.full_state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0, msg=key)


def test_grad_clip_with_tensor_parallel_is_accepted():
    """Clipping counts every shard once over the world (runtime/grad_norm.py; the
    multi-rank tests compare it with eager clip_grad_norm_)."""
    strategy = strato.Strategy(grad_clip=1.0, tensor_parallel=strato.TensorParallel(size=2))
    assert strategy.grad_clip == 1.0 and strategy.mesh.tensor == 2


def test_global_norm_counts_only_the_pieces_this_rank_writes_and_scales_all():
    """A replica another rank writes is left out of the sum but still scaled."""
    from strato.runtime.grad_norm import GradCounting, clip_grad_norm_

    grads = {"a": torch.full((4,), 3.0), "b": torch.full((4,), 4.0), "c": None}
    counting = GradCounting(frozenset({"a", "c"}), group=None)
    assert clip_grad_norm_(grads, counting, None) == pytest.approx(6.0)
    assert torch.equal(grads["a"], torch.full((4,), 3.0))  # no max_norm: nothing scaled
    assert clip_grad_norm_(grads, counting, 3.0) == pytest.approx(6.0)
    torch.testing.assert_close(grads["a"], torch.full((4,), 1.5), rtol=1e-6, atol=0)
    torch.testing.assert_close(grads["b"], torch.full((4,), 2.0), rtol=1e-6, atol=0)


def test_a_plan_shards_what_the_matcher_does_not_find():
    """OddMLPNet's MLP linears live in two sibling modules: the matcher pairs none of them,
    the plan makes them column/row pairs (size 1: every rewrite made, eager's math kept)."""
    steps = 2
    want_losses, want = tp_worker.eager_train("odd", steps)
    unplanned = tp_worker.make_engine({"model": "odd", "size": 1}, rank=0, world=1)
    assert unplanned.context.records["tensor_parallel"]["row"] == []
    spec = {"model": "odd", "size": 1, "plan": tp_worker.ODD_PLAN}
    engine = tp_worker.make_engine(spec, rank=0, world=1)
    record = engine.context.records["tensor_parallel"]
    assert record["row"] == ["squeeze.0.dense", "squeeze.1.dense"], record
    assert {"widen.0.dense", "widen.1.dense"} <= set(record["column"]), record
    losses = [engine.train_step(**tp_worker.global_batch("odd", s)) for s in range(steps)]
    torch.testing.assert_close(losses, want_losses, atol=1e-5, rtol=0)
    got = engine.full_state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0, msg=key)
