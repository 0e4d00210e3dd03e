"""Training engine vs plain PyTorch: AdamW/SGD parity, accumulation, clipping, schedules, groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import strato
from strato.compiler.training_config import _use_fused
from tests.training_utils import (
    batch,
    eager_train,
    engine_train,
    max_weight_diff,
    reference_groups,
    tiny_gpt,
)

TOL = 1e-5


def compile_engine(model, **strategy):
    x, y = batch(0, 2)
    return strato.compile(model, strato.Strategy(**strategy), example_inputs=(x, y))


def test_fp32_adamw_parity_with_eager():
    """10 AdamW steps, fp32: losses and weights within 1e-5 of torch.optim.AdamW in eager.

    All parameters are compared, including the key part of qkv.bias whose true gradient is
    zero (softmax ignores it) so Adam turns its rounding noise into lr-sized steps: the fp32
    graph runs the same ATen ops as eager, so that noise is the same on both sides. If a pass
    ever reorders those ops, compare that slice separately rather than loosening TOL.
    The eager side uses torch's fused AdamW, the kernel Strato's AdamW picks on CPU."""
    model = tiny_gpt()
    reference = copy.deepcopy(model)
    engine = compile_engine(model, optimizer=strato.AdamW(lr=3e-3, weight_decay=0.1))
    losses = engine_train(engine, steps=10)
    ref_losses, _ = eager_train(
        reference,
        lambda m: torch.optim.AdamW(reference_groups(m, 0.1), lr=3e-3, fused=True),
        steps=10,
    )
    assert losses == pytest.approx(ref_losses, abs=TOL)
    assert losses[-1] < losses[0]
    assert max_weight_diff(model, reference) < TOL
    assert engine.stats()["step"] == 10


def test_optimizers_pick_the_fused_kernel_unless_told_otherwise():
    groups = lambda: [{"params": [torch.nn.Parameter(torch.zeros(3))], "weight_decay": 0.0}]  # noqa: E731
    assert strato.AdamW().build(groups()).defaults["fused"] is True
    assert strato.SGD().build(groups()).defaults["fused"] is True
    looped = strato.AdamW(foreach=True).build(groups()).defaults
    assert not looped["fused"] and looped["foreach"] is True
    assert not strato.AdamW(fused=False).build(groups()).defaults["fused"]
    ints = [{"params": [torch.zeros(3, dtype=torch.long)], "weight_decay": 0.0}]
    assert _use_fused(None, None, ints) is False


def test_grad_accumulation_4x2_equals_1x8():
    """SGD (weights compared exactly-ish without Adam's noise amplification)."""
    sgd = strato.SGD(lr=0.1, momentum=0.9, weight_decay=0.01)
    a, b = tiny_gpt(), tiny_gpt()
    accumulated = compile_engine(a, optimizer=sgd, grad_accumulation=4)
    single = compile_engine(b, optimizer=sgd)
    losses_a = engine_train(accumulated, steps=4, batch_size=8, accumulation=4)
    losses_b = engine_train(single, steps=4, batch_size=8)
    assert losses_a == pytest.approx(losses_b, abs=TOL)
    assert max_weight_diff(a, b) < TOL
    assert accumulated.stats()["step"] == 4


def test_clipping_equals_clip_grad_norm():
    model = tiny_gpt()
    reference = copy.deepcopy(model)
    engine = compile_engine(model, optimizer=strato.SGD(lr=0.5, momentum=0.0), grad_clip=0.1)
    norms = []
    for step in range(3):
        x, y = batch(step)
        engine.backward(engine(x, y))
        engine.step()
        norms.append(engine.stats()["grad_norm"])
    _, ref_norms = eager_train(
        reference, lambda m: torch.optim.SGD(m.parameters(), lr=0.5, fused=True), steps=3, clip=0.1
    )
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert min(norms) > 0.1  # clipping was active on every step
    assert max_weight_diff(model, reference) < TOL


def test_schedules_shape():
    cosine = strato.WarmupCosine(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert cosine.factor(0) == pytest.approx(0.1)
    assert cosine.factor(9) == pytest.approx(1.0)
    assert cosine.factor(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine.factor(110) == pytest.approx(0.1)
    assert cosine.factor(10_000) == pytest.approx(0.1)
    linear = strato.WarmupLinear(warmup_steps=0, total_steps=100)
    assert [linear.factor(s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    poly = strato.Polynomial(total_steps=100, power=2.0)
    assert poly.factor(50) == pytest.approx(0.25)
    assert strato.Constant(warmup_steps=4).factor(1) == pytest.approx(0.5)
    with pytest.raises(strato.StrategyError, match="WarmupCosine.total_steps"):
        strato.WarmupCosine(warmup_steps=10, total_steps=10)


def test_engine_lr_follows_schedule_and_reaches_optimizer():
    schedule = strato.WarmupLinear(warmup_steps=2, total_steps=6)
    engine = compile_engine(tiny_gpt(), optimizer=strato.AdamW(lr=1e-2), schedule=schedule)
    seen = []
    for step in range(4):
        expected = 1e-2 * schedule.factor(step)
        assert engine.lr == pytest.approx(expected)
        x, y = batch(step)
        engine.backward(engine(x, y))
        engine.step()
        seen.append(engine.manager.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-2 * schedule.factor(s) for s in range(4)])


def test_param_groups_exclude_norms_and_biases_and_layer_decay():
    from strato.runtime.optim import param_groups

    model = tiny_gpt()
    groups = param_groups(model, strato.AdamW(lr=1.0, weight_decay=0.1))
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "blocks.0.ln1.weight" in no_decay and "blocks.1.attn.qkv.bias" in no_decay
    assert "blocks.0.attn.qkv.weight" not in no_decay and "tok_emb.weight" not in no_decay

    groups = param_groups(model, strato.AdamW(lr=1.0, layer_decay=0.5, no_decay="*pos_emb*"))
    lr_of = {n: g["base_lr"] for g in groups for n in g["names"]}
    # 2 numbered layers: embeddings are layer 0, blocks.i layer i+1, ln_f layer 3 (full lr).
    assert lr_of["ln_f.weight"] == 1.0
    assert lr_of["blocks.1.attn.qkv.weight"] == 0.5
    assert lr_of["blocks.0.attn.qkv.weight"] == 0.25
    assert lr_of["tok_emb.weight"] == 0.125
    assert "pos_emb.weight" in {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}


def test_engine_keeps_inspection_and_counts_optimizer_state():
    engine = compile_engine(tiny_gpt(), optimizer=strato.AdamW())
    assert isinstance(engine, strato.CompiledModel)
    assert engine.history and "aten.linear" in engine.print_graph()
    explanation = engine.explain()
    params = sum(p.numel() for p in engine.model.parameters())
    assert explanation.optimizer_state_bytes >= 2 * 4 * params
    stats = engine.stats()
    assert stats["step"] == 0 and math.isnan(stats["loss"])
    assert stats["model_state_bytes"] == 2 * 4 * params  # params + grads, no Adam state yet


def test_misuse_gives_clear_errors():
    engine = compile_engine(tiny_gpt(), optimizer=strato.SGD())
    x, y = batch(0)
    with pytest.raises(RuntimeError, match="needs an engine.backward"):
        engine.step()
    loss = engine(x, y)
    with pytest.raises(ValueError, match="scalar loss"):
        engine.backward(loss.expand(3))
    engine.backward(loss)
    with pytest.raises(RuntimeError, match="twice without engine.step"):
        engine.backward(engine(x, y))
    with pytest.raises(strato.StrategyError, match="Strategy.grad_accumulation"):
        strato.Strategy(grad_accumulation=0)
    with pytest.raises(strato.StrategyError, match="Strategy.grad_clip"):
        strato.Strategy(grad_clip=-1.0)
    with pytest.raises(strato.StrategyError, match="AdamW.lr"):
        strato.AdamW(lr=0)


def test_training_strategy_yaml_round_trip():
    strategy = strato.Strategy(
        optimizer=strato.AdamW(lr=3e-4, weight_decay=0.1, no_decay=["*pos_emb*"]),
        schedule=strato.WarmupCosine(warmup_steps=100, total_steps=10_000),
        precision="bf16",
        grad_accumulation=4,
        grad_clip=1.0,
    )
    assert strato.Strategy.from_yaml(strategy.to_yaml()) == strategy
    text = "optimizer: {kind: SGD, lr: 0.1}\nschedule: {kind: Polynomial, total_steps: 50}\n"
    loaded = strato.Strategy.from_yaml(text)
    assert loaded.optimizer == strato.SGD(lr=0.1)
    assert loaded.schedule == strato.Polynomial(total_steps=50)
