"""Strato: a compiler-style framework that trains and serves large PyTorch models.

compiled = strato.compile(model, strato.Strategy(), example_inputs=(x,))
"""

from .compiler.compile import compile
from .compiler.context import CompileContext
from .compiler.cost_model import Explanation
from .compiler.errors import (
    CaptureError,
    PassContractError,
    PassError,
    StrategyError,
    StratoError,
)
from .compiler.pass_manager import GraphPass, PassRecord, graph_pass
from .compiler.strategy import Strategy
from .runtime.compiled_model import CompiledModel

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "CompileContext",
    "CompiledModel",
    "Explanation",
    "GraphPass",
    "PassContractError",
    "PassError",
    "PassRecord",
    "StratoError",
    "Strategy",
    "StrategyError",
    "compile",
    "graph_pass",
]
