"""Parameter groups and torch optimizers from an optimizer config (strato.AdamW, strato.SGD),
and the schedule's factor for the step being taken.

Groups split parameters by weight decay (biases and normalization weights get none by
default) and, with layer-wise LR decay, by layer. Each group carries 'names' (its
parameters' names, for checkpoints) and 'base_lr' (lr before the schedule factor).
"""

from __future__ import annotations

import fnmatch
import re
import warnings

import torch

from ..compiler.training_config import OptimizerConfig, ScheduleConfig

NORM_TYPES = (
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.LocalResponseNorm,
    torch.nn.modules.batchnorm._NormBase,
    *([torch.nn.RMSNorm] if hasattr(torch.nn, "RMSNorm") else []),
)
_LAYER_INDEX = re.compile(r"\.(\d+)(\.|$)")


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters that require grad, by first name (tied weights once), in model order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _norm_parameter_names(model: torch.nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()
        if is_norm:
            for pname, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{pname}" if module_name else pname)
    return names


def layer_ids(names: list[str]) -> tuple[dict[str, int], int]:
    """Layer id of each parameter name and the number of numbered layers L.

    The first integer in a name ('blocks.3.attn...') numbers its layer (1..L in order of
    appearance); names before the first numbered one get 0, names after the last L + 1."""
    indices: dict[str, str] = {}
    for name in names:
        match = _LAYER_INDEX.search("." + name)
        if match:
            indices[name] = name[: match.end(1) - 1]  # 'blocks.3'
    order = list(dict.fromkeys(indices.values()))
    n_layers = len(order)
    ids, seen_layer = {}, False
    for name in names:
        if name in indices:
            ids[name] = order.index(indices[name]) + 1
            seen_layer = True
        else:
            ids[name] = n_layers + 1 if seen_layer else 0
    return ids, n_layers


def param_groups(
    model: torch.nn.Module,
    config: OptimizerConfig,
    params: dict[str, torch.Tensor] | None = None,
) -> list[dict]:
    """Optimizer param groups for `params` (default: the model's trainable parameters).

    `params` may map a model parameter's name to another tensor (a ZeRO flat shard, say):
    group settings are decided by the model's name, the group holds the given tensor."""
    named = trainable_parameters(model) if params is None else dict(params)
    if not named:
        raise ValueError(
            f"{type(model).__name__} has no parameters that require grad: nothing to optimize."
        )
    norms = _norm_parameter_names(model)
    all_names = list(trainable_parameters(model))
    ids, n_layers = layer_ids(all_names)
    model_params = dict(model.named_parameters())
    groups: dict[tuple[bool, int], dict] = {}
    for name, tensor in named.items():
        model_param = model_params.get(name, tensor)
        is_norm_or_bias = model_param.ndim <= 1 or name in norms or name.endswith(".bias")
        decay = config.weight_decay > 0 and (config.decay_norms_and_biases or not is_norm_or_bias)
        if any(fnmatch.fnmatch(name, pattern) for pattern in config.no_decay):
            decay = False
        layer = ids.get(name, n_layers + 1) if config.layer_decay is not None else n_layers + 1
        group = groups.setdefault(
            (decay, layer),
            {
                "params": [],
                "names": [],
                "weight_decay": config.weight_decay if decay else 0.0,
                "base_lr": config.lr * (config.layer_decay or 1.0) ** (n_layers + 1 - layer),
            },
        )
        group["params"].append(tensor)
        group["names"].append(name)
    for group in groups.values():
        group["lr"] = group["base_lr"]
    return list(groups.values())


def build_optimizer(
    model: torch.nn.Module,
    config: OptimizerConfig,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.optim.Optimizer:
    """The torch optimizer `config` names, over `param_groups(model, config, params)`."""
    return config.build(param_groups(model, config, params))


_warned_past_end: set = set()


def lr_factor(schedule: ScheduleConfig, step: int) -> float:
    """`schedule.factor(step)` for the optimizer step about to run. A step at or past a
    decaying schedule's total_steps runs at its final lr (the floor) and warns, once per
    schedule per process: a total_steps shorter than the run silently wastes the rest."""
    factor = schedule.factor(step)
    total = getattr(schedule, "total_steps", None)
    if total is not None and step >= total and schedule not in _warned_past_end:
        _warned_past_end.add(schedule)
        warnings.warn(
            f"{type(schedule).__name__}.total_steps={total}: optimizer step {step} is past the "
            f"end of the schedule, so it and every later step run at its final lr "
            f"({factor:g} x the optimizer's lr). Set total_steps to the number of optimizer "
            "steps you train.",
            stacklevel=3,
        )
    return factor
