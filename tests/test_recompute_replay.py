"""Recompute regions replayed from their graph (runtime/region_replay.py): selective and full
run no dispatch mode and no torch.utils.checkpoint, gradients equal eager's with dropout and
fused attention; regions the replay cannot take fall back with the reason in explain(); the
budget's plan is the cheapest candidate by the cost model among those that fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_parity
from test_recompute import VOCAB, compile_train, gpt_with_targets, measured_kept_bytes

import strato
from strato.runtime import saved_tensors


def regions(compiled) -> list:
    return [
        compiled.graph.get_submodule(n.target)
        for n in compiled.graph.graph.nodes
        if "strato_recompute" in n.meta
    ]


def refuse(*_, **__):
    raise AssertionError("torch.utils.checkpoint ran: the region was not replayed from its graph")


@pytest.mark.parametrize(
    "policy",
    # full's gradients are also in test_recompute's fast set: this one only adds the patch
    ["selective", pytest.param("full", marks=pytest.mark.slow)],
)
def test_regions_replay_their_graph_without_checkpoint(policy, monkeypatch):
    """With torch's checkpoint and selective-checkpoint contexts made to fail, a GPT with
    dropout still trains under both policies, and its gradients equal eager's (the replay
    restores the RNG state, so dropout draws the same masks)."""
    monkeypatch.setattr(saved_tensors, "checkpoint", refuse)
    monkeypatch.setattr(saved_tensors, "create_selective_checkpoint_contexts", refuse)
    model, args, kwargs = gpt_with_targets()
    compiled = compile_train(model, args, kwargs, policy)
    assert [r.replay_note() for r in regions(compiled)] == ["replayed from its graph"] * 3
    assert_parity(model, compiled, args, kwargs, atol=1e-6, reduce=lambda loss: loss)


class AttentionBlock(torch.nn.Module):
    """A pre-norm block around F.scaled_dot_product_attention with a boolean causal mask."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d, bias=False)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.drop(self.out(y.transpose(1, 2).reshape(b, t, d)))


class AttentionModel(torch.nn.Module):
    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, d)
        self.layers = torch.nn.ModuleList(AttentionBlock(d, heads) for _ in range(layers))
        self.head = torch.nn.Linear(d, VOCAB)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def test_selective_keeps_fused_attention_and_replays_it(monkeypatch):
    """Selective keeps SDPA's output and log-sum-exp (the CPU flash kernel) and replays the
    rest: gradients equal eager's, and it keeps fewer bytes than none, more than full."""
    monkeypatch.setattr(saved_tensors, "create_selective_checkpoint_contexts", refuse)
    torch.manual_seed(0)
    model = AttentionModel()
    idx = torch.randint(0, VOCAB, (3, 10))
    args = (idx, torch.randint(0, VOCAB, idx.shape))
    kept = {}
    for policy in ("none", "selective", "full"):
        compiled = compile_train(model, args, {}, policy)
        kept[policy] = measured_kept_bytes(compiled, args, {})
        if policy == "selective":
            notes = [r.replay_note() for r in regions(compiled)]
            assert notes == ["replayed from its graph"] * 3, notes
            assert_parity(model, compiled, args, {}, atol=1e-6, reduce=lambda loss: loss)
    assert kept["full"] < kept["selective"] < kept["none"], kept


class ConvModel(torch.nn.Module):
    """Numbered conv layers: a kept op without a replay formula."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv1d(8, 8, 3, padding=1), torch.nn.GELU())
            for _ in range(2)
        )

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x.pow(2).mean()


def test_region_without_a_replay_formula_falls_back_with_the_reason():
    torch.manual_seed(0)
    model = ConvModel()
    args = (torch.randn(2, 8, 16),)
    compiled = compile_train(
        model, args, {}, strato.Recompute(modules=["layers.*"], policy="selective")
    )
    notes = [r.replay_note() for r in regions(compiled)]
    assert all(n.startswith("torch.utils.checkpoint (") and "no replay formula" in n for n in notes)
    assert "no replay formula" in str(compiled.explain())
    assert_parity(model, compiled, args, {}, atol=1e-6, reduce=lambda loss: loss)


@pytest.mark.slow  # a fake-tensor measurement per policy and per tried plan: ~30 s on 2 cores
def test_budget_plan_is_the_cheapest_candidate_that_fits():
    """The solver ranks the uniform plans and the mixes by estimated recompute time and takes
    the first whose measured bytes fit: no uniform plan that fits is cheaper by its model,
    and the plan's real bytes fit the budget."""
    model, args, kwargs = gpt_with_targets(layers=3)
    none = measured_kept_bytes(compile_train(model, args, kwargs, "none"), args, kwargs)
    full = measured_kept_bytes(compile_train(model, args, kwargs, "full"), args, kwargs)
    for fraction in (0.2, 0.6):
        limit = int(full + fraction * (none - full))
        compiled = compile_train(model, args, kwargs, strato.Budget(limit))
        record = compiled._graphs[True].ctx.records["recompute"]
        ranked = record["candidates"]
        assert [c["seconds"] for c in ranked] == sorted(c["seconds"] for c in ranked)
        chosen = next(c for c in ranked if c["plan"] in record["reason"].split(" is ")[-1])
        totals = record["kept_bytes_by_policy"]
        for policy, kept in totals.items():
            uniform = next(c for c in ranked if c["plan"] == f"all {policy}")
            if kept <= limit:
                assert chosen["seconds"] <= uniform["seconds"], (fraction, chosen, uniform)
        assert measured_kept_bytes(compiled, args, kwargs) <= limit
        assert "candidate plans" in str(compiled.explain())
