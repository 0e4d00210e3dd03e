"""Shared by the training, checkpoint, precision and data-parallel tests (and their workers):
a tiny GPT, deterministic batches, and the plain-PyTorch reference training loop."""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.gpt import GPT, GPTConfig  # noqa: E402

TINY = GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2)


def tiny_gpt(seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(**{**TINY.__dict__, **changes})
    return GPT(cfg)


def batch(step: int, size: int = 8, cfg: GPTConfig = TINY) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` of a fixed stream: next-token prediction on a learnable pattern plus noise."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, cfg.vocab_size, (size, 1), generator=g)
    stride = torch.randint(1, 4, (size, 1), generator=g)
    seq = (start + stride * torch.arange(cfg.seq_len + 1)) % cfg.vocab_size
    noise = torch.rand(seq.shape, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, cfg.vocab_size, seq.shape, generator=g), seq)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def reference_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """What strato's default param groups should be, written out independently:
    matrices decay, vectors (biases, LayerNorm weights) do not."""
    decay = [p for _, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def eager_train(
    model: torch.nn.Module,
    make_optimizer,
    steps: int,
    batch_size: int = 8,
    accumulation: int = 1,
    clip: float | None = None,
) -> tuple[list[float], list[float]]:
    """Plain PyTorch training: returns (mean loss per step, grad norm per step)."""
    optimizer = make_optimizer(model)
    losses, norms = [], []
    micro = batch_size // accumulation
    for step in range(steps):
        x, y = batch(step, batch_size)
        total = 0.0
        for k in range(accumulation):
            sl = slice(k * micro, (k + 1) * micro)
            loss = model(x[sl], y[sl])
            (loss / accumulation if accumulation > 1 else loss).backward()
            total += loss.item()
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / accumulation)
    return losses, norms


def engine_train(engine, steps: int, batch_size: int = 8, accumulation: int = 1, start: int = 0):
    """Train a strato engine on the same stream; returns the per-step mean losses."""
    losses = []
    micro = batch_size // accumulation
    for step in range(start, start + steps):
        x, y = batch(step, batch_size)
        for k in range(accumulation):
            sl = slice(k * micro, (k + 1) * micro)
            engine.backward(engine(x[sl], y[sl]))
            updated = engine.step()
            assert updated == (k == accumulation - 1)
        losses.append(engine.stats()["loss"])
    return losses


def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module, skip=()) -> float:
    pb = dict(b.named_parameters())
    return max(
        (p.detach() - pb[n].detach()).abs().max().item()
        for n, p in a.named_parameters()
        if n not in skip
    )


def without_key_bias(name: str, tensor: torch.Tensor, d_model: int = TINY.d_model) -> torch.Tensor:
    """`tensor` minus the key third of an attention qkv bias.

    Softmax ignores a bias added to every key, so that slice's true gradient is zero and
    what reaches it is rounding noise, which Adam turns into lr-sized steps: two correct
    runs that round differently (one process vs all-reduced halves) differ there by ~lr.
    Weight comparisons under Adam leave it out; under SGD everything is compared."""
    if name.endswith("attn.qkv.bias"):
        return torch.cat([tensor[:d_model], tensor[2 * d_model :]])
    return tensor
