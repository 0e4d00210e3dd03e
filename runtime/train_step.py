"""What `engine.train_step` runs before the update: micro-batches and the schedule over them.

`train_step(*args, **kwargs)` turns its inputs into `grad_accumulation` micro-batches
(`split_batch`: every tensor split along dim 0; or `given_micro_batches`: a list or
iterator the caller cut), then hands them to a *schedule*: a function

    schedule(engine, micro_batches) -> losses

that runs forward and backward of every micro-batch through `engine.micro_batch_loss`
and `engine.backward_micro_batch` (which tells the state manager which micro-batch ends
the accumulation), and returns the losses this rank computed. The engine then updates once.
`plain_schedule` (one micro-batch after the other) is the schedule of every strategy
today; a pipeline schedule (a list of forward/backward/send/recv actions per rank, read
from the pipeline pass's record) is another function with the same signature.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
import torch
import torch.utils._pytree as pytree

from ..compiler.errors import StratoError


@attrs.frozen
class MicroBatch:
    """One micro-batch: the model's positional and keyword inputs, and the `loss_fn` target."""

    args: tuple = ()
    """Positional inputs of the model."""
    kwargs: dict = attrs.field(factory=dict)
    """Keyword inputs of the model."""
    target: Any = None
    """What `loss_fn(output, target)` compares the output with (None without a loss_fn)."""


Schedule = Callable[[Any, list[MicroBatch]], list[torch.Tensor]]
"""schedule(engine, micro_batches) -> the detached losses this rank computed."""


def plain_schedule(engine: Any, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
    """Forward then backward of each micro-batch in turn: the schedule without a pipeline."""
    losses = []
    for micro_batch in micro_batches:
        loss = engine.micro_batch_loss(micro_batch)
        engine.backward_micro_batch(loss)
        losses.append(loss.detach())
    return losses


def split_batch(
    args: tuple, kwargs: dict, target: Any, n: int, setting: str = "Strategy.grad_accumulation"
) -> list[MicroBatch]:
    """Cut every tensor (nested in tuples, lists and dicts too) into `n` equal parts along
    dim 0; anything else (flags, None, 0-d tensors) goes to every micro-batch unchanged.
    `setting` names where `n` comes from in errors."""
    if n == 1:
        return [MicroBatch(args, dict(kwargs), target)]
    leaves, spec = pytree.tree_flatten_with_path((args, kwargs, target))
    parts = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or leaf.ndim == 0:
            parts.append([leaf] * n)
            continue
        rows = leaf.shape[0]
        if rows % n:
            raise StratoError(
                f"train_step: {_input_name(path)} has {rows} rows along dim 0, which "
                f"{setting}={n} does not divide into equal micro-batches; "
                f"give a per-rank batch that is a multiple of {n}, or a list of {n} "
                "micro-batches."
            )
        parts.append(leaf.split(rows // n))
    out = []
    for k in range(n):
        args_k, kwargs_k, target_k = pytree.tree_unflatten([p[k] for p in parts], spec)
        out.append(MicroBatch(tuple(args_k), dict(kwargs_k), target_k))
    return out


def given_micro_batches(source: Any, target: Any, n: int) -> list[MicroBatch]:
    """The caller's micro-batches: `n` items of a list, or the next `n` of an iterator
    (each a tuple of positional inputs, a dict of keyword inputs, or one tensor)."""
    items = _take(source, n, "micro-batches")
    targets = [None] * n if target is None else _take(target, n, "targets")
    out = []
    for i, (item, target_k) in enumerate(zip(items, targets)):
        if isinstance(item, (tuple, list)):
            out.append(MicroBatch(tuple(item), {}, target_k))
        elif isinstance(item, Mapping):
            out.append(MicroBatch((), dict(item), target_k))
        elif isinstance(item, torch.Tensor):
            out.append(MicroBatch((item,), {}, target_k))
        else:
            raise StratoError(
                f"train_step: micro-batch {i} is a {type(item).__name__}; each micro-batch "
                "must be a tuple of the model's positional inputs, a dict of its keyword "
                "inputs, or one tensor."
            )
    return out


def is_micro_batch_source(args: tuple, kwargs: dict) -> bool:
    """Whether train_step was handed micro-batches (one list or iterator, nothing else)."""
    return len(args) == 1 and not kwargs and isinstance(args[0], (list, Iterator))


def loss_of(output: Any, micro_batch: MicroBatch, loss_fn: Callable | None) -> torch.Tensor:
    """The micro-batch's scalar loss: `loss_fn(output, target)`, the output itself, or the
    output's `loss` (a Hugging Face ModelOutput given labels, a dict)."""
    if loss_fn is not None:
        loss = loss_fn(output, micro_batch.target)
        where = "loss_fn returned"
    elif isinstance(output, torch.Tensor):
        loss, where = output, "the model returned"
    elif isinstance(output, Mapping) and output.get("loss") is not None:
        loss, where = output["loss"], "the model's output['loss'] is"
    elif getattr(output, "loss", None) is not None:
        loss, where = output.loss, "the model's output.loss is"
    else:
        raise StratoError(
            f"train_step: the model returned {type(output).__name__} with no loss; return "
            "the loss (Hugging Face models compute it when given labels=...), or pass "
            "train_step(..., loss_fn=fn, target=y) to compute it as fn(output, y)."
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise StratoError(
            f"train_step: {where} {shape}, not a scalar loss tensor; reduce it to one "
            "value (e.g. .mean())."
        )
    return loss


def _take(source: Any, n: int, what: str) -> list:
    if isinstance(source, list):
        if len(source) != n:
            raise StratoError(
                f"train_step: got {len(source)} {what} for Strategy.grad_accumulation={n}; "
                f"pass exactly {n} (or set grad_accumulation={len(source)})."
            )
        return source
    if not isinstance(source, Iterator):
        raise StratoError(
            f"train_step: {what} must be a list or an iterator, got {type(source).__name__}."
        )
    items = list(itertools.islice(source, n))
    if len(items) != n:
        raise StratoError(
            f"train_step: the iterator of {what} ran out after {len(items)} of the {n} that "
            f"Strategy.grad_accumulation={n} needs (nothing was run; those {len(items)} "
            "are consumed)."
        )
    return items


def _input_name(path: tuple) -> str:
    """'argument 0', 'input_ids=' or 'target', with any nesting after it ('argument 1[0]')."""
    where, *rest = path
    if where.idx == 0:  # args
        head, rest = f"argument {rest[0].idx}", rest[1:]
    elif where.idx == 1:  # kwargs
        head, rest = f"{rest[0].key}=", rest[1:]
    else:
        head = "target"
    return head + pytree.keystr(tuple(rest))
