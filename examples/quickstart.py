"""Compile a small model, inspect what the compiler did, and check it matches eager."""

import torch
import torch.nn as nn

import strato


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 4))
    x = torch.randn(8, 16)
    compiled = strato.compile(model, strato.Strategy(), example_inputs=(x,))
    print(compiled.print_graph())
    print()
    print(compiled.explain())
    err = (compiled(x) - model(x)).abs().max().item()
    print(f"\nmax |compiled - eager| = {err:.2e}")


if __name__ == "__main__":
    main()
