"""Write a graph pass, compile with it, and see what it changed.

The pass swaps exact GELU for its tanh approximation: a typical user rewrite.
Run:  python examples/custom_pass.py
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

import strato


@strato.graph_pass(name="tanh_gelu", requires="shapes")
def tanh_gelu(gm: fx.GraphModule, ctx: strato.CompileContext) -> fx.GraphModule:
    """Use the tanh approximation for every exact GELU."""
    rewritten = 0
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.gelu.default and node.kwargs.get("approximate") != "tanh":
            node.kwargs = {**node.kwargs, "approximate": "tanh"}
            rewritten += 1
    ctx.record("tanh_gelu", rewritten=rewritten)
    return gm


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16), nn.GELU())
    x = torch.randn(4, 16)
    compiled = strato.compile(model, strato.Strategy(passes=[tanh_gelu]), example_inputs=(x,))
    for record in compiled.history:
        print(
            f"{record.name:<22} {record.seconds * 1e3:6.2f} ms  nodes {record.nodes_before} -> {record.nodes_after}"
        )
    print()
    print(compiled.diff("tanh_gelu"))
    print()
    print("rewritten:", compiled.context.records["tanh_gelu"]["rewritten"])
    print("max |tanh-GELU model - exact model| =", (compiled(x) - model(x)).abs().max().item())


if __name__ == "__main__":
    main()
