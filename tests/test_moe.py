"""strato.nn.MoE on one process: routing formulas (DeepSpeed's top-1/top-2), capacity and
dropped tokens by hand, skewed routing with and without dropping, the auxiliary losses'
gradients, grouped GEMM = per-expert loop, bad input, and the layer compiled for training.

The oracle is an independent per-token loop over the same weights (fp32, 1e-5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import strato
from strato.runtime import moe
from tests.moe_worker import moe_gpt, tiny_batch

TOL = 1e-5


def layer(**kw) -> strato.nn.MoE:
    torch.manual_seed(0)
    settings = dict(d_model=8, d_ff=16, num_experts=4, top_k=2, min_capacity=0)
    return strato.nn.MoE(**{**settings, **kw})


def per_token_reference(m: strato.nn.MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token through each kept choice's expert, one at a time (no sorting, no GEMM
    grouping): what the layer must compute."""
    tokens = x.reshape(-1, m.d_model)
    routing = m.route(tokens)
    out = torch.zeros_like(tokens)
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
    for t in range(tokens.shape[0]):
        for j in range(m.top_k):
            if not routing.kept[t, j]:
                continue
            e = int(routing.experts[t, j])
            h = tokens[t] @ m.w_in[e]
            if m.activation == "swiglu":
                gate, up = h.chunk(2)
                h = F.silu(gate) * up
            else:
                h = act[m.activation](h)
            out[t] = out[t] + routing.weights[t, j] * (h @ m.w_out[e])
    return out.reshape(x.shape)


def deepspeed_top2(logits: torch.Tensor, capacity: int):
    """DeepSpeed's top2gating written out (sharded_moe.py): masks, cumsum locations (second
    choices after every first choice), capacity mask, renormalised gates, l_aux."""
    gates = logits.softmax(dim=1)
    num_experts = gates.shape[1]
    mask1 = F.one_hot(gates.argmax(dim=1), num_experts)
    mask2 = F.one_hot(logits.masked_fill(mask1.bool(), float("-inf")).argmax(dim=1), num_experts)
    loc1 = torch.cumsum(mask1, dim=0) - 1
    loc2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
    l_aux = torch.mean(gates.mean(dim=0) * mask1.float().mean(dim=0)) * num_experts * num_experts
    mask1 = mask1 * (loc1 < capacity)
    mask2 = mask2 * (loc2 < capacity)
    g1, g2 = (gates * mask1).sum(dim=1), (gates * mask2).sum(dim=1)
    denom = (g1 + g2).clamp(min=torch.finfo(gates.dtype).eps)
    return mask1, mask2, g1 / denom, g2 / denom, l_aux


def test_top2_routing_is_deepspeeds():
    torch.manual_seed(1)
    logits = torch.randn(16, 4)
    capacity = moe.expert_capacity(16, 4, 2, 0.5, 0)  # tight: ceil(2*16*0.5/4) = 4
    assert capacity == 4
    routing = moe.route(logits, 2, capacity)
    mask1, mask2, g1, g2, l_aux = deepspeed_top2(logits, capacity)
    assert torch.equal(routing.kept[:, 0], mask1.sum(1).bool())
    assert torch.equal(routing.kept[:, 1], mask2.sum(1).bool())
    torch.testing.assert_close(routing.weights[:, 0], g1, atol=TOL, rtol=0)
    torch.testing.assert_close(routing.weights[:, 1], g2, atol=TOL, rtol=0)
    torch.testing.assert_close(routing.aux_loss, l_aux, atol=TOL, rtol=0)
    assert not routing.kept.all()  # the capacity bit


def test_top1_routing_is_deepspeeds():
    torch.manual_seed(2)
    logits = torch.randn(10, 5)
    capacity = moe.expert_capacity(10, 5, 1, 1.0, 1)  # ceil(10/5) = 2
    routing = moe.route(logits, 1, capacity)
    gates = logits.softmax(dim=1)
    mask1 = F.one_hot(gates.argmax(dim=1), 5)
    l_aux = torch.sum(gates.mean(dim=0) * mask1.float().mean(dim=0)) * 5
    mask1 = mask1 * (torch.cumsum(mask1, dim=0) - 1 < capacity)
    torch.testing.assert_close(routing.weights[:, 0], (gates * mask1).sum(dim=1), atol=TOL, rtol=0)
    torch.testing.assert_close(routing.aux_loss, l_aux, atol=TOL, rtol=0)
    z = torch.logsumexp(logits, dim=1).pow(2).mean()
    torch.testing.assert_close(routing.z_loss, z, atol=TOL, rtol=0)


def test_capacity_formula():
    # DeepSpeed: ceil(tokens / experts * factor) (top-2: factor x 2), at least min_capacity.
    assert moe.expert_capacity(100, 8, 1, 1.25, 4) == math.ceil(100 / 8 * 1.25)
    assert moe.expert_capacity(100, 8, 2, 1.25, 4) == math.ceil(100 / 8 * 2.5)
    assert moe.expert_capacity(3, 8, 1, 1.0, 4) == 4


@pytest.mark.parametrize("top_k,activation", [(1, "gelu"), (2, "gelu"), (3, "swiglu")])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_forward_and_grads_equal_the_per_token_loop(top_k, activation, drop_tokens):
    m = layer(top_k=top_k, activation=activation, drop_tokens=drop_tokens, capacity_factor=0.75)
    x = torch.randn(3, 5, 8)
    got = m(x)
    want = per_token_reference(m, x)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    # Gradients of the layer = gradients of (output + weighted aux losses) computed directly.
    m.aux_loss_weight, m.z_loss_weight = 0.1, 0.01
    grads = torch.autograd.grad(m(x).pow(2).sum(), [m.gate, m.w_in, m.w_out])
    routing = m.route(x.reshape(-1, 8))
    dispatch = moe.sort_by_expert(routing, m.num_experts)
    out = moe.combine_local(x.reshape(-1, 8), dispatch, m.w_in, m.w_out, activation)
    total = out.pow(2).sum() + 0.1 * routing.aux_loss + 0.01 * routing.z_loss
    for g, w, name in zip(
        grads, torch.autograd.grad(total, [m.gate, m.w_in, m.w_out]), "gate w_in w_out".split()
    ):
        torch.testing.assert_close(g, w, atol=TOL, rtol=0, msg=name)


def test_aux_loss_gradient_is_there():
    """Without the aux loss term the router gets a different gradient (the test above can fail)."""
    m = layer(aux_loss_weight=1.0)
    x = torch.randn(13, 8)  # 13 tokens cannot spread evenly over 4 experts (a zero aux gradient)
    with_aux = torch.autograd.grad(m(x).sum(), m.gate)[0]
    with moe.scaled_loss_grad(0.0):
        without = torch.autograd.grad(m(x).sum(), m.gate)[0]
    assert (with_aux - without).abs().max() > 1e-4


def skewed(m: strato.nn.MoE) -> None:
    """Every token's first choice is expert 0: its gate row dominates for positive inputs."""
    with torch.no_grad():
        m.gate.zero_()
        m.gate[0] = 5.0
        m.gate[1] = 1.0


def test_tight_capacity_drops_by_hand_count_and_residual_passes_through():
    m = layer(top_k=1, capacity_factor=1.0, min_capacity=1)
    skewed(m)
    x = torch.rand(8, 8) + 0.1  # positive: all 8 tokens pick expert 0
    capacity = math.ceil(8 / 4 * 1.0)  # 2 slots per expert
    y = x + m(x)  # a residual block around the layer
    stats = m.stats()
    assert stats["tokens_per_expert"] == [capacity, 0, 0, 0]
    assert stats["dropped_tokens"] == 8 - capacity
    # Priority: earlier tokens keep their slot; the dropped ones come out as they went in.
    assert torch.equal(y[capacity:], x[capacity:])
    assert not torch.equal(y[:capacity], x[:capacity])
    torch.testing.assert_close(m(x), per_token_reference(m, x), atol=TOL, rtol=0)


def test_top2_tight_capacity_hand_count():
    m = layer(top_k=2, capacity_factor=0.5, min_capacity=1)
    skewed(m)
    x = torch.rand(8, 8) + 0.1  # first choice expert 0, second expert 1, for every token
    capacity = math.ceil(8 / 4 * 2 * 0.5)  # 2
    m(x)
    stats = m.stats()
    assert stats["tokens_per_expert"] == [capacity, capacity, 0, 0]
    assert stats["dropped_tokens"] == 2 * 8 - 2 * capacity


def test_skewed_routing_dropless_keeps_every_token():
    m = layer(top_k=1, drop_tokens=False)
    skewed(m)
    x = torch.rand(8, 8) + 0.1
    y = m(x)
    assert m.stats()["tokens_per_expert"] == [8, 0, 0, 0]
    assert m.stats()["dropped_tokens"] == 0
    prob = F.softmax(x @ m.gate.t(), dim=-1)[:, :1]
    dense = F.gelu(x @ m.w_in[0]) @ m.w_out[0] * prob  # all tokens through expert 0
    torch.testing.assert_close(y, dense, atol=TOL, rtol=0)


def test_grouped_gemm_equals_per_expert_loop():
    m = layer(drop_tokens=False)
    tokens = torch.randn(20, 8)
    dispatch = moe.sort_by_expert(m.route(tokens), 4)
    grouped = moe.combine_local(tokens, dispatch, m.w_in, m.w_out, "gelu")
    loop = moe.combine_local(tokens, dispatch, m.w_in, m.w_out, "gelu", loop=True)
    torch.testing.assert_close(grouped, loop, atol=TOL, rtol=0)
    assert moe.GROUPED_MM is not None, "torch 2.11-2.13 all have a grouped GEMM"


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"top_k": 5}, "top_k=5 > num_experts=4"),
        ({"capacity_factor": 0}, "capacity_factor"),
        ({"eval_capacity_factor": -1.0}, "eval_capacity_factor"),
        ({"activation": "tanh"}, "activation"),
    ],
)
def test_bad_layer_settings_name_the_argument(kw, field):
    with pytest.raises(strato.nn.MoEError, match=field):
        layer(**kw)


def test_experts_not_divisible_by_expert_parallel_size():
    model = moe_gpt(num_experts=4)
    strategy = strato.Strategy(optimizer=strato.SGD(lr=0.1), moe=strato.ExpertParallel(size=3))
    with pytest.raises(strato.StratoError, match=r"size=3.*4 experts of .blocks.0.mlp."):
        strato.compile(model, strategy, example_inputs=tiny_batch(0, 2))


def test_expert_size_must_divide_data_parallel_ranks():
    from strato.runtime.mesh import ProcessMesh

    mesh = ProcessMesh(
        config=strato.Mesh(),
        sizes={d: 4 if d == "shard" else 1 for d in strato.Mesh.dimension_names()},
        rank=0,
        device=torch.device("cpu"),
    )
    with pytest.raises(strato.StrategyError, match="size=3.*4 data-parallel ranks"):
        mesh.expert_groups(3)
    with pytest.raises(strato.StrategyError, match="expert"):
        mesh.group("expert")


def test_strategy_field_round_trips():
    strategy = strato.Strategy(moe=strato.ExpertParallel(size=2))
    assert strato.Strategy.from_yaml(strategy.to_yaml()) == strategy
    with pytest.raises(strato.StrategyError, match="ExpertParallel.size"):
        strato.ExpertParallel(size=0)
    with pytest.raises(strato.StrategyError, match="Strategy.moe"):
        strato.Strategy(moe=2)


def test_model_without_moe_layers_is_refused():
    from examples.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, seq_len=4, d_model=8, n_layers=1, n_heads=2))
    strategy = strato.Strategy(optimizer=strato.SGD(lr=0.1), moe=strato.ExpertParallel(size=2))
    with pytest.raises(strato.StratoError, match="no strato.nn.MoE layer"):
        strato.compile(model, strategy, example_inputs=tiny_batch(0, 2, vocab=11, seq=4))


def test_compiled_training_matches_eager_and_reports_stats():
    """One process (expert size resolves to 1): captured MoE GPT = eager, under SGD."""
    eager = moe_gpt(num_experts=4)
    model = moe_gpt(num_experts=4)
    strategy = strato.Strategy(
        optimizer=strato.SGD(lr=0.1, momentum=0.0),
        grad_accumulation=2,
        moe=strato.ExpertParallel(size=2),
    )
    engine = strato.compile(model, strategy, example_inputs=tiny_batch(0, 4))
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    for step in range(3):
        x, y = tiny_batch(step, 6)  # another batch size than the example's
        loss = engine.train_step(x, y)
        half = [eager(x[i : i + 3], y[i : i + 3]) for i in (0, 3)]
        with moe.scaled_loss_grad(0.5):
            (sum(half) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert abs(loss - float(sum(half) / 2)) <= TOL
    for (name, got), want in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=name)
    stats = engine.stats()["moe"]
    assert set(stats) == {"blocks.0.mlp", "blocks.1.mlp"}
    assert (
        sum(stats["blocks.0.mlp"]["tokens_per_expert"]) + stats["blocks.0.mlp"]["dropped_tokens"]
        == 3 * 8 * 2
    )  # one micro-batch: 3 sequences x 8 tokens x top-2
    assert stats["blocks.0.mlp"]["aux_loss"] > 0


@pytest.mark.slow  # ~8 s; the GPT MoE parity test stays in make test
def test_hugging_face_llama_with_moe_layers_and_labels():
    """strato.nn.MoE as the MLP of a tiny Llama, trained with `labels` (the model's own
    loss) and the aux losses: compiled = eager under SGD, another batch size than the example."""
    from tests.conftest import tiny_llama

    def build():
        torch.manual_seed(0)
        model = tiny_llama()
        for block in model.model.layers:
            block.mlp = strato.nn.MoE(32, 24, 4, 2, capacity_factor=1.0, z_loss_weight=1e-3)
        return model

    eager, model = build(), build()
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    strategy = strato.Strategy(optimizer=strato.SGD(lr=0.1, momentum=0.0))
    engine = strato.compile(
        model, strategy, example_kwargs={"input_ids": ids[:2], "labels": ids[:2]}
    )
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    for _ in range(2):
        loss = engine.train_step(input_ids=ids, labels=ids)
        want = eager(input_ids=ids, labels=ids).loss
        want.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert abs(loss - float(want.detach())) <= TOL
    for (name, got), want in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=name)
    assert engine.stats()["moe"]["model.layers.0.mlp"]["dropped_tokens"] >= 0


def assert_same_values_and_grads(got, want, inputs) -> None:
    """`got` equals `want`, and so do the gradients of their squared sums wrt `inputs`."""
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    for g, w in zip(
        torch.autograd.grad(got.pow(2).sum(), inputs),
        torch.autograd.grad(want.pow(2).sum(), inputs),
    ):
        torch.testing.assert_close(g, w, atol=TOL, rtol=0)


def test_mixtral_block_is_recognised_and_dispatched_exactly():
    """The expert-parallel module (expert group of one rank) on a Hugging Face Mixtral
    block's weights = the block's own forward and gradients."""
    from strato.passes.moe_dispatch import moe_layers
    from strato.runtime.expert_parallel import ExpertParallelMoE
    from strato.runtime.mesh import MeshGroup
    from tests.moe_worker import tiny_mixtral

    model = tiny_mixtral()
    layers = moe_layers(model)
    assert list(layers) == ["model.layers.0.mlp"]
    block = model.model.layers[0].mlp
    one_rank = MeshGroup("expert", (0,), 0, torch.device("cpu"))
    parallel = ExpertParallelMoE(layers["model.layers.0.mlp"].settings, one_rank, None)
    x = torch.randn(2, 5, 32, requires_grad=True)
    weights = [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]
    got = parallel(x, weights[0], weights[1].transpose(1, 2), weights[2].transpose(1, 2))
    assert_same_values_and_grads(got, block(x), [x, *weights])


def test_qwen2_moe_block_is_recognised_and_dispatched_exactly():
    """Qwen2-MoE's block (routed experts without renormalised top-k weights, plus a shared
    SwiGLU expert gated by sigmoid(x g)): the expert-parallel module (expert group of one
    rank) on its weights = the block's own forward and gradients."""
    from strato.passes.moe_dispatch import moe_layers
    from strato.runtime.expert_parallel import ExpertParallelMoE
    from strato.runtime.mesh import MeshGroup
    from tests.moe_worker import tiny_qwen2_moe

    model = tiny_qwen2_moe()
    layer = moe_layers(model)["model.layers.0.mlp"]
    assert layer.settings["shared_expert"] and not layer.settings["normalize"]
    block = model.model.layers[0].mlp
    one_rank = MeshGroup("expert", (0,), 0, torch.device("cpu"))
    parallel = ExpertParallelMoE(layer.settings, one_rank, None)
    x = torch.randn(2, 5, 32, requires_grad=True)
    weights = list(layer.params.values())
    handed = [
        w.transpose(1, 2) if role in layer.transposed else w for role, w in layer.params.items()
    ]
    assert_same_values_and_grads(parallel(x, *handed), block(x), [x, *weights])


def test_unrecognised_hugging_face_moe_block_is_named():
    """A Qwen2-MoE built with GELU experts is not the SwiGLU the dispatch computes: refused,
    naming the module (a silent local run would not be the asked expert parallelism)."""
    from tests.moe_worker import tiny_qwen2_moe

    model = tiny_qwen2_moe(hidden_act="gelu")
    ids = torch.randint(0, 50, (2, 5))
    strategy = strato.Strategy(optimizer=strato.SGD(lr=0.1), moe=strato.ExpertParallel(size=2))
    with pytest.raises(strato.StratoError, match=r"model.layers.0.mlp \(Qwen2MoeSparseMoeBlock\)"):
        strato.compile(model, strategy, example_kwargs={"input_ids": ids, "labels": ids})
