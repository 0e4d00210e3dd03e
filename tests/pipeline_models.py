"""Models and the eager oracle shared by the pipeline tests and their workers.

`SkipLM` has what a pipeline cut must carry: a residual from the embedding to the head
that crosses every cut (a non-adjacent send), and a token embedding tied to the LM head
(the first and the last stage both hold it; their gradients are summed).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VOCAB, SEQ, WIDTH = 61, 6, 24
LR = 0.1


class SkipBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class SkipLM(nn.Module):
    """forward(idx, targets) -> loss; the embedding output skips every layer to the head."""

    def __init__(self, layers: int = 4, width: int = WIDTH, vocab: int = VOCAB) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(SkipBlock(width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok_emb.weight
        nn.init.normal_(self.tok_emb.weight, std=0.1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        first = self.tok_emb(idx)
        x = first
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.norm(x + 0.5 * first))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def skip_lm(seed: int = 0, layers: int = 4) -> SkipLM:
    torch.manual_seed(seed)
    return SkipLM(layers)


def tokens(step: int, size: int, vocab: int = VOCAB, seq: int = SEQ):
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randint(0, vocab, (size, seq + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def eager_sgd(
    model: nn.Module,
    steps: int,
    size: int,
    lr: float = LR,
    clip: float | None = None,
    skipped: int = 0,
    norms: list[float] | None = None,
):
    """Plain PyTorch SGD on the whole batch: (losses, final weights). `clip`: gradients
    clipped to that global norm (torch.nn.utils.clip_grad_norm_, each step's norm appended
    to `norms`); `skipped`: the first that many steps update nothing (fp16 overflows)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, y = tokens(step, size)
        loss = model(x, y)
        loss.backward()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if norms is not None:
                norms.append(float(norm))
        if step >= skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}
