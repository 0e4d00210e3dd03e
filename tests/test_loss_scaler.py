"""fp16 dynamic loss scaling follows DeepSpeed's DynamicLossScaler, hysteresis included.

Oracle: DeepSpeed's update rule, restated below in its own terms (cur_iter,
last_overflow_iter, cur_hysteresis, delayed_shift). One difference is on purpose and
outside hysteresis: the scale grows after `growth_interval` finite steps, as
torch.amp.GradScaler and DeepSpeed before 0.16 count them (DeepSpeed's newer rule first
grows one step later)."""

from __future__ import annotations

import random

import pytest

import strato
from strato.runtime.loss_scaler import DynamicLossScaler
from tests.test_precision import _inject_inf, compile_with
from tests.training_utils import batch, engine_train, tiny_gpt


def deepspeed_scales(overflows, window, delayed_shift, consecutive, scale=1024.0, min_scale=1.0):
    """The scale after each step under DeepSpeed's DynamicLossScaler.update_scale."""
    cur_iter, last_overflow_iter, cur_hysteresis, scales = 0, -1, delayed_shift, []
    for overflow in overflows:
        if overflow:
            if delayed_shift == 1 or cur_hysteresis == 1:
                scale = max(scale / 2, min_scale)
            else:
                cur_hysteresis -= 1
            last_overflow_iter = cur_iter
        else:
            if consecutive:
                cur_hysteresis = delayed_shift
            if (cur_iter - last_overflow_iter) % window == 0:
                if not consecutive:
                    cur_hysteresis = delayed_shift
                scale *= 2
        cur_iter += 1
        scales.append(scale)
    return scales


def strato_scales(overflows, config: strato.LossScaling) -> list[float]:
    scaler = DynamicLossScaler(config)
    scales = []
    for overflow in overflows:
        scaler.update(overflow)
        scales.append(scaler.scale)
    return scales


@pytest.mark.parametrize("consecutive", [False, True])
@pytest.mark.parametrize("hysteresis", [1, 2, 3])
def test_scale_follows_deepspeed_on_random_overflow_patterns(hysteresis, consecutive):
    config = strato.LossScaling(
        initial_scale=1024.0,
        growth_interval=4,
        hysteresis=hysteresis,
        consecutive_hysteresis=consecutive,
    )
    rng = random.Random(hysteresis * 10 + consecutive)
    for _ in range(50):
        overflows = [rng.random() < 0.3 for _ in range(60)]
        want = deepspeed_scales(overflows, 4, hysteresis, consecutive)
        assert strato_scales(overflows, config) == want, overflows


def test_hysteresis_refills_at_growth_or_with_consecutive_hysteresis_at_every_finite_step():
    """hysteresis 2: overflow, finite, overflow. DeepSpeed's default counts both overflows
    (the second backs off, and so does a third: the count refills only when the scale
    grows); consecutive_hysteresis forgets the first at the finite step."""
    pattern = [True, False, True, True]
    counting = strato.LossScaling(initial_scale=1024.0, growth_interval=3, hysteresis=2)
    assert strato_scales(pattern, counting) == [1024.0, 1024.0, 512.0, 256.0]
    assert strato_scales(pattern + [False] * 3 + [True], counting)[-1] == 512.0  # refilled
    consecutive = strato.LossScaling(
        initial_scale=1024.0, growth_interval=3, hysteresis=2, consecutive_hysteresis=True
    )
    assert strato_scales(pattern, consecutive) == [1024.0, 1024.0, 1024.0, 512.0]


def test_consecutive_hysteresis_comes_from_deepspeed_and_reaches_the_fp16_engine():
    fp16 = {"enabled": True, "initial_scale_power": 10, "hysteresis": 2}
    for consecutive, after in ((False, 512.0), (True, 1024.0)):
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "fp16": {**fp16, "consecutive_hysteresis": consecutive},
        }
        strategy, _ = strato.convert_deepspeed(config, world_size=1)
        assert strategy.loss_scaling.consecutive_hysteresis is consecutive
        model = tiny_gpt()
        engine = compile_with(model, precision="fp16", loss_scaling=strategy.loss_scaling)
        for step, overflow in enumerate([True, False, True]):
            if overflow:
                _inject_inf(model.lm_head.weight)
            x, y = batch(step, 2)
            engine.backward(engine(x, y))
            engine.step()
        assert engine.stats()["loss_scale"] == after, consecutive
        assert engine.stats()["skipped_steps"] == 2
        engine_train(engine, steps=1, batch_size=2, start=3)  # training goes on


def test_consecutive_hysteresis_must_be_a_bool():
    with pytest.raises(strato.StrategyError, match="LossScaling.consecutive_hysteresis"):
        strato.LossScaling(consecutive_hysteresis="yes")
