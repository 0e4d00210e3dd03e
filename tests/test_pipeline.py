"""Pipeline parallelism in one process: the config's bad input, schedules as data (generators,
validator, planned bubble), the cut pass, and every schedule run with all stages in this
process against eager PyTorch (SGD, so weights compare exactly; fp32 within 1e-5).
The multi-rank runs are in tests/test_pipeline_multirank.py."""

from __future__ import annotations

import attrs
import pytest
import torch

import strato
from strato.runtime.pipeline.schedules import (
    Action,
    PipelineSchedule,
    ScheduleError,
    build_schedule,
)
from strato.runtime.saved_tensors import kept_bytes
from tests.pipeline_models import LR, eager_sgd, skip_lm, tokens

TOL = 1e-5


# ---------------------------------------------------------------------- config


def test_pipeline_config_round_trips_and_sets_nothing_else():
    s = strato.Strategy(
        optimizer=strato.SGD(lr=0.1),
        pipeline=strato.Pipeline(stages=2, microbatches=4, schedule="zero_bubble"),
    )
    again = strato.Strategy.from_yaml(s.to_yaml())
    assert again == s
    assert again.pipeline.schedule == "zero_bubble"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"stages": 4, "microbatches": 2}, ["microbatches=2 < stages=4", "gpipe"]),
        ({"schedule": "interleaved"}, ["virtual_stages >= 2"]),
        ({"schedule": "1f1b", "virtual_stages": 2}, ["needs schedule='interleaved'"]),
        ({"schedule": "1fb1"}, ["Did you mean '1f1b'"]),
        ({"stages": 2, "cuts": ["a", "b"]}, ["2 cut(s)", "exactly 1"]),
        (
            {"stages": 2, "microbatches": 5, "schedule": "interleaved", "virtual_stages": 2},
            ["multiple"],
        ),
    ],
)
def test_pipeline_bad_config(kwargs, words):
    with pytest.raises(strato.StrategyError) as info:
        strato.Pipeline(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_pipeline_refusals_name_the_fields():
    pipe = strato.Pipeline(stages=2, microbatches=4)
    with pytest.raises(strato.StrategyError, match="ZeRO-3"):
        strato.Strategy(optimizer=strato.SGD(lr=0.1), zero=3, pipeline=pipe)
    with pytest.raises(strato.StrategyError, match="grad_accumulation=3"):
        strato.Strategy(optimizer=strato.SGD(lr=0.1), grad_accumulation=3, pipeline=pipe)
    with pytest.raises(strato.StrategyError, match=r"Mesh\(pipeline=4\)"):
        strato.Strategy(optimizer=strato.SGD(lr=0.1), mesh=strato.Mesh(pipeline=4), pipeline=pipe)


def test_mesh_pipeline_dimension_is_outermost():
    assert strato.Mesh.dimension_names()[0] == "pipeline"
    sizes = strato.Mesh(pipeline=2).sizes(8)
    assert sizes["pipeline"] == 2 and sizes["shard"] == 4


# ---------------------------------------------------------------------- schedules


@pytest.mark.parametrize("ranks, m", [(2, 4), (2, 8), (4, 8)])
def test_planned_bubbles(ranks, m):
    ideal = (ranks - 1) / (m + ranks - 1)
    one_f_one_b = build_schedule("1f1b", ranks, m)
    assert one_f_one_b.bubble() == pytest.approx(ideal)
    assert build_schedule("gpipe", ranks, m).bubble() == pytest.approx(ideal)
    zero_bubble = build_schedule("zero_bubble", ranks, m).bubble()
    assert zero_bubble < one_f_one_b.bubble()
    if ranks == 2:  # the list-scheduled ZB-H1 reaches half of 1F1B's bubble at P=2 only
        assert zero_bubble <= one_f_one_b.bubble() / 2
    assert build_schedule("interleaved", ranks, m, 2).bubble() < one_f_one_b.bubble()


def test_one_f_one_b_and_zero_bubble_keep_at_most_p_micro_batches_in_flight():
    ranks, m = 4, 8
    for name, limit in (("1f1b", ranks), ("gpipe", m), ("zero_bubble", ranks)):
        schedule = build_schedule(name, ranks, m)
        freed_by = "W" if name == "zero_bubble" else "B"  # zero-bubble holds them until W
        peak = 0
        for actions in schedule.actions:
            in_flight = 0
            for a in actions:
                in_flight += {"F": 1, freed_by: -1}.get(a.kind, 0)
                peak = max(peak, in_flight)
        assert peak == limit, name


def test_schedule_prints_and_plots(tmp_path):
    schedule = build_schedule("1f1b", 2, 4)
    text = str(schedule)
    assert "rank 0:" in text and "rank 1:" in text and "F0" in text and "B3" in text
    assert "bubble 20.0%" in text
    assert "SEND_F0[s0>s1]" in schedule.describe()
    png = schedule.plot(tmp_path / "plan.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_residual_producers_add_sends_to_non_adjacent_stages():
    producers = {0: (), 1: (0,), 2: (0, 1)}  # stage 0 also feeds stage 2
    schedule = build_schedule("1f1b", 3, 4, producers=producers)
    kinds = [str(a) for a in schedule.actions[0]]
    assert "SEND_F0[s0>s2]" in kinds and "RECV_B0[s0<s2]" in kinds


def test_validator_rejects_a_lone_send_and_a_deadlock():
    good = build_schedule("1f1b", 2, 2)
    lone = tuple(a for a in good.actions[1] if a.kind != "RECV_F" or a.microbatch != 1)
    with pytest.raises(ScheduleError, match="no matching receive"):
        PipelineSchedule("bad", 2, 2, 1, (good.actions[0], lone), good.producers)
    # Rank 0 waits for a gradient before sending the activation rank 1 waits for.
    r0 = (
        Action("RECV_B", 0, 0, 1),
        Action("F", 0, 0),
        Action("SEND_F", 0, 0, 1),
        Action("B", 0, 0),
    )
    r1 = (
        Action("RECV_F", 1, 0, 0),
        Action("F", 1, 0),
        Action("B", 1, 0),
        Action("SEND_B", 1, 0, 0),
    )
    with pytest.raises(ScheduleError, match="deadlock"):
        PipelineSchedule("stuck", 2, 1, 1, (r0, r1), {0: (), 1: (0,)})


# ---------------------------------------------------------------------- cut + run


def _strategy(schedule="1f1b", stages=2, m=4, v=1, **pipe):
    return strato.Strategy(
        optimizer=strato.SGD(lr=LR, momentum=0.0),
        pipeline=strato.Pipeline(
            stages=stages, microbatches=m, schedule=schedule, virtual_stages=v, **pipe
        ),
    )


def test_cut_pass_records_stages_residual_and_tied_weight():
    model = skip_lm()
    engine = strato.compile(model, _strategy(), example_inputs=tokens(0, 8))
    record = engine.context.records["pipeline_cut"]
    assert len(engine.stages) == 2
    assert record["tied"] == {"tok_emb.weight": [0, 1]}
    # The embedding output reaches the head on the last stage: sent across the cut.
    sent = {r["node"] for r in record["stages"][1]["receives"]}
    assert len(sent) == 2, record["stages"][1]["receives"]
    modules = [s["modules"] for s in record["stages"]]
    assert "layers.0" in modules[0] and "layers.3" in modules[1]
    assert record["requires_train_step"]
    layouts, _ = engine.layout()
    assert layouts["layers.3.up.weight"].by == ("pipeline_cut",)
    with pytest.raises(strato.StratoError, match="train_step"):
        engine(*tokens(0, 8))
    grid = str(engine.schedule())
    assert "rank 1:" in grid


def test_cut_errors_name_the_module():
    with pytest.raises(strato.PassError) as info:
        strato.compile(skip_lm(layers=2), _strategy(stages=4), example_inputs=tokens(0, 8))
    assert "runs 2 (layers.0, layers.1)" in str(info.value)
    with pytest.raises(strato.PassError) as info:
        strato.compile(skip_lm(), _strategy(cuts=["layer.2"]), example_inputs=tokens(0, 8))
    assert "Did you mean 'layers.2'" in str(info.value)


def test_user_cut_is_where_the_stage_begins():
    engine = strato.compile(skip_lm(), _strategy(cuts=["layers.3"]), example_inputs=tokens(0, 8))
    stages = engine.context.records["pipeline_cut"]["stages"]
    assert stages[1]["modules"][0] == "layers.3"


def test_batch_not_divisible_names_both_sizes():
    engine = strato.compile(skip_lm(), _strategy(), example_inputs=tokens(0, 8))
    with pytest.raises(strato.StratoError) as info:
        engine.train_step(*tokens(0, 6))
    assert "6 rows" in str(info.value) and "Pipeline.microbatches=4" in str(info.value)


@pytest.mark.parametrize(
    "schedule, stages, v",
    [("gpipe", 2, 1), ("1f1b", 2, 1), ("zero_bubble", 2, 1), ("interleaved", 2, 2), ("1f1b", 4, 1)],
)
def test_single_process_pipeline_matches_eager(schedule, stages, v):
    steps, size = 3, 8
    want_losses, want_weights = eager_sgd(skip_lm(), steps, size)
    engine = strato.compile(
        skip_lm(), _strategy(schedule, stages, 4, v), example_inputs=tokens(0, size)
    )
    losses = [engine.train_step(*tokens(step, size)) for step in range(steps)]
    assert losses == pytest.approx(want_losses, abs=TOL)
    for name, p in engine.model.named_parameters():
        torch.testing.assert_close(p.detach(), want_weights[name], atol=TOL, rtol=0, msg=name)
    assert engine.stats()["tokens_per_s"] > 0
    timeline = engine.timeline()
    kinds = {e.kind for e in timeline.events}
    assert kinds == ({"F", "B", "W"} if schedule == "zero_bubble" else {"F", "B"})
    assert len(timeline.events) == 4 * v * stages * (3 if schedule == "zero_bubble" else 2)


def _stage_kept_bytes(engine, x, y) -> list[int]:
    """Bytes each stage's forward of one micro-batch leaves alive for its backward (every
    storage its ATen ops created, runtime/saved_tensors.kept_bytes), boundary tensors fed
    as leaves the way the executor feeds them."""
    received: dict[str, torch.Tensor] = {}
    out = []
    for stage in engine.pipeline.stages:
        boundary = [received[name] for _, name in stage.receives]
        kept = kept_bytes(lambda stage=stage, boundary=boundary: stage.gm(x, y, *boundary))
        out.append(kept.total)
        with torch.no_grad():
            values = stage.gm(x, y, *boundary)
        for (name, _), value in zip(stage.sends, values):
            received[name] = value.detach().requires_grad_(value.is_floating_point())
    return out


@pytest.mark.parametrize(
    "policy",
    # full in the slow set (11 s): selective exercises the same stage split and is in make test
    [pytest.param("full", marks=pytest.mark.slow), "selective"],
)
def test_recompute_runs_inside_each_stage(policy):
    """Strategy(recompute=..., pipeline=...): the recompute pass's regions (each layer, the
    loss tail) run in the stage they were cut into; losses and weights match eager, and
    the stages keep fewer bytes per micro-batch than without recompute (under 'full' every
    stage; under 'selective' in all, since on this tiny model the last stage's loss tail,
    which keeps its input gradients, the tied head weight's among them, outweighs what its
    one layer saves)."""
    steps, size = 2, 8
    want_losses, want_weights = eager_sgd(skip_lm(), steps, size)
    engine = strato.compile(
        skip_lm(), attrs.evolve(_strategy(), recompute=policy), example_inputs=tokens(0, size)
    )
    regions = [
        [n.target for n in gm.graph.nodes if "strato_recompute" in n.meta] for gm in engine.stages
    ]
    assert regions[0][0] == "recompute_layers_0" and regions[1][-1] == "recompute_tail"
    losses = [engine.train_step(*tokens(step, size)) for step in range(steps)]
    assert losses == pytest.approx(want_losses, abs=TOL)
    for name, p in engine.model.named_parameters():
        torch.testing.assert_close(p.detach(), want_weights[name], atol=TOL, rtol=0, msg=name)
    plain = strato.compile(skip_lm(), _strategy(), example_inputs=tokens(0, size))
    x, y = (t[:2] for t in tokens(0, size))  # one micro-batch
    with_recompute, without = _stage_kept_bytes(engine, x, y), _stage_kept_bytes(plain, x, y)
    assert sum(with_recompute) < sum(without), (with_recompute, without)
    assert with_recompute[0] < without[0], (with_recompute, without)
    if policy == "full":
        assert all(a < b for a, b in zip(with_recompute, without)), (with_recompute, without)


def test_eval_after_pipelined_steps_runs_the_whole_model():
    engine = strato.compile(skip_lm(), _strategy(), example_inputs=tokens(0, 8))
    engine.train_step(*tokens(0, 8))
    engine.eval()
    with torch.no_grad():
        loss = engine(*tokens(1, 8))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hugging_face_models_with_labels_match_eager(family):
    from tests.hf_models import example_kwargs, hf_batch, hf_model

    steps, size, length = 2, 4, 10  # not the example's batch or length
    reference = hf_model(family)
    optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    want = []
    for step in range(steps):
        loss = reference(**hf_batch(family, step, size, length)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        want.append(loss.item())
    engine = strato.compile(hf_model(family), _strategy(m=2), example_kwargs=example_kwargs(family))
    record = engine.context.records["pipeline_cut"]
    assert [s["modules"][0] for s in record["stages"]][1].endswith(".1")  # cut before layer 1
    got = [engine.train_step(**hf_batch(family, step, size, length)) for step in range(steps)]
    assert got == pytest.approx(want, abs=TOL)
    for name, p in engine.model.named_parameters():
        torch.testing.assert_close(
            p.detach(),
            dict(reference.named_parameters())[name].detach(),
            atol=TOL,
            rtol=0,
            msg=name,
        )


# ---------------------------------------------------------------------- split backward


def test_split_backward_equals_backward_and_w_skips_the_input_chain():
    """Zero-bubble's B + W (runtime/pipeline/split_backward.py) give backward's gradients,
    a weight used at two depths included, and W runs no node of the input-gradient chain
    above its joints (counted by hooks on the softmax the loss comes from)."""
    from strato.runtime.pipeline.split_backward import backward_inputs

    torch.manual_seed(0)
    shared = torch.nn.Linear(8, 8)
    head = torch.nn.Linear(8, 8)
    params = [*shared.parameters(), *head.parameters()]
    x = torch.randn(4, 8)
    grad = torch.randn(4, 8)

    def forward(inp):
        return head(shared(torch.tanh(shared(inp)))).softmax(-1)

    leaf = x.clone().requires_grad_()
    torch.autograd.backward([forward(leaf)], [grad])
    want = [p.grad.clone() for p in params]
    want_input = leaf.grad.clone()
    for p in params:
        p.grad = None
    leaf = x.clone().requires_grad_()
    out = forward(leaf)
    calls = []
    out.grad_fn.register_prehook(lambda g: calls.append(1))
    grads, weights = backward_inputs([out], [grad], [leaf], params)
    assert all(p.grad is None for p in params) and len(calls) == 1
    weights.run()
    assert len(calls) == 1  # W started below the softmax
    torch.testing.assert_close(grads[0], want_input)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w)
