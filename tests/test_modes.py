"""train()/eval() switch graphs: dropout and batch norm behave (and update buffers) as in eager."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import strato


def _model():
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3))


def test_train_mode_matches_eager_including_running_stats_and_dropout_mask():
    eager = _model().train()
    model = copy.deepcopy(eager)
    x = torch.randn(8, 6)
    compiled = strato.compile(model, example_inputs=(x,))
    for step in range(3):
        xb = torch.randn(8, 6)
        torch.manual_seed(step)
        ref = eager(xb)
        torch.manual_seed(step)
        out = compiled(xb)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    bn, ref_bn = model[1], eager[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, atol=1e-6, rtol=0)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 3


def test_eval_mode_uses_running_stats_and_no_dropout():
    model = _model()
    x = torch.randn(8, 6)
    compiled = strato.compile(model, example_inputs=(x,))
    compiled(torch.randn(8, 6) * 3 + 1)  # one training step moves the running statistics
    stats_before = model[1].running_mean.clone()
    compiled.eval()
    assert not model.training and not model[1].training
    out1, out2 = compiled(x), compiled(x)
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)  # no dropout
    torch.testing.assert_close(out1, model(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(model[1].running_mean, stats_before, atol=0, rtol=0)
    # Back to training: dropout again, and the graph is the train one.
    compiled.train()
    assert any(n.target is torch.ops.aten.dropout.default for n in compiled.graph.graph.nodes)
    assert not torch.equal(compiled(x), compiled(x))


def test_model_compiled_in_eval_mode_starts_in_eval():
    model = _model().eval()
    x = torch.randn(4, 6)
    compiled = strato.compile(model, example_inputs=(x,))
    assert not compiled.training
    torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=0)
