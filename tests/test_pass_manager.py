"""Pass contracts are checked before anything runs; broken passes are reported by name."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import strato
from examples.custom_pass import tanh_gelu


def _model_and_input():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2)), torch.randn(3, 8)


def _noop(name, **contract):
    @strato.graph_pass(name=name, **contract)
    def fn(gm, ctx):
        return gm

    return fn


def test_custom_pass_shows_in_history_diff_and_output():
    model, x = _model_and_input()
    compiled = strato.compile(model, strato.Strategy(passes=[tanh_gelu]), example_inputs=(x,))
    assert [r.name for r in compiled.history][-1] == "tanh_gelu"
    assert "approximate: tanh" in compiled.diff("tanh_gelu")
    expected = model[2](torch.nn.functional.gelu(model[0](x), approximate="tanh"))
    torch.testing.assert_close(compiled(x), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(compiled(x), model(x), atol=1e-7, rtol=0)


def test_history_records_time_and_node_counts():
    model, x = _model_and_input()
    compiled = strato.compile(model, example_inputs=(x,))
    for record in compiled.history:
        assert record.seconds >= 0 and record.nodes_before > 0 and record.nodes_after > 0
        assert "call_function" in record.graph_after


def test_disable_skips_pass_and_unknown_name_is_an_error():
    model, x = _model_and_input()
    compiled = strato.compile(
        model, strato.Strategy(disable=["eliminate_dead_code"]), example_inputs=(x,)
    )
    assert "eliminate_dead_code" not in [r.name for r in compiled.history]
    with pytest.raises(strato.StrategyError, match="Did you mean 'eliminate_dead_code'"):
        strato.compile(model, strato.Strategy(disable=["eliminate_dead_cod"]), example_inputs=(x,))


def test_conflicting_passes_are_rejected_before_running():
    ran = []

    @strato.graph_pass(name="a", provides="sharded")
    def a(gm, ctx):
        ran.append("a")
        return gm

    b = _noop("b", conflicts="sharded")
    model, x = _model_and_input()
    with pytest.raises(
        strato.PassContractError, match="pass 'b' conflicts with 'sharded'.*pass 'a'"
    ):
        strato.compile(model, strato.Strategy(passes=[a, b]), example_inputs=(x,))
    assert ran == []


def test_missing_requirement_names_pass_and_capability():
    model, x = _model_and_input()
    needy = _noop("needy", requires="quantized_weights")
    with pytest.raises(strato.PassContractError, match="'needy' requires 'quantized_weights'"):
        strato.compile(model, strato.Strategy(passes=[needy]), example_inputs=(x,))


def test_requirement_provided_by_disabled_pass_is_explained():
    model, x = _model_and_input()
    needs_shapes = _noop("needs_shapes", requires="shapes")
    with pytest.raises(strato.PassContractError, match="disabled pass 'annotate_metadata'"):
        strato.compile(
            model,
            strato.Strategy(passes=[needs_shapes], disable=["annotate_metadata"]),
            example_inputs=(x,),
        )


def test_passes_are_ordered_after_their_providers():
    order = []

    @strato.graph_pass(name="consumer", requires="thing")
    def consumer(gm, ctx):
        order.append("consumer")
        return gm

    @strato.graph_pass(name="producer", provides="thing")
    def producer(gm, ctx):
        order.append("producer")
        return gm

    model, x = _model_and_input()
    strato.compile(model, strato.Strategy(passes=[consumer, producer]), example_inputs=(x,))
    assert order == ["producer", "consumer"]


def test_pass_returning_broken_graph_is_reported_by_name():
    @strato.graph_pass(name="breaker")
    def breaker(gm, ctx):
        linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
        first = next(iter(gm.graph.nodes))
        first.prepend(linear)  # a use before its inputs are defined
        return gm

    model, x = _model_and_input()
    with pytest.raises(strato.PassError, match="pass 'breaker' returned a broken graph"):
        strato.compile(model, strato.Strategy(passes=[breaker]), example_inputs=(x,))


def test_pass_returning_wrong_type_or_raising_is_reported_by_name():
    @strato.graph_pass(name="returns_none")
    def returns_none(gm, ctx):
        return None

    @strato.graph_pass(name="explodes")
    def explodes(gm, ctx):
        raise ValueError("boom")

    model, x = _model_and_input()
    with pytest.raises(strato.PassError, match="'returns_none' returned NoneType"):
        strato.compile(model, strato.Strategy(passes=[returns_none]), example_inputs=(x,))
    with pytest.raises(strato.PassError, match="'explodes' raised ValueError: boom"):
        strato.compile(model, strato.Strategy(passes=[explodes]), example_inputs=(x,))


def test_undecorated_function_is_refused():
    with pytest.raises(strato.StrategyError, match="graph_pass"):
        strato.Strategy(passes=[lambda gm, ctx: gm])


def test_dead_code_elimination_removes_unused_but_keeps_mutations():
    class Wasteful(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            unused = torch.relu(x) * 3  # noqa: F841 - dead on purpose
            self.calls.add_(1)
            return self.lin(x)

    model, x = Wasteful(), torch.randn(2, 4)
    compiled = strato.compile(model, example_inputs=(x,))
    assert compiled.context.records["eliminate_dead_code"]["removed_nodes"] >= 2
    targets = {n.target for n in compiled.graph.graph.nodes}
    assert torch.ops.aten.relu.default not in targets
    compiled(x)
    assert model.calls.item() == 1


def test_pass_leaving_a_graph_that_cannot_run_is_named_at_compile_time():
    @strato.graph_pass(name="bad_reshape")
    def bad_reshape(gm, ctx):
        # Lints fine, but the shapes do not fit: only running the graph shows it.
        linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
        with gm.graph.inserting_after(linear):
            broken = gm.graph.call_function(torch.ops.aten.view.default, (linear, [7, 5]))
        linear.replace_all_uses_with(broken, delete_user_cb=lambda user: user is not broken)
        return gm

    model, x = _model_and_input()
    with pytest.raises(strato.PassError, match=r"node 'view\w*'.*made by pass 'bad_reshape'"):
        strato.compile(model, strato.Strategy(passes=[bad_reshape]), example_inputs=(x,))


def _order_of(*passes, disable=()):
    model, x = _model_and_input()
    compiled = strato.compile(
        model, strato.Strategy(passes=list(passes), disable=list(disable)), example_inputs=(x,)
    )
    return [r.name for r in compiled.history]


def test_before_and_after_order_passes_by_name_or_capability():
    cut = _noop("cut", before="sharded")
    shard = _noop("shard", provides="sharded")
    late = _noop("late", after=("shard", "cut"))
    order = _order_of(late, shard, cut)
    assert order.index("cut") < order.index("shard") < order.index("late")
    # Built-in passes move too: a user pass can ask to run before dead-code elimination.
    early = _noop("early", before="dead_code_free")
    order = _order_of(early)
    assert order.index("early") < order.index("eliminate_dead_code")


def test_before_or_after_something_absent_is_no_constraint():
    order = _order_of(_noop("cut", before="sharded"), _noop("tail", after="not_here"))
    assert order[-2:] == ["cut", "tail"]
    # Disabling the pass an ordering names lifts the ordering, not the pass.
    shard = _noop("shard", provides="sharded")
    assert "cut" in _order_of(shard, _noop("cut", before="sharded"), disable=["shard"])


def test_ordering_cycle_names_both_passes_before_anything_runs():
    ran = []

    @strato.graph_pass(name="cut", provides="pipeline_stages", before="sharded")
    def cut(gm, ctx):
        ran.append("cut")
        return gm

    @strato.graph_pass(name="shard", provides="sharded", before="pipeline_stages")
    def shard(gm, ctx):
        ran.append("shard")
        return gm

    model, x = _model_and_input()
    with pytest.raises(strato.PassError, match=r"passes 'cut', 'shard' cannot be ordered") as info:
        strato.compile(model, strato.Strategy(passes=[cut, shard]), example_inputs=(x,))
    text = str(info.value)
    assert "'shard' must run after 'cut' ('cut' runs before='sharded')" in text
    assert "'cut' must run after 'shard' ('shard' runs before='pipeline_stages')" in text
    assert ran == []


def test_ordering_that_contradicts_a_requirement_is_a_contract_error():
    needs = _noop("needs", requires="thing", before="maker")
    maker = _noop("maker", provides="thing")
    with pytest.raises(strato.PassContractError) as info:
        _order_of(needs, maker)
    text = str(info.value)
    assert "'needs' must run after 'maker' ('needs' requires 'thing')" in text
    assert "'maker' must run after 'needs' ('needs' runs before='maker')" in text
    # A cycle through three passes names each link.
    a = _noop("a", after="c")
    b = _noop("b", after="a")
    c = _noop("c", after="b")
    with pytest.raises(strato.PassContractError, match="passes 'a', 'c', 'b' cannot be ordered"):
        _order_of(a, b, c)


def test_a_user_pass_can_run_before_a_builtin_sharding_pass():
    """A pipeline-style cut declared before='zero2' moves ahead of the ZeRO pass, though
    user passes otherwise come after the built-ins."""
    from strato.compiler.pass_manager import plan_passes
    from strato.compiler.pipeline import pipeline

    cut = _noop("cut", before=("zero1", "zero2", "zero3"))
    strategy = strato.Strategy(optimizer=strato.SGD(), zero=2, passes=[cut])
    names = [p.name for p in plan_passes(pipeline(strategy))]
    assert names.index("cut") < names.index("zero2")
    plain = [p.name for p in plan_passes(pipeline(strategy.replace(passes=[_noop("cut")])))]
    assert plain[-1] == "cut"
