"""The mixed-precision pass: casts visible in the graph, fp32 untouched, bf16 trains like
fp32, fp16 loss scaling skips overflowing steps."""

from __future__ import annotations

import copy

import pytest
import torch

import strato
from tests.training_utils import batch, engine_train, tiny_gpt

aten = torch.ops.aten


def compile_with(model, **strategy):
    x, y = batch(0, 2)
    strategy = {"optimizer": strato.AdamW(lr=3e-3), **strategy}
    return strato.compile(model, strato.Strategy(**strategy), example_inputs=(x, y))


def test_fp32_is_exactly_eager():
    """No mixed-precision pass at fp32: loss and gradients bit-equal to eager."""
    model = tiny_gpt()
    reference = copy.deepcopy(model)
    engine = compile_with(model)
    assert "mixed_precision" not in [r.name for r in engine.history]
    x, y = batch(1)
    loss, ref_loss = engine(x, y), reference(x, y)
    assert torch.equal(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, ref_params[name].grad), name


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_casts_are_graph_nodes_and_master_weights_stay_fp32(precision, dtype):
    model = tiny_gpt()
    engine = compile_with(model, precision=precision)
    gm = engine.graph
    record = engine.context.records["mixed_precision"]
    assert record["dtype"] == precision and record["loss_scaling"] == (precision == "fp16")
    by_target: dict = {}
    for node in gm.graph.nodes:
        by_target.setdefault(node.target, []).append(node)
    casts = [
        n
        for n in by_target[aten._to_copy.default]
        if n.meta.get("strato_created_by") == "mixed_precision"
    ]
    assert len(casts) == record["casts"] > 0
    for node in by_target[aten.linear.default] + by_target[aten.matmul.default]:
        assert node.meta["val"].dtype == dtype, node.name
    for target in (aten.layer_norm.default, aten.softmax.int, aten.cross_entropy_loss.default):
        for node in by_target[target]:
            assert node.meta["val"].dtype == torch.float32, node.name
    printed = engine.print_graph()  # the casts and low-precision outputs are printed
    assert ("bf16[" in printed) == (precision == "bf16") and "f16[" in printed
    x, y = batch(1)
    loss = engine(x, y)
    assert loss.dtype == torch.float32
    engine.backward(loss)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_trains_within_margin_of_fp32():
    """40 AdamW steps on the tiny GPT: bf16's loss ends within 0.05 of fp32's (both fall
    by more than 1.0 from ~4.2); bf16 rounding is ~3 significant digits, so 0.05 on a
    loss of ~2.5 is a few ulps of accumulated drift, not a different optimum."""
    steps = 40
    fp32 = engine_train(compile_with(tiny_gpt()), steps=steps)
    bf16 = engine_train(compile_with(tiny_gpt(), precision="bf16"), steps=steps)
    assert fp32[0] - fp32[-1] > 1.0 and bf16[0] - bf16[-1] > 1.0
    assert abs(sum(bf16[-5:]) / 5 - sum(fp32[-5:]) / 5) < 0.05


def _inject_inf(param: torch.nn.Parameter):
    """A gradient hook that turns one element of `param`'s gradient into inf, once."""

    def hook(grad):
        handle.remove()
        grad = grad.clone()
        grad.view(-1)[0] = float("inf")
        return grad

    handle = param.register_hook(hook)


def test_fp16_overflow_skips_step_halves_scale_keeps_weights():
    model = tiny_gpt()
    engine = compile_with(model, precision="fp16")
    engine_train(engine, steps=1)  # a normal step: Adam state exists
    scale = engine.stats()["loss_scale"]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in engine.manager.optimizer.state[model.tok_emb.weight].items()}
    _inject_inf(model.blocks[0].mlp[0].weight)
    x, y = batch(1)
    engine.backward(engine(x, y))
    assert engine.step() is True
    stats = engine.stats()
    assert stats["skipped_steps"] == 1 and stats["step"] == 2
    assert stats["loss_scale"] == scale / 2
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
        assert p.grad is None
    after = engine.manager.optimizer.state[model.tok_emb.weight]
    assert all(torch.equal(after[k], v) for k, v in state.items())
    engine_train(engine, steps=1, start=2)  # and training goes on
    assert engine.stats()["skipped_steps"] == 1
    assert not torch.equal(model.tok_emb.weight.detach(), weights["tok_emb.weight"])


def test_fp16_scale_grows_and_hysteresis_delays_backoff():
    scaling = strato.LossScaling(initial_scale=1024.0, growth_interval=2, hysteresis=2)
    model = tiny_gpt()
    engine = compile_with(model, precision="fp16", loss_scaling=scaling)
    engine_train(engine, steps=2)
    assert engine.stats()["loss_scale"] == 2048.0
    for expected in (2048.0, 1024.0):  # first overflow tolerated, second backs off
        _inject_inf(model.lm_head.weight)
        x, y = batch(5)
        engine.backward(engine(x, y))
        engine.step()
        assert engine.stats()["loss_scale"] == expected
    assert engine.stats()["skipped_steps"] == 2


def test_fp16_gradients_are_scaled_until_the_step():
    """After backward the gradients are loss_scale x the true gradient (fp16-rounded);
    the update uses the unscaled gradient."""
    model = tiny_gpt()
    reference = copy.deepcopy(model)
    engine = compile_with(model, precision="fp16", optimizer=strato.SGD(lr=0.1, momentum=0.0))
    x, y = batch(0)
    engine.backward(engine(x, y))
    reference(x, y).backward()
    scale = engine.stats()["loss_scale"]
    grad, ref = model.ln_f.bias.grad, reference.ln_f.bias.grad
    assert torch.allclose(grad / scale, ref, rtol=2e-2, atol=1e-4)
    before = model.ln_f.bias.detach().clone()
    engine.step()
    update = (before - model.ln_f.bias.detach()) / 0.1
    assert torch.allclose(update, ref, rtol=2e-2, atol=1e-4)
