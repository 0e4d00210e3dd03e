"""Helpers the generated kernel modules import: input broadcasting and block sizes."""

from __future__ import annotations

import torch
import triton

from ..kernels.backend import interpreting


def broadcast_inputs(inputs: list[torch.Tensor], shape: torch.Size) -> tuple[list, list, list]:
    """Each input as (tensor, inner, broadcast) for a kernel indexing `offs % inner`.

    An input of the full shape is read at `offs`; one whose shape is a suffix of
    `shape` (a bias, a mask, a 0-d scalar) is read at `offs % numel`; anything else is
    expanded and copied (rare: e.g. broadcasting over a middle dim).
    """
    n = 1
    for s in shape:
        n *= s
    tensors, inners, bcast = [], [], []
    for x in inputs:
        if tuple(x.shape) == tuple(shape):
            x = x.contiguous()
            tensors.append(x)
            inners.append(max(n, 1))
            bcast.append(False)
            continue
        dims = list(x.shape)
        while dims and dims[0] == 1:
            dims.pop(0)
        if x.is_contiguous() and tuple(dims) == tuple(shape[len(shape) - len(dims) :]):
            tensors.append(x)
            inners.append(max(x.numel(), 1))
            bcast.append(True)
        else:
            tensors.append(x.expand(shape).contiguous())
            inners.append(max(n, 1))
            bcast.append(False)
    return tensors, inners, bcast


def pointwise_block(n: int) -> int:
    """Elements per program: large under the interpreter (few, vectorised programs)."""
    cap = 1 << 12 if interpreting() else 1024
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def row_blocks(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for a row kernel: a whole row per tile, several rows if small."""
    block_c = max(16, triton.next_power_of_2(cols))
    budget = 4096 // block_c
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), budget))
    return block_r, block_c


def num_warps(tile_elements: int) -> int:
    """Warps per program on a GPU: more for big tiles (a whole 8192-wide row), so fewer
    values spill out of registers. The interpreter ignores it."""
    if tile_elements <= 2048:
        return 4
    return 8 if tile_elements <= 8192 else 16


def reduce_grad(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full-shape gradient summed to the shape (and cast to the dtype) of `like`."""
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad.to(like.dtype)
