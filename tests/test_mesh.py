"""strato.Mesh: named dimensions, sizes resolved against the world, clear errors, the
runtime mesh's grid and groups, and what the compile records say each collective uses.
Single process; the multi-rank meshes run in tests/test_zero_multirank.py."""

from __future__ import annotations

import pytest
import torch

import strato
from examples.gpt import GPT, GPTConfig
from strato.compiler.strategy import Strategy, config_from_dict
from strato.runtime.collective_schedule import step_schedule
from strato.runtime.mesh import ProcessMesh
from tests.training_utils import batch

CFG = GPTConfig(vocab_size=97, seq_len=8, d_model=33, n_layers=2, n_heads=3)


def dp_sizes(replicate: int, shard: int) -> dict[str, int]:
    """A mesh's sizes when only the data-parallel dimensions are above 1."""
    return {"pipeline": 1, "replicate": replicate, "shard": shard, "tensor": 1}


def test_sizes_resolve_the_rest_and_check_the_world():
    assert strato.Mesh().sizes(4) == dp_sizes(1, 4)
    assert strato.Mesh(replicate=2).sizes(4) == dp_sizes(2, 2)
    assert strato.Mesh(replicate=-1, shard=2).sizes(8) == dp_sizes(4, 2)
    assert strato.Mesh(replicate=-1).sizes(4) == dp_sizes(4, 1)
    assert strato.Mesh(replicate=4, shard=1).sizes(4) == dp_sizes(4, 1)
    # No process group: the script runs as one process whatever sizes it asks for.
    assert strato.Mesh(replicate=2, shard=2).sizes(None) == dp_sizes(1, 1)


def test_bad_meshes_name_the_sizes_and_the_world():
    with pytest.raises(
        strato.StrategyError, match=r"replicate=2 x shard=3 x tensor=1 = 6 ranks.*world size is 4"
    ):
        strato.Mesh(replicate=2, shard=3).sizes(4)
    with pytest.raises(
        strato.StrategyError, match=r"multiply to 3, which does not divide the world size 4"
    ):
        strato.Mesh(replicate=3).sizes(4)
    with pytest.raises(strato.StrategyError, match=r"only one size may be -1"):
        strato.Mesh(replicate=-1, shard=-1)
    with pytest.raises(strato.StrategyError, match=r"Mesh.shard: expected a size >= 1"):
        strato.Mesh(shard=0)


def test_unknown_dimension_names_suggest_the_right_one():
    with pytest.raises(
        strato.StrategyError, match=r"unknown dimension 'shards'\. Did you mean 'shard'\?"
    ):
        strato.Mesh(shards=2)
    with pytest.raises(
        strato.StrategyError, match=r"Strategy.mesh: unknown field 'replicat'.*'replicate'"
    ):
        config_from_dict(Strategy, {"mesh": {"replicat": 2}}, "Strategy")
    with pytest.raises(strato.StrategyError, match=r"Strategy.mesh: expected strato.Mesh"):
        Strategy(mesh={"replicate": 2})
    mesh = ProcessMesh(strato.Mesh(), {"replicate": 1, "shard": 1}, 0, torch.device("cpu"))
    with pytest.raises(strato.StrategyError, match=r"no dimension 'shrd'\. Did you mean 'shard'\?"):
        mesh.group("shrd")


def test_strategy_mesh_round_trips_through_yaml():
    strategy = Strategy(
        optimizer=strato.SGD(lr=0.1), zero=2, mesh=strato.Mesh(replicate=2, shard=2)
    )
    import yaml

    again = config_from_dict(Strategy, yaml.safe_load(strategy.to_yaml()), "Strategy")
    assert again.mesh == strato.Mesh(replicate=2, shard=2)


def test_grid_coordinates_groups_and_printout():
    """rank r at row-major coordinates; a group is the ranks sharing the other coordinates."""
    mesh = ProcessMesh(
        strato.Mesh(replicate=2, shard=3), {"replicate": 2, "shard": 3}, 4, torch.device("cpu")
    )
    assert mesh.coordinates(4) == {"replicate": 1, "shard": 1}
    assert mesh.ranks_along(("shard",), 4) == (3, 4, 5)
    assert mesh.ranks_along(("replicate",), 4) == (1, 4)
    assert mesh.ranks_along(("replicate", "shard"), 4) == tuple(range(6))
    text = str(
        mesh.with_uses(
            {"zero": {"collectives": [{"op": "all_gather", "dim": "shard", "what": "params"}]}}
        )
    )
    assert "replicate=2 x shard=3 over 6 ranks" in text
    assert "shard: [0, 1, 2] [3, 4, 5]" in text and "all_gather params" in text
    assert "replicate: [0, 3] [1, 4] [2, 5]" in text
    assert "this rank: 4 (replicate=1, shard=1)" in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("replicate=")]
    assert rows == [["replicate=0", "0", "1", "2"], ["replicate=1", "3", "4", "5"]]


@pytest.mark.parametrize("stage", [0, 3])
def test_single_process_compile_records_mesh_dimensions(stage):
    torch.manual_seed(0)
    engine = strato.compile(
        GPT(CFG),
        strato.Strategy(
            optimizer=strato.SGD(lr=0.1), zero=stage, mesh=strato.Mesh(replicate=2, shard=2)
        ),
        example_inputs=batch(0, 2, CFG),
    )
    ctx = engine.context
    assert ctx.mesh.sizes == dp_sizes(1, 1) and ctx.world_size == 1
    text = str(engine.mesh)
    assert "over 1 ranks (single process, cpu)" in text
    if stage == 0:
        record = ctx.records["data_parallel"]
        assert record["mesh_dims"] == ["replicate", "shard"]
        names = [n for bucket in record["buckets"] for n in bucket["params"]]
        assert sorted(names) == sorted(n for n, _ in GPT(CFG).named_parameters())
        assert "all_reduce gradient buckets" in text
        assert any("data parallel over 1 ranks" in note for note in engine.explain().notes)
        return
    record = ctx.records["zero"]
    assert (record["shard_size"], record["replicate_size"]) == (1, 1)
    gathers = [
        n for n in engine.graph.graph.nodes if n.target is torch.ops.strato.zero_gather.default
    ]
    assert gathers and all(n.meta["strato_zero"]["mesh_dim"] == "shard" for n in gathers)
    # The schedule names each collective's dimension and ends with the mesh's sizes.
    record = {**record, "shard_size": 2, "replicate_size": 2}
    schedule = step_schedule({"zero": record}, ctx.mesh)
    world = "pipeline,replicate,shard,tensor"
    assert {c[3] for c in schedule} == {"shard", "replicate", world}
    assert schedule[-1] == ("mesh", (1, 1, 1, 1), "", world)
    reduces = [c for c in schedule if c[0] == "reduce_scatter"]
    across = [c for c in schedule if c[0] == "all_reduce"]
    assert len(across) == len(reduces) == len(record["units"]) + len(record["buckets"])
