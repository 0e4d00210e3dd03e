"""GPTQ (Frantar et al. 2022) for int4 group-wise weights, on many layers at once.

GPTQ quantizes the columns of a weight one at a time and spreads each column's rounding
error over the columns still to come, weighted by the inverse Hessian of the layer's
inputs. That loop is sequential in the input dimension and each step is a handful of
small tensor ops, so on CPU it is bound by per-op overhead, not arithmetic: layers of one
shape (the same projection of every decoder layer) run stacked as one batch, so each
column step is one set of ops for all of them. Columns are taken in blocks of `BLOCK`
("lazy batch" updates): inside a block each column gathers the errors of the block's
earlier columns in one batched product, and the block's errors reach the later columns
as one matrix product.

Group scales are chosen up front on the original weights ("static groups", which lets
columns go in act order) by a clipping search on each group's squared rounding error.
Asymmetric groups keep a fractional zero point (w = (u - z) s with u in [0, 15], i.e. a
float minimum, as llama.cpp's Q4_1 stores), so a group's grid spans exactly its clipped
range instead of one shifted to put zero on a level.
"""

from __future__ import annotations

import torch

from . import quantized_linear as ql

BLOCK = 32
"""Columns per lazy-batch block (more: fewer matrix products, but each column then
gathers more earlier errors; 32 was fastest on CPU for K = 576..1536, N = 576..49152)."""

BATCH_ELEMENTS = 1 << 24
"""Layers are stacked up to about this many weight elements per batch (the batch holds
the weights, their per-column scales and codes: a few times this in bytes)."""

DAMPING = 0.1
"""Added to the Hessian diagonal, as a fraction of its mean (the GPTQ paper uses 0.01).
Calibration sets are small next to K, so the Hessian estimate is noisy: 0.1 beat 0.01 on
SmolLM2-135M with 2048 calibration tokens (held-out perplexity 60.99 against 61.14, int4
g32 symmetric) and on all-MiniLM-L6-v2 with 30 sentences (0.3%, 1%, 5%, 10% tried)."""

CLIP_STEPS = 16
"""Clipping ratios tried per group, evenly from 1.0 (the full range) down to 0.5."""

CLIP_GROUPS = 8192
"""Groups per chunk of the clipping search (its two buffers stay in cache)."""


def group_qparams(groups: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s and zero point z (codes u in [0, 15], w = (u - z) s) of each group (last
    dim) whose range, shrunk by the ratio minimising the group's squared rounding error,
    spans the grid: symmetric [-8 s, 7 s] (z = 8); asymmetric [min, max] (z fractional)."""
    flat = groups.reshape(-1, groups.shape[-1])
    scales, zeros = torch.empty(flat.shape[0]), torch.empty(flat.shape[0])
    for r0 in range(0, flat.shape[0], CLIP_GROUPS):
        chunk = flat[r0 : r0 + CLIP_GROUPS]
        scales[r0 : r0 + CLIP_GROUPS], zeros[r0 : r0 + CLIP_GROUPS] = _clipped_qparams(
            chunk, symmetric
        )
    return scales.view(groups.shape[:-1]), zeros.view(groups.shape[:-1])


def _clipped_qparams(groups: torch.Tensor, symmetric: bool):
    if symmetric:
        extent = groups.abs().amax(dim=-1)
        lo, span = -extent * (8.0 / 7.0), extent * (15.0 / 7.0)
    else:
        lo = groups.amin(dim=-1)
        span = groups.amax(dim=-1) - lo
    best_scales = best_zeros = best_err = None
    scaled = torch.empty_like(groups)
    rounded = torch.empty_like(groups)
    for ratio in torch.linspace(1.0, 0.5, CLIP_STEPS).tolist() if CLIP_STEPS > 1 else [1.0]:
        scales = (span * (ratio / 15.0)).clamp_(min=1e-12)
        zeros = torch.full_like(scales, 8.0) if symmetric else -lo * ratio / scales
        # error of the group in units of s: |clamp(round(g / s + z)) - (g / s + z)|
        torch.addcmul(zeros[:, None], groups, scales.reciprocal()[:, None], out=scaled)
        torch.round(scaled, out=rounded).clamp_(0, 15).sub_(scaled)
        err = torch.linalg.vector_norm(rounded, dim=-1).mul_(scales)
        if best_err is None:
            best_scales, best_zeros, best_err = scales, zeros, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scales = torch.where(better, scales, best_scales)
        best_zeros = torch.where(better, zeros, best_zeros)
    return best_scales, best_zeros


def inverse_hessian_factor(h: torch.Tensor) -> torch.Tensor:
    """U upper triangular with U^T U = h^-1, for a batch of SPD [K, K] matrices.

    With P the reversal permutation and P h P = L L^T, h^-1 = (P L^-1 P)^T (P L^-1 P), and
    P L^-1 P is upper triangular: one Cholesky and one triangular solve (GPTQ's reference
    takes two Cholesky factorisations and an inverse).
    """
    low, info = torch.linalg.cholesky_ex(h.flip(-2, -1))
    if bool((info != 0).any()) and h.dtype != torch.float64:  # fp32 lost definiteness
        return inverse_hessian_factor(h.double()).to(h.dtype)
    eye = torch.eye(h.shape[-1], dtype=h.dtype).expand_as(h)
    return torch.linalg.solve_triangular(low, eye, upper=False).flip(-2, -1)


def gptq_int4(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    group_size: int,
    symmetric: bool,
    *,
    damping: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on a batch of [B, N, Kp] fp32 weights with [B, K, K] input Hessians (K <= Kp:
    the padded columns get an identity); returns codes [B, N, Kp] (uint8 in [0, 15]) and
    scales, zeros [B, N, Kp // group_size].

    Group scales are fixed up front (`group_qparams` on the original weights), then columns
    go in order of decreasing Hessian diagonal ("act order": the columns that see the
    largest inputs first), each one's error compensated on the columns still to come.
    """
    b, n, kp = weights.shape
    k = hessians.shape[-1]
    h = torch.eye(kp).repeat(b, 1, 1)
    h[:, :k, :k] = hessians
    w = weights.float().clone()
    diag = h.diagonal(dim1=1, dim2=2)
    dead = diag == 0  # inputs that were always zero: their weights never matter
    diag.masked_fill_(dead, 1.0)
    w.masked_fill_(dead[:, None, :], 0.0)
    scales, zeros = group_qparams(w.view(b, n, kp // group_size, group_size), symmetric)
    order = torch.argsort(diag, dim=1, descending=True)  # [B, Kp]
    rows = torch.arange(b)[:, None]
    h = h[rows[:, :, None], order[:, :, None], order[:, None, :]]
    diag = h.diagonal(dim1=1, dim2=2)
    diag.add_((DAMPING if damping is None else damping) * diag.mean(1, True))
    hinv = inverse_hessian_factor(h)
    # Columns as rows: [B, Kp, N] in act order, with each column's group scale alongside.
    w_t = w.transpose(1, 2)[rows, order].contiguous()
    group_of = order // group_size
    scales_t = scales.transpose(1, 2)[rows, group_of].contiguous()
    zeros_t = zeros.transpose(1, 2)[rows, group_of].contiguous()
    codes_t = torch.empty(b, kp, n, dtype=torch.uint8)
    errors = torch.empty(b, BLOCK, n)
    column = torch.empty(b, 1, n)
    code = torch.empty(b, n)
    for b0 in range(0, kp, BLOCK):
        b1 = min(b0 + BLOCK, kp)
        hinv_block = hinv[:, b0:b1, b0:b1]
        pivots = hinv_block.diagonal(dim1=1, dim2=2)[..., None]  # [B, block, 1]
        for i in range(b1 - b0):
            # this column after the block's earlier errors: w_i - sum_j<i U_ji err_j
            torch.baddbmm(
                w_t[:, b0 + i, None],
                hinv_block[:, None, :i, i],
                errors[:, :i],
                alpha=-1,
                out=column,
            )
            s, z = scales_t[:, b0 + i], zeros_t[:, b0 + i]
            # code = clamp(round(w / s + z)); err = (w - (code - z) s) / U_ii
            torch.div(column[:, 0], s, out=code)
            code.add_(z).round_().clamp_(0, 15)
            codes_t[:, b0 + i] = code
            err = errors[:, i]
            torch.addcmul(column[:, 0], code.sub_(z), s, value=-1, out=err)
            err.div_(pivots[:, i])
        if b1 < kp:
            w_t[:, b1:].baddbmm_(
                hinv[:, b0:b1, b1:].transpose(1, 2), errors[:, : b1 - b0], alpha=-1
            )
    codes = codes_t[rows, torch.argsort(order, dim=1)].transpose(1, 2)
    return codes, scales, zeros


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
            h = torch.stack([hessians[i].float() for i in batch])
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
