"""`strato.nn`: layers whose compiled forms Strato knows (a captured MoE layer is what the
`moe_dispatch` pass turns into expert parallelism).

layer = strato.nn.MoE(d_model=256, d_ff=1024, num_experts=8, top_k=2)
"""

from .runtime.moe import MoE, MoEError

__all__ = ["MoE", "MoEError"]
