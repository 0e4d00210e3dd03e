"""ZeRO in one process: what the zero passes put in the graph and the records, Strategy
fields, the collective-schedule comparison, and the stage-3 runtime on a world of one
(parity with eager under SGD). Multi-rank behaviour: tests/test_zero_multirank.py."""

from __future__ import annotations

import pytest
import torch

import strato
from examples.gpt import GPT, GPTConfig
from strato.passes.zero import zero_stage1, zero_stage3
from strato.runtime.collective_schedule import digest, first_difference
from tests.training_utils import batch

CFG = GPTConfig(vocab_size=97, seq_len=8, d_model=33, n_layers=2, n_heads=3)


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def zero3_graph(**strategy):
    model = tiny()
    compiled = strato.compile(
        model, strato.Strategy(passes=[zero_stage3], **strategy), example_inputs=batch(0, 2, CFG)
    )
    return model, compiled


def calls(gm, name: str):
    return [n for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target)]


@pytest.fixture(scope="module")
def zero3_default():
    return zero3_graph()


def test_zero3_graph_gathers_and_releases_each_unit_once(zero3_default):
    model, compiled = zero3_default
    record = compiled.context.records["zero"]
    units = [u["name"] for u in record["units"]]
    assert units == ["tok_emb", "pos_emb", "blocks.0", "blocks.1", "ln_f"]
    gathers = calls(compiled.graph, "zero_gather")
    releases = calls(compiled.graph, "zero_release")
    assert [g.meta["strato_zero"]["unit"] for g in gathers] == units
    assert len(releases) == len(units)
    order = {n: i for i, n in enumerate(compiled.graph.graph.nodes)}
    release_of = {r.meta["strato_zero"]["unit"]: r for r in releases}
    for gather in gathers:
        release = release_of[gather.meta["strato_zero"]["unit"]]
        uses = [u for item in gather.users for u in item.users]
        assert order[gather] < min(order[u] for u in uses)
        assert max(order[u] for u in uses) < order[release]  # freed after the last use
    # No compute node reads a parameter directly any more.
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for node in compiled.graph.graph.nodes:
        if node.op == "get_attr" and node.target in params:
            assert all("zero_" in str(u.target) for u in node.users), node
    # The tied LM head is the token embedding: gathered once, under its first name.
    assert "lm_head.weight" not in record["params"]
    assert sorted(record["params"]["tok_emb.weight"]["aliases"]) == ["lm_head.weight"] or (
        "tok_emb.weight" in record["params"]["tok_emb.weight"]["aliases"]
    )
    assert len(calls(compiled.graph, "zero_forward_begin")) == 1
    assert len(calls(compiled.graph, "zero_forward_end")) == 1


def test_zero_layout_pads_uneven_parameters(zero3_default):
    _, compiled = zero3_default
    record = compiled.context.records["zero"]
    for unit in record["units"]:
        offset = 0
        for name in unit["params"]:
            info = record["params"][name]
            assert unit["offsets"][name] == offset
            assert info["shard_numel"] * record["world_size"] >= info["numel"]
            offset += info["shard_numel"]
        assert unit["shard_numel"] == offset


def test_small_parameters_stay_whole_and_go_to_buckets():
    _, compiled = zero3_graph(zero_small_param_threshold=200)
    record = compiled.context.records["zero"]
    gathered = {n for u in record["units"] for n in u["params"]}
    bucketed = {n for b in record["buckets"] for n in b["params"]}
    small = {n for n, info in record["params"].items() if info["numel"] < 200}
    assert small and small == bucketed and not (small & gathered)
    assert gathered | bucketed == set(record["params"])


def test_bucket_gathers_are_awaited_before_first_use_in_forward_order():
    """Stage 1/2: one zero_await_bucket per bucket forward reads, each before the first
    node that reads one of the bucket's parameters; the gathers are issued in that order."""
    model = tiny()
    strategy = strato.Strategy(passes=[zero_stage1], zero_bucket_mb=0.002)  # several buckets
    compiled = strato.compile(model, strategy, example_inputs=batch(0, 2, CFG))
    record = compiled.context.records["zero"]
    waits = calls(compiled.graph, "zero_await_bucket")
    assert len(record["buckets"]) > 2 and record["await_gathers"]
    assert [w.args[1] for w in waits] == record["gather_order"][: len(waits)]
    assert sorted(record["gather_order"]) == list(range(len(record["buckets"])))
    order = {n: i for i, n in enumerate(compiled.graph.graph.nodes)}
    targets = {b["name"]: set() for b in record["buckets"]}
    for node in compiled.graph.graph.nodes:
        if node.op == "get_attr" and "strato_zero" in node.meta:
            targets[node.meta["strato_zero"]["bucket"]].add(node)
    for wait in waits:
        reads = targets[record["buckets"][wait.args[1]]["name"]]
        first_read_use = min(order[u] for r in reads for u in r.users if u is not wait)
        assert order[wait] < first_read_use


def test_zero_passes_conflict():
    with pytest.raises(strato.PassContractError, match="zero"):
        strato.compile(
            tiny(),
            strato.Strategy(passes=[zero_stage1, zero_stage3]),
            example_inputs=batch(0, 2, CFG),
        )


def test_strategy_zero_fields_validate_and_round_trip(tmp_path):
    s = strato.Strategy(
        zero=3, optimizer=strato.AdamW(), offload=strato.NVMe(tmp_path), zero_prefetch=2
    )
    assert strato.Strategy.from_yaml(s.to_yaml()) == s
    assert strato.Strategy(zero=1, optimizer=strato.SGD(), offload="cpu").offload == "cpu"
    with pytest.raises(strato.StrategyError, match=r"Strategy\.zero"):
        strato.Strategy(zero=4, optimizer=strato.AdamW())
    with pytest.raises(strato.StrategyError, match=r"Strategy\.zero: stage 2 .* optimizer"):
        strato.Strategy(zero=2)
    with pytest.raises(strato.StrategyError, match=r"Strategy\.offload"):
        strato.Strategy(zero=2, optimizer=strato.AdamW(), offload="gpu")
    with pytest.raises(strato.StrategyError, match=r"Strategy\.offload: .*ZeRO"):
        strato.Strategy(optimizer=strato.AdamW(), offload="cpu")
    with pytest.raises(strato.StrategyError, match=r"Strategy\.zero_prefetch"):
        strato.Strategy(zero=3, optimizer=strato.AdamW(), zero_prefetch=-1)
    with pytest.raises(strato.StrategyError, match=r"Strategy\.zero_bucket_mb"):
        strato.Strategy(zero=2, optimizer=strato.AdamW(), zero_bucket_mb=0)


def test_schedule_difference_names_the_first_differing_collective():
    a = [
        ("all_gather", (2, 10), "float32", "world"),
        ("reduce_scatter", (2, 5), "float32", "world"),
    ]
    b = [a[0], ("reduce_scatter", (2, 6), "float32", "world")]
    assert digest(a) != digest(b) and digest(a) == digest(list(a))
    text = first_difference(a, b)
    assert text.startswith("collective #1: reduce_scatter(shape=[2, 5]") and "[2, 6]" in text
    assert "only here" in first_difference(a, a[:1])


def test_zero3_single_process_matches_eager_and_regathers_in_backward():
    """World of one: the whole stage-3 path (gathers, handles, re-gather, reduce) runs."""
    eager = tiny()
    reference = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9, fused=True)
    engine = strato.compile(
        tiny(),
        strato.Strategy(zero=3, optimizer=strato.SGD(lr=0.1, momentum=0.9)),
        example_inputs=batch(0, 2, CFG),
    )
    units = engine.manager.units
    for step in range(3):
        x, y = batch(step, 2, CFG)
        ref_loss = eager(x, y)
        ref_loss.backward()
        reference.step()
        reference.zero_grad()
        loss = engine(x, y)
        # Forward kept no full parameter: autograd holds handles, backward gathers again,
        # the unit it needs first already issued.
        assert not units.forward_full and units.saved_units
        assert list(units.in_flight) == units.saved_units[-1:]
        engine.backward(loss)
        engine.step()
        assert list(units.in_flight) == [0]  # the next forward's first unit, updated first
        assert abs(loss.item() - ref_loss.item()) <= 1e-6
    full = engine.manager.full_parameters()
    for name, p in eager.named_parameters():
        torch.testing.assert_close(full[name], p.detach(), atol=1e-6, rtol=0, msg=name)
    engine.eval()  # the eval graph (built before sharding) runs on the shards too
    with torch.no_grad():
        eager.eval()
        x, y = batch(5, 2, CFG)
        torch.testing.assert_close(engine(x, y), eager(x, y), atol=1e-5, rtol=0)
    text = str(engine.explain())
    assert "ZeRO stage 3" in text


def test_zero3_gathers_prefetched_for_backward_never_outlive_a_parameter_change(tmp_path):
    """A forward leaves the gather backward needs first in flight; a forward without
    backward, then a checkpoint load, must not hand those stale values to the next forward."""
    strategy = strato.Strategy(zero=3, optimizer=strato.SGD(lr=0.5))
    trained = strato.compile(tiny(), strategy, example_inputs=batch(0, 2, CFG))
    for step in range(2):
        trained.backward(trained(*batch(step, 2, CFG)))
        trained.step()
    trained.save_checkpoint(tmp_path / "ckpt")
    engine = strato.compile(tiny(), strategy, example_inputs=batch(0, 2, CFG))
    x, y = batch(3, 2, CFG)
    engine(x, y)  # forward only
    assert engine.manager.units.in_flight
    engine.load_checkpoint(tmp_path / "ckpt")
    assert not engine.manager.units.in_flight
    assert torch.equal(engine(x, y), trained(x, y))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_accumulation_clipping_and_small_params_match_eager(stage):
    """Two micro-steps per update, clipping at 0.5, small parameters whole (stage 3: they
    go through the stage-2 bucket path): equal to eager accumulation + clip_grad_norm_."""
    eager = tiny()
    reference = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9, fused=True)
    engine = strato.compile(
        tiny(),
        strato.Strategy(
            zero=stage,
            optimizer=strato.SGD(lr=0.1, momentum=0.9),
            grad_accumulation=2,
            grad_clip=0.5,
            zero_small_param_threshold=200,
            zero_bucket_mb=0.01,
        ),
        example_inputs=batch(0, 2, CFG),
    )
    if stage == 3:
        assert engine.context.records["zero"]["buckets"], "small parameters were gathered"
    for step in range(3):
        x, y = batch(step, 4, CFG)
        for half in (slice(0, 2), slice(2, 4)):
            (eager(x[half], y[half]) / 2).backward()
            loss = engine(x[half], y[half])
            engine.backward(loss)
            engine.step()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(eager.parameters(), 0.5))
        reference.step()
        reference.zero_grad()
        assert abs(engine.stats()["grad_norm"] - ref_norm) <= 1e-5 * max(1.0, ref_norm)
    full = engine.manager.full_parameters()
    for name, p in eager.named_parameters():
        torch.testing.assert_close(full[name], p.detach(), atol=1e-6, rtol=0, msg=name)


def test_zero3_bf16_matches_data_parallel_bf16():
    """Mixed precision composes with stage 3: the casts follow the gathers, and training
    equals the unsharded bf16 engine (same casts) within 1e-5."""
    engines = [
        strato.compile(
            tiny(),
            strato.Strategy(zero=stage, optimizer=strato.AdamW(lr=1e-3), precision="bf16"),
            example_inputs=batch(0, 2, CFG),
        )
        for stage in (0, 3)
    ]
    for step in range(3):
        losses = []
        for engine in engines:
            loss = engine(*batch(step, 2, CFG))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5, (step, losses)
    full = engines[1].manager.full_parameters()
    for name, p in engines[0].named_parameters():
        torch.testing.assert_close(full[name], p.detach(), atol=1e-5, rtol=0, msg=name)


def test_compiling_the_same_model_twice_keeps_one_gradient_hook_per_parameter():
    """A second engine on the same model replaces the first one's hooks: a duplicate hook
    would launch every bucket's collective twice (and hang ranks that compiled once)."""
    model = tiny()
    strategy = strato.Strategy(zero=2, optimizer=strato.SGD(lr=0.1), zero_bucket_mb=0.01)
    for _ in range(2):
        engine = strato.compile(model, strategy, example_inputs=batch(0, 2, CFG))
    hooked = [p for p in model.parameters() if p._post_accumulate_grad_hooks]
    assert hooked and all(len(p._post_accumulate_grad_hooks) == 1 for p in hooked)
    x, y = batch(1, 2, CFG)
    engine.backward(engine(x, y))
    assert engine.step()
