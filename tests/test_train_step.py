"""engine.train_step: equal to the three-call loop and to eager PyTorch, with micro-batches
split from a batch or handed in as a list or iterator; Hugging Face models with labels;
loss_fn for models returning logits; strategies whose passes require it; bad input.

The three-call loop runs the same ops on the same micro-batches, so train_step must match
it exactly (losses and weights bitwise, AdamW included). Against eager, SGD (no Adam
amplification of rounding noise in zero gradients) within 1e-5."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import strato
from tests.hf_models import example_kwargs, hf_batch, hf_model
from tests.training_utils import batch, eager_train, max_weight_diff, tiny_gpt

TOL = 1e-5
STEPS = 2


def engine_for(model, example=None, **strategy):
    x, y = example if example is not None else batch(0, 2)
    strategy.setdefault("optimizer", strato.AdamW(lr=3e-3, weight_decay=0.1))
    return strato.compile(model, strato.Strategy(**strategy), example_inputs=(x, y))


def weights(engine) -> dict[str, torch.Tensor]:
    engine.synchronize()
    if hasattr(engine.manager, "full_parameters"):  # ZeRO: parameters may hold shards
        return {n: t.clone() for n, t in engine.manager.full_parameters().items()}
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


@pytest.mark.parametrize(
    ("accumulation", "zero"),
    # (4, 3) in the slow set (9 s): (4, 2) keeps accumulation over ZeRO in make test
    [(1, 0), (4, 2), pytest.param(4, 3, marks=pytest.mark.slow)],
)
def test_train_step_equals_the_three_call_loop(accumulation, zero):
    looped = engine_for(tiny_gpt(0), grad_accumulation=accumulation, zero=zero)
    stepped = engine_for(tiny_gpt(0), grad_accumulation=accumulation, zero=zero)
    micro = 8 // accumulation
    for step in range(STEPS):
        x, y = batch(step, 8)
        for k in range(accumulation):
            sl = slice(k * micro, (k + 1) * micro)
            looped.backward(looped(x[sl], y[sl]))
            looped.step()
        loss = stepped.train_step(x, y)
        assert isinstance(loss, float)
        assert loss == looped.stats()["loss"] == stepped.stats()["loss"]
    a, b = weights(looped), weights(stepped)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert stepped.stats()["step"] == STEPS and stepped.stats()["micro_step"] == 0


def test_train_step_equals_eager_on_the_whole_batch():
    """grad_accumulation=4 on a batch of 8 == eager SGD on the batch of 8, one step each."""
    model = tiny_gpt(0)
    reference = copy.deepcopy(model)
    sgd = strato.SGD(lr=0.1, momentum=0.9)
    engine = engine_for(model, optimizer=sgd, grad_accumulation=4)
    losses = [engine.train_step(*batch(step, 8)) for step in range(STEPS)]
    ref_losses, _ = eager_train(
        reference,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        steps=STEPS,
        accumulation=4,
    )
    assert losses == pytest.approx(ref_losses, abs=TOL)
    assert max_weight_diff(model, reference) < TOL


def test_micro_batches_as_list_or_iterator_equal_the_split_batch():
    split, given = (engine_for(tiny_gpt(0), grad_accumulation=2) for _ in range(2))
    x, y = batch(0, 8)
    assert split.train_step(x, y) == given.train_step([(x[:4], y[:4]), (x[4:], y[4:])])
    x, y = batch(1, 8)
    stream = iter([(x[:4], y[:4]), (x[4:], y[4:]), (x[:2], y[:2])])
    assert split.train_step(x, y) == given.train_step(stream)
    assert next(stream)[0].shape[0] == 2  # only grad_accumulation micro-batches were taken
    a, b = weights(split), weights(given)
    assert all(torch.equal(a[n], b[n]) for n in a)


def _hf_strategy(**changes):
    return strato.Strategy(optimizer=strato.SGD(lr=0.1, momentum=0.0), **changes)


def test_hugging_face_llama_with_labels_equals_eager():
    """fp32 tiny Llama (GQA) returning a ModelOutput with .loss, as keyword inputs."""
    model = hf_model("llama")
    reference = copy.deepcopy(model)
    engine = strato.compile(
        model, _hf_strategy(grad_accumulation=3), example_kwargs=example_kwargs("llama", size=2)
    )
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)  # no momentum, as _hf_strategy
    for step in range(2):
        inputs = hf_batch("llama", step, 6, 12)
        loss = engine.train_step(**inputs, use_cache=False)
        ref = 0.0
        for k in range(3):
            part = {n: t[2 * k : 2 * k + 2] for n, t in inputs.items()}
            ref_loss = reference(**part, use_cache=False).loss
            (ref_loss / 3).backward()
            ref += ref_loss.item() / 3
        optimizer.step()
        optimizer.zero_grad()
        assert loss == pytest.approx(ref, abs=TOL)
    assert max_weight_diff(model, reference) < TOL


def test_hugging_face_gpt2_bf16_equals_the_three_call_loop():
    example = example_kwargs("gpt2", size=2, length=10)
    engines = [
        strato.compile(
            hf_model("gpt2"),
            _hf_strategy(precision="bf16", grad_accumulation=2),
            example_kwargs=example,
        )
        for _ in range(2)
    ]
    looped, stepped = engines
    for step in range(2):
        inputs = hf_batch("gpt2", step, 4, 10)
        for k in range(2):
            part = {n: t[2 * k : 2 * k + 2] for n, t in inputs.items()}
            looped.backward(looped(**part, use_cache=False).loss)
            looped.step()
        assert stepped.train_step(**inputs, use_cache=False) == looped.stats()["loss"]
    a, b = weights(looped), weights(stepped)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_loss_fn_for_a_model_returning_logits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    reference = copy.deepcopy(model)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    engine = strato.compile(
        model,
        strato.Strategy(optimizer=strato.SGD(lr=0.5, momentum=0.0), grad_accumulation=3),
        example_inputs=(x[:2],),
    )
    loss = engine.train_step(x, loss_fn=F.cross_entropy, target=y)
    ref_loss = F.cross_entropy(reference(x), y)
    ref_loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    assert loss == pytest.approx(ref_loss.item(), abs=TOL)
    assert max_weight_diff(model, reference) < TOL
    # With a list of micro-batches (a tensor, a tuple, a dict of keyword inputs), `target`
    # is a list of as many.
    parts = [x[0:2], (x[2:4],), {"input": x[4:6]}]
    targets = [y[0:2], y[2:4], y[4:6]]
    # A micro-batch whose forward fails drops the step: nothing accumulated is kept.
    wrong = [x[0:2], x[2:4], torch.randn(2, 5)]
    with pytest.raises(strato.StratoError):
        engine.train_step(wrong, loss_fn=F.cross_entropy, target=targets)
    assert engine.stats()["micro_step"] == 0
    assert all(p.grad is None for p in model.parameters())
    loss = engine.train_step(parts, loss_fn=F.cross_entropy, target=targets)
    reference.zero_grad()
    ref_loss = F.cross_entropy(reference(x), y)
    ref_loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    assert loss == pytest.approx(ref_loss.item(), abs=TOL)
    assert max_weight_diff(model, reference) < TOL


def _records_requires_train_step():
    @strato.graph_pass(name="fake_pipeline")
    def fake_pipeline(gm, ctx):
        if ctx.training:
            ctx.record("fake_pipeline", requires_train_step=True)
        return gm

    return fake_pipeline


def test_a_pass_can_require_train_step():
    """A pass records requires_train_step (as the pipeline pass will): the three-call loop
    is refused with a StratoError naming the pass, train_step works, eval forward works."""
    strategy = dict(passes=[_records_requires_train_step()], optimizer=strato.SGD(lr=0.1))
    engine = engine_for(tiny_gpt(0), **strategy)
    plain = engine_for(tiny_gpt(0), optimizer=strato.SGD(lr=0.1))
    x, y = batch(0, 4)
    assert engine.step_owners == ["fake_pipeline"] and plain.step_owners == []
    with pytest.raises(
        strato.StratoError, match=r"engine\(\.\.\.\): pass 'fake_pipeline'.*train_step"
    ):
        engine(x, y)
    with pytest.raises(strato.StratoError, match="engine.backward.*call engine.train_step"):
        engine.backward(plain(x, y))
    with pytest.raises(strato.StratoError, match="engine.step.*call engine.train_step"):
        engine.step()
    assert engine.train_step(x, y) == plain.train_step(x, y)
    engine.eval()
    assert engine(x, y).numel() == 1  # eval graphs are not the step's


def test_bad_input_is_named_and_changes_nothing():
    engine = engine_for(tiny_gpt(0), grad_accumulation=4)
    before = weights(engine)
    x, y = batch(0, 6)
    with pytest.raises(strato.StratoError, match=r"argument 0 has 6 rows .*grad_accumulation=4"):
        engine.train_step(x, y)
    x, y = batch(0, 8)
    with pytest.raises(strato.StratoError, match=r"targets= has 6 rows"):
        engine.train_step(x, targets=y[:6])
    with pytest.raises(
        strato.StratoError, match="got 2 micro-batches for Strategy.grad_accumulation=4"
    ):
        engine.train_step([(x, y), (x, y)])
    with pytest.raises(
        strato.StratoError, match="iterator of micro-batches ran out after 1 of the 4"
    ):
        engine.train_step(iter([(x, y)]))
    with pytest.raises(strato.StratoError, match="micro-batch 1 is a str"):
        engine.train_step([(x, y), "oops", (x, y), (x, y)])
    assert engine.stats()["micro_step"] == 0 and engine.stats()["step"] == 0
    after = weights(engine)
    assert all(torch.equal(before[n], after[n]) for n in before)

    engine.eval()
    with pytest.raises(strato.StratoError, match=r"training mode; call engine.train\(\)"):
        engine.train_step(x, y)
    engine.train()
    engine.backward(engine(x[:2], y[:2]))
    engine.step()  # 1 of 4 micro-steps of the three-call loop
    with pytest.raises(strato.StratoError, match="1 of 4 micro-steps of the three-call loop"):
        engine.train_step(x, y)


def test_output_without_a_loss_says_how_to_get_one():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return {"logits": self.lin(x)}

    x = torch.randn(4, 4)
    sgd = strato.Strategy(optimizer=strato.SGD())
    engine = strato.compile(DictOut(), sgd, example_inputs=(x,))
    with pytest.raises(strato.StratoError, match="returned dict with no loss.*labels=.*loss_fn"):
        engine.train_step(x)
    engine = strato.compile(nn.Linear(4, 2), sgd, example_inputs=(x,))
    with pytest.raises(strato.StratoError, match=r"model returned \(4, 2\), not a scalar loss"):
        engine.train_step(x)
    with pytest.raises(strato.StratoError, match=r"loss_fn returned \(4,\), not a scalar"):
        engine.train_step(x, loss_fn=lambda out, y: (out - y).sum(-1), target=torch.zeros(4, 2))


def test_launch_entries_name_the_strategy_field_or_parameter_that_differs():
    """What the ranks-agree digest covers after the collectives (compared across ranks in
    tests/test_train_step_multirank.py): each nested strategy field, each parameter."""
    from strato.runtime.collective_schedule import first_difference, launch_entries

    def entries(model, lr=3e-3):
        return launch_entries(model, strato.Strategy(optimizer=strato.AdamW(lr=lr)))

    base = entries(tiny_gpt(0))
    text = first_difference(base, entries(tiny_gpt(0), lr=0.5))
    assert "Strategy.optimizer.lr = 0.003 here vs Strategy.optimizer.lr = 0.5 there" in text
    text = first_difference(base, entries(tiny_gpt(0, n_layers=3)))
    assert "parameter ln_f.weight [32] float32 here vs parameter blocks.2.ln1.weight" in text
    assert first_difference(base, entries(tiny_gpt(1))) == "schedules are equal"
