"""Strato: a compiler-style framework that trains and serves large PyTorch models.

compiled = strato.compile(model, strato.Strategy(), example_inputs=(x,))
"""

from . import nn  # strato.nn: layers (runtime/moe.py)
from .compiler.compile import compile
from .compiler.context import CompileContext
from .compiler.cost_model import Explanation
from .compiler.deepspeed import DeepSpeedReport, convert_deepspeed
from .compiler.errors import (
    CaptureError,
    InputError,
    PassContractError,
    PassError,
    StrategyError,
    StratoError,
)
from .compiler.mesh_config import Mesh
from .compiler.moe_config import ExpertParallel
from .compiler.pass_manager import GraphPass, PassRecord, graph_pass
from .compiler.pipeline_parallel import Pipeline
from .compiler.quantize_config import Quantize
from .compiler.recompute_config import Budget, Recompute
from .compiler.strategy import Strategy
from .compiler.tensor_parallel_config import TensorParallel
from .compiler.training_config import (
    SGD,
    AdamW,
    Constant,
    LossScaling,
    Polynomial,
    WarmupCosine,
    WarmupLinear,
)
from .compiler.zero_config import NVMe
from .runtime.checkpoint import CheckpointError
from .runtime.compiled_model import CompiledModel
from .runtime.consolidation import consolidate
from .runtime.engine import TrainingEngine
from .runtime.generate import GenerationError
from .runtime.inference import ArtifactError, LoadedModel, export, load

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "AdamW",
    "CheckpointError",
    "Constant",
    "LossScaling",
    "Mesh",
    "ExpertParallel",
    "nn",
    "NVMe",
    "Polynomial",
    "TrainingEngine",
    "WarmupCosine",
    "WarmupLinear",
    "CaptureError",
    "CompileContext",
    "CompiledModel",
    "Explanation",
    "GraphPass",
    "InputError",
    "PassContractError",
    "PassError",
    "PassRecord",
    "Pipeline",
    "StratoError",
    "Strategy",
    "StrategyError",
    "TensorParallel",
    "compile",
    "convert_deepspeed",
    "DeepSpeedReport",
    "consolidate",
    "graph_pass",
    "ArtifactError",
    "GenerationError",
    "LoadedModel",
    "Quantize",
    "Recompute",
    "Budget",
    "export",
    "load",
]
