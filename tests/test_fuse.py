"""The fusion pass: fused models match eager (losses and gradients, fp32 within 1e-5) with
the torch-reference and the Triton (interpreter) backends; regions, records, the kernel
cache and errors."""

from __future__ import annotations

import copy
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import strato  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402
from strato.codegen import cache  # noqa: E402
from strato.kernels.launch import count_launches  # noqa: E402
from tests.conftest import TINY_GPT, assert_parity, grads_of  # noqa: E402

FUSE = strato.Strategy(fuse=True)
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATO_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv("STRATO_KERNELS", raising=False)


def gpt_batch(cfg: GPTConfig, batch: int = 2):
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    return idx, torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))


def check_training_parity(cfg: GPTConfig, steps: int = 2) -> strato.CompiledModel:
    """Losses and gradients of the fused GPT equal eager over a few SGD steps.

    SGD, not Adam: Adam turns rounding noise in a zero gradient into lr-sized steps."""
    model = GPT(cfg)
    eager = copy.deepcopy(model)
    idx, targets = gpt_batch(cfg)
    compiled = strato.compile(model, FUSE, example_inputs=(idx, targets))
    for _ in range(steps):
        losses, grads = [], []
        for fn, owner in ((eager, eager), (compiled, model)):
            owner.zero_grad(set_to_none=True)
            loss = fn(idx, targets)
            loss.backward()
            losses.append(loss.detach())
            grads.append(grads_of(owner))
        torch.testing.assert_close(losses[1], losses[0], atol=ATOL, rtol=0)
        assert grads[1].keys() == grads[0].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], atol=ATOL, rtol=0, msg=name)
        with torch.no_grad():
            for owner in (eager, model):
                for p in owner.parameters():
                    p -= 0.1 * p.grad
    return compiled


def test_fused_gpt_matches_eager_with_torch_references():
    compiled = check_training_parity(TINY_GPT)
    idx, targets = gpt_batch(TINY_GPT, batch=3)  # the batch dim stays symbolic
    torch.testing.assert_close(
        compiled(idx, targets), compiled.model(idx, targets), atol=ATOL, rtol=0
    )
    kinds = sorted({k["kind"] for k in compiled.kernels()})
    assert kinds == ["attention", "cross_entropy", "row"]
    # Every block's attention, and every LayerNorm together with the residual add before it.
    assert sum(k["kind"] == "attention" for k in compiled.kernels()) == TINY_GPT.n_layers
    assert sum(k["kind"] == "row" for k in compiled.kernels()) == 2 * TINY_GPT.n_layers + 1
    text = compiled.print_graph()
    assert "strato.attention_packed" in text and "strato.row_" in text
    assert "aten.softmax" not in text and "aten.layer_norm" not in text


def test_fused_gpt_matches_eager_with_triton_interpreter(monkeypatch):
    monkeypatch.setenv("STRATO_KERNELS", "triton")
    cfg = GPTConfig(vocab_size=61, seq_len=8, d_model=16, n_layers=1, n_heads=2)
    with count_launches() as launched:
        check_training_parity(cfg, steps=1)
    assert {"attention_forward", "row_backward", "cross_entropy_forward"} <= set(launched.launches)


def test_kernels_lists_sources_and_replaced_nodes():
    model = GPT(TINY_GPT)
    compiled = strato.compile(model, FUSE, example_inputs=gpt_batch(TINY_GPT))
    kernels = compiled.kernels()
    assert kernels and all("@triton.jit" in k["source"] and k["nodes"] for k in kernels)
    ln = next(k for k in kernels if k["kind"] == "row" and "blocks.0.ln2" in k["name"])
    assert "layer_norm_1" in ln["nodes"] and "add_2" in ln["nodes"]
    assert ln["kernel"].startswith("strato::row_") and "def row_backward" in ln["source"]
    graph_ops = {
        n.target.name()
        for n in compiled.graph.graph.nodes
        if isinstance(n.target, torch._ops.OpOverload)
    }
    assert {k["kernel"] for k in kernels} <= graph_ops
    # Regions of equal structure (each block's residual add + LayerNorm) share one kernel.
    rows = [k for k in kernels if k["kind"] == "row"]
    assert len({k["kernel"] for k in rows}) < len(rows)
    by_kernel = {}
    for k in kernels:
        assert by_kernel.setdefault(k["kernel"], k["source"]) == k["source"]
    fused_nodes = [n for n in compiled.graph.graph.nodes if "strato_fused" in n.meta]
    assert {n.meta["strato_fused"]["kernel"] for n in fused_nodes} == {k["kernel"] for k in kernels}
    assert strato.compile(model, example_inputs=gpt_batch(TINY_GPT)).kernels() == []


class BiasGeluMLP(nn.Module):
    """Elementwise chains written out: bias + GELU, scaling, a cast and a residual add."""

    def __init__(self, d: int = 24, act=F.gelu):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4 * d, d) / d**0.5)
        self.b1 = nn.Parameter(torch.randn(4 * d))
        self.w2 = nn.Parameter(torch.randn(d, 4 * d) / (4 * d) ** 0.5)
        self.norm = nn.RMSNorm(d)
        self.act = act

    def forward(self, x):
        h = self.act(x @ self.w1.t() + self.b1) * 0.5
        y = (h @ self.w2.t()).float() + x
        return self.norm(y)


def test_elementwise_chains_and_rmsnorm_fuse_and_match_eager():
    model = BiasGeluMLP()
    x = torch.randn(3, 5, 24)
    compiled = strato.compile(model, FUSE, example_inputs=(x,))
    kinds = [k["kind"] for k in compiled.kernels()]
    assert kinds.count("pointwise") == 1 and kinds.count("row") == 1
    pointwise = next(k for k in compiled.kernels() if k["kind"] == "pointwise")
    assert {"add", "gelu", "mul"} <= set(pointwise["nodes"])
    assert_parity(model, compiled, (x,), atol=ATOL)


def test_graph_outputs_inside_a_region_are_kept():
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(20)

        def forward(self, x, r):
            h = x * 2.0 + r  # a graph output and the LayerNorm's input
            return h, self.ln(h)

    model = TwoOutputs()
    x, r = torch.randn(4, 20, requires_grad=True), torch.randn(4, 20)
    compiled = strato.compile(model, FUSE, example_inputs=(x, r))
    (region,) = compiled.kernels()
    assert region["kind"] == "row" and len(region["outputs"]) == 2
    h, y = compiled(x, r)
    h_ref, y_ref = model(x, r)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(y, y_ref)
    (gx,) = torch.autograd.grad(h.sum() + (y * y_ref.detach()).sum(), [x])
    (gx_ref,) = torch.autograd.grad(h_ref.sum() + (y_ref * y_ref.detach()).sum(), [x])
    torch.testing.assert_close(gx, gx_ref, atol=ATOL, rtol=0)


def test_log_softmax_nll_fuses_as_cross_entropy():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 29)

        def forward(self, x, t):
            return F.nll_loss(F.log_softmax(self.proj(x), dim=-1), t, ignore_index=3)

    model = Head()
    x, t = torch.randn(10, 16), torch.randint(0, 29, (10,))
    compiled = strato.compile(model, FUSE, example_inputs=(x, t))
    assert [k["kind"] for k in compiled.kernels()] == ["cross_entropy"]
    assert_parity(model, compiled, (x, t), atol=ATOL, reduce=lambda out: out)


def test_second_compile_generates_nothing_and_a_changed_region_does():
    x = torch.randn(2, 3, 24)
    before = cache.cache_stats()
    strato.compile(BiasGeluMLP(), FUSE, example_inputs=(x,))
    first = cache.cache_stats()
    assert first.generated - before.generated == 2  # one pointwise + one row kernel
    strato.compile(BiasGeluMLP(), FUSE, example_inputs=(x,))
    second = cache.cache_stats()
    assert second.generated == first.generated and second.reused - first.reused == 2
    strato.compile(BiasGeluMLP(act=F.silu), FUSE, example_inputs=(x,))
    third = cache.cache_stats()
    assert third.generated - second.generated == 1  # the SiLU region is new; the norm is not
    assert len(list((cache.cache_dir()).glob("*.py"))) == 3


def test_template_error_names_template_and_region(monkeypatch):
    from strato.codegen import generate

    monkeypatch.setitem(generate.TEMPLATES, "pointwise", "row_reduction.py.j2")
    with pytest.raises(strato.PassError) as exc:
        strato.compile(BiasGeluMLP(), FUSE, example_inputs=(torch.randn(2, 24),))
    msg = str(exc.value)
    assert "'fuse'" in msg and "row_reduction.py.j2" in msg and "is undefined" in msg
    assert "template 'row_reduction.py.j2' for region '<root>:mul'" in msg


def test_fused_graph_exports_and_runs_under_torch_compile():
    cfg = GPTConfig(vocab_size=61, seq_len=8, d_model=16, n_layers=1, n_heads=2)
    model = GPT(cfg)
    idx, targets = gpt_batch(cfg)
    compiled = strato.compile(model, FUSE, example_inputs=(idx, targets))
    exported = torch.export.export(compiled.graph, (idx, targets), strict=False)
    assert sum("strato." in str(n.target) for n in exported.graph.nodes) == len(compiled.kernels())
    torch.testing.assert_close(exported.module()(idx, targets), model(idx, targets))
    loss = torch.compile(compiled.graph, backend="aot_eager", fullgraph=True)(idx, targets)
    torch.testing.assert_close(loss, model(idx, targets), atol=ATOL, rtol=0)
    loss.backward()  # through the fused ops' registered autograd


def test_eval_mode_and_strategy_field():
    model = GPT(TINY_GPT)
    idx, _ = gpt_batch(TINY_GPT)
    compiled = strato.compile(model.eval(), FUSE, example_inputs=(idx,))
    torch.testing.assert_close(compiled(idx), model(idx), atol=ATOL, rtol=0)
    assert compiled.kernels()
    with pytest.raises(strato.StrategyError, match="Strategy.fuse"):
        strato.Strategy(fuse="yes")
    assert strato.Strategy.from_yaml(FUSE.to_yaml()) == FUSE
    assert "fuse = False" in strato.Strategy.describe()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_random_dropout_fuses_and_reproduces_under_manual_seed(monkeypatch, backend):
    monkeypatch.setenv("STRATO_KERNELS", backend)
    cfg = GPTConfig(vocab_size=61, seq_len=8, d_model=16, n_layers=1, n_heads=2, dropout=0.25)
    model = GPT(cfg)
    idx, targets = gpt_batch(cfg)
    compiled = strato.compile(model, FUSE, example_inputs=(idx, targets))
    fused_nodes = {n for k in compiled.kernels() for n in k["nodes"]}
    assert {"dropout", "dropout_2", "dropout_3"} <= fused_nodes  # embedding + residual dropouts
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        loss = compiled(idx, targets)
        loss.backward()
        runs.append((loss.detach(), grads_of(model)))
    assert torch.isfinite(runs[0][0])
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=0, rtol=0)  # same seed, same masks
    for name in runs[0][1]:
        torch.testing.assert_close(runs[1][1][name], runs[0][1][name], atol=0, rtol=0)
    assert runs[2][0] != runs[0][0]  # another seed, other masks
    compiled.eval()
    model.eval()
    torch.testing.assert_close(compiled(idx, targets), model(idx, targets), atol=ATOL, rtol=0)


class LlamaStyle(nn.Module):
    """Another architecture: RMSNorm, SiLU-gated MLP, chunk/permute heads, no mask, no biases."""

    def __init__(self, vocab: int = 50, d: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "n1": nn.RMSNorm(d),
                    "qkv": nn.Linear(d, 3 * d, bias=False),
                    "o": nn.Linear(d, d, bias=False),
                    "n2": nn.RMSNorm(d),
                    "w1": nn.Linear(d, 2 * d, bias=False),
                    "w3": nn.Linear(d, 2 * d, bias=False),
                    "w2": nn.Linear(2 * d, d, bias=False),
                }
            )
            for _ in range(layers)
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, idx, targets):
        x = self.emb(idx)
        b, t, c = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["n1"](x)).chunk(3, dim=-1)
            q, k, v = (z.view(b, t, self.heads, -1).permute(0, 2, 1, 3) for z in (q, k, v))
            a = torch.softmax(q @ k.transpose(2, 3) / (c // self.heads) ** 0.5, dim=-1) @ v
            x = x + blk["o"](a.permute(0, 2, 1, 3).reshape(b, t, c))
            h = blk["n2"](x)
            x = x + blk["w2"](F.silu(blk["w1"](h)) * blk["w3"](h))
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_llama_style_model_fuses_and_matches_eager(monkeypatch, backend):
    monkeypatch.setenv("STRATO_KERNELS", backend)
    model = LlamaStyle()
    idx, targets = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    compiled = strato.compile(model, FUSE, example_inputs=(idx, targets))
    kinds = [k["kind"] for k in compiled.kernels()]
    assert kinds.count("attention") == 2 and kinds.count("pointwise") == 2
    assert kinds.count("row") == 4 and kinds.count("cross_entropy") == 1
    assert all(
        k["kernel"] == "strato::attention_packed"
        for k in compiled.kernels()
        if k["kind"] == "attention"
    )
    assert_parity(model, compiled, (idx, targets), atol=ATOL, reduce=lambda loss: loss)


def test_training_engine_with_fusion_matches_the_unfused_engine():
    # SGD (not Adam) so weights can be compared after the updates.
    model = GPT(TINY_GPT)
    twin = copy.deepcopy(model)
    idx, targets = gpt_batch(TINY_GPT)
    sgd = strato.SGD(lr=0.1)
    fused = strato.compile(
        model, strato.Strategy(fuse=True, optimizer=sgd), example_inputs=(idx, targets)
    )
    plain = strato.compile(twin, strato.Strategy(optimizer=sgd), example_inputs=(idx, targets))
    for _ in range(2):
        for engine in (fused, plain):
            engine.backward(engine(idx, targets))
            engine.step()
    assert fused.kernels() and not plain.kernels()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=ATOL, rtol=0, msg=name)
