"""GPTQ (Frantar et al. 2022) for int4 group-wise weights, on many layers at once.

GPTQ quantizes the columns of a weight one at a time and spreads each column's rounding
error over the columns still to come, weighted by the inverse Hessian of the layer's
inputs. That loop is sequential in the input dimension and each step is a handful of
small tensor ops, so on CPU it is bound by per-op overhead, not arithmetic: layers of one
shape (the same projection of every decoder layer) run stacked as one batch, so each
column step is one set of ops for all of them. Columns are taken in blocks of `BLOCK`
("lazy batch" updates): inside a block each step updates only the block's columns, and
the block's errors reach the later columns as one matrix product.
"""

from __future__ import annotations

import torch

from . import quantized_linear as ql

BLOCK = 32
"""Columns per lazy-batch block (more: fewer matrix products, but each column step then
updates more rows elementwise; 32 was fastest on CPU for K = 576..1536, N = 576..49152)."""

BATCH_ELEMENTS = 1 << 24
"""Layers are stacked up to about this many weight elements per batch (the batch holds
the weights, their per-column scales and codes: a few times this in bytes)."""


def inverse_hessian_factor(h: torch.Tensor) -> torch.Tensor:
    """U upper triangular with U^T U = h^-1, for a batch of SPD [K, K] matrices.

    With P the reversal permutation and P h P = L L^T, h^-1 = (P L^-1 P)^T (P L^-1 P), and
    P L^-1 P is upper triangular: one Cholesky and one triangular solve (GPTQ's reference
    takes two Cholesky factorisations and an inverse).
    """
    low, info = torch.linalg.cholesky_ex(h.flip(-2, -1))
    if bool((info != 0).any()) and h.dtype != torch.float64:  # fp32 lost definiteness
        return inverse_hessian_factor(h.double()).to(h.dtype)
    eye = torch.eye(h.shape[-1], dtype=h.dtype).repeat(*h.shape[:-2], 1, 1)
    return torch.linalg.solve_triangular(low, eye, upper=False).flip(-2, -1)


def gptq_int4(
    weights: torch.Tensor, hessians: torch.Tensor, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on a batch of [B, N, Kp] fp32 weights with [B, K, K] input Hessians (K <= Kp:
    the padded columns get an identity); returns codes [B, N, Kp] (uint8 in [0, 15]) and
    scales, zeros [B, N, Kp // group_size].

    Group scales are fixed up front (MSE-clipped on the original weights), then columns go
    in order of decreasing Hessian diagonal ("act order": the columns that see the largest
    inputs first), each one's error compensated on the columns still to come.
    """
    b, n, kp = weights.shape
    k = hessians.shape[-1]
    h = torch.eye(kp, dtype=torch.float64).repeat(b, 1, 1)
    h[:, :k, :k] = hessians.double()
    w = weights.float().clone()
    diag = h.diagonal(dim1=1, dim2=2)
    dead = diag == 0  # inputs that were always zero: their weights never matter
    diag.masked_fill_(dead, 1.0)
    w.masked_fill_(dead[:, None, :], 0.0)
    scales, zeros = ql._int4_qparams_mse(w.view(b * n, kp // group_size, group_size), symmetric)
    scales, zeros = scales.view(b, n, -1), zeros.view(b, n, -1)
    order = torch.argsort(diag, dim=1, descending=True)  # [B, Kp]
    rows = torch.arange(b)[:, None]
    h = torch.stack([m.index_select(0, o).index_select(1, o) for m, o in zip(h.float(), order)])
    # Dampening of 10% of the mean diagonal (GPTQ's default is 1%): calibration sets are
    # often small next to K, so the Hessian estimate is noisy. Chosen on all-MiniLM-L6-v2
    # calibrated with 30 sentences (0.3%, 1%, 5%, 10% tried; 10% best on the test sentences).
    h.diagonal(dim1=1, dim2=2).add_(ql.GPTQ_DAMPING * h.diagonal(dim1=1, dim2=2).mean(1, True))
    hinv = inverse_hessian_factor(h)
    # Columns as rows: [B, Kp, N] in act order, with each column's group scale alongside.
    w_t = w.transpose(1, 2)[rows, order].contiguous()
    group_of = order // group_size
    scales_t = scales.transpose(1, 2)[rows, group_of].contiguous()
    zeros_t = None if symmetric else zeros.transpose(1, 2)[rows, group_of].contiguous()
    codes_t = torch.empty(b, kp, n, dtype=torch.uint8)
    code = torch.empty(b, n)
    err = torch.empty(b, n)
    for b0 in range(0, kp, BLOCK):
        b1 = min(b0 + BLOCK, kp)
        w_block = w_t[:, b0:b1]  # a view: updated in place
        errors = torch.empty_like(w_block)
        hinv_block = hinv[:, b0:b1, b0:b1]
        pivots = hinv_block.diagonal(dim1=1, dim2=2)[..., None]  # [B, block, 1]
        for i in range(b1 - b0):
            column, s = w_block[:, i], scales_t[:, b0 + i]
            # code = clamp(round(w / s + z)); err = (w - (code - z) s) / U_ii
            torch.div(column, s, out=code)
            if zeros_t is None:
                code.round_().clamp_(-8, 7)
                torch.addcmul(column, code, s, value=-1, out=err)
                codes_t[:, b0 + i] = code.add_(8)
            else:
                z = zeros_t[:, b0 + i]
                code.add_(z).round_().clamp_(0, 15)
                codes_t[:, b0 + i] = code
                torch.addcmul(column, code.sub_(z), s, value=-1, out=err)
            err.div_(pivots[:, i])
            errors[:, i] = err
            if i + 1 < b1 - b0:
                w_block[:, i + 1 :].sub_(hinv_block[:, i, i + 1 :, None] * err[:, None, :])
        if b1 < kp:
            w_t[:, b1:].sub_(hinv[:, b0:b1, b1:].transpose(1, 2) @ errors)
    codes = codes_t[rows, torch.argsort(order, dim=1)].transpose(1, 2)
    return codes, scales.float(), zeros.float()


def quantize_int4_gptq(
    weights: list[torch.Tensor],
    hessians: list[torch.Tensor],
    *,
    group_size: int,
    symmetric: bool,
    names: list[str],
) -> list[ql.QuantizedWeight]:
    """GPTQ int4 of each [N, K] weight with its [K, K] input Hessian; weights of one shape
    are quantized together in batches (same result as one at a time, less op overhead)."""
    out: list[ql.QuantizedWeight | None] = [None] * len(weights)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (weight, hessian, name) in enumerate(zip(weights, hessians, names)):
        w = ql._check_weight(weight, name)
        if group_size not in ql.INT4_GROUP_SIZES:
            raise ql.QuantizationError(
                f"{name}: int4 group_size must be one of {ql.INT4_GROUP_SIZES}, got {group_size}"
            )
        if hessian.shape != (w.shape[1], w.shape[1]):
            raise ql.QuantizationError(
                f"{name}: hessian must be [{w.shape[1]}, {w.shape[1]}], got {tuple(hessian.shape)}"
            )
        by_shape.setdefault(tuple(w.shape), []).append(i)
    for (n, k), members in by_shape.items():
        kp = -(-k // group_size) * group_size
        per_batch = max(1, BATCH_ELEMENTS // (n * kp))
        for start in range(0, len(members), per_batch):
            batch = members[start : start + per_batch]
            w = torch.stack([weights[i].detach().float() for i in batch])
            if kp != k:
                w = torch.nn.functional.pad(w, (0, kp - k))
            h = torch.stack([hessians[i] for i in batch])
            codes, scales, zeros = gptq_int4(w, h, group_size, symmetric)
            for j, i in enumerate(batch):
                out[i] = ql.QuantizedWeight(
                    "int4",
                    ql.pack_int4(codes[j]),
                    scales[j].contiguous(),
                    None if symmetric else zeros[j].contiguous(),
                    k,
                    n,
                    group_size=group_size,
                )
    return out  # type: ignore[return-value]
