"""Fused attention softmax(Q Kᵀ · scale + mask) · V: a hand-written Triton kernel, its
torch reference, and the `strato::attention` custom op (fake impl and autograd).

One program handles one (batch, head): the whole T×T score tile lives in registers, so
the kernel fits sequences up to `MAX_SEQ` (the fusion pass leaves longer ones eager).
Scores and probabilities are never written to memory; the backward recomputes them.
Dots run in fp32 (bf16/fp16 inputs are upcast: the interpreter's bf16 tl.dot is wrong,
and fp32 "ieee" keeps fp32 parity on GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backend import kernel_backend
from .launch import launch

MAX_SEQ = 256
MAX_HEAD_DIM = 128


def fits(seq_len: int, head_dim: int) -> bool:
    """Whether one program can hold a (seq_len × seq_len) score tile."""
    return seq_len <= MAX_SEQ and head_dim <= MAX_HEAD_DIM


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """The eager ops the kernel replaces (what the captured graph computed)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask
    return torch.matmul(scores.softmax(dim=-1), v)


@triton.jit
def _scores(
    q_ptr,
    k_ptr,
    m_ptr,
    b,
    h,
    T,
    D,
    scale,
    sq,
    sk,
    sm,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tmask = t < T
    tdmask = tmask[:, None] & (d < D)[None, :]
    q = tl.load(
        q_ptr + b * sq[0] + h * sq[1] + t[:, None] * sq[2] + d[None, :] * sq[3],
        mask=tdmask,
        other=0.0,
    ).to(tl.float32)
    k = tl.load(
        k_ptr + b * sk[0] + h * sk[1] + t[:, None] * sk[2] + d[None, :] * sk[3],
        mask=tdmask,
        other=0.0,
    ).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    if HAS_MASK:
        s += tl.load(
            m_ptr + b * sm[0] + h * sm[1] + t[:, None] * sm[2] + t[None, :] * sm[3],
            mask=tmask[:, None] & tmask[None, :],
            other=0.0,
        ).to(tl.float32)
    s = tl.where(tmask[None, :], s, float("-inf"))
    row_max = tl.where(tmask, tl.max(s, axis=1), 0.0)
    p = tl.exp(s - row_max[:, None])
    p = p / tl.where(tmask, tl.sum(p, axis=1), 1.0)[:, None]
    return q, k, p


@triton.jit
def attention_forward(
    q_ptr,
    k_ptr,
    v_ptr,
    m_ptr,
    o_ptr,
    H,
    T,
    D,
    scale,
    sq0,
    sq1,
    sq2,
    sq3,
    sk0,
    sk1,
    sk2,
    sk3,
    sv0,
    sv1,
    sv2,
    sv3,
    sm0,
    sm1,
    sm2,
    sm3,
    so0,
    so1,
    so2,
    so3,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    _, _, p = _scores(
        q_ptr,
        k_ptr,
        m_ptr,
        b,
        h,
        T,
        D,
        scale,
        (sq0, sq1, sq2, sq3),
        (sk0, sk1, sk2, sk3),
        (sm0, sm1, sm2, sm3),
        HAS_MASK,
        BLOCK_T,
        BLOCK_D,
    )
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tdmask = (t < T)[:, None] & (d < D)[None, :]
    v = tl.load(
        v_ptr + b * sv0 + h * sv1 + t[:, None] * sv2 + d[None, :] * sv3, mask=tdmask, other=0.0
    ).to(tl.float32)
    o = tl.dot(p, v, input_precision="ieee")
    tl.store(
        o_ptr + b * so0 + h * so1 + t[:, None] * so2 + d[None, :] * so3,
        o.to(o_ptr.dtype.element_ty),
        mask=tdmask,
    )


@triton.jit
def attention_backward(
    q_ptr,
    k_ptr,
    v_ptr,
    m_ptr,
    do_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    H,
    T,
    D,
    scale,
    sq0,
    sq1,
    sq2,
    sq3,
    sk0,
    sk1,
    sk2,
    sk3,
    sv0,
    sv1,
    sv2,
    sv3,
    sm0,
    sm1,
    sm2,
    sm3,
    sd0,
    sd1,
    sd2,
    sd3,
    sg0,
    sg1,
    sg2,
    sg3,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    q, k, p = _scores(
        q_ptr,
        k_ptr,
        m_ptr,
        b,
        h,
        T,
        D,
        scale,
        (sq0, sq1, sq2, sq3),
        (sk0, sk1, sk2, sk3),
        (sm0, sm1, sm2, sm3),
        HAS_MASK,
        BLOCK_T,
        BLOCK_D,
    )
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tdmask = (t < T)[:, None] & (d < D)[None, :]
    v = tl.load(
        v_ptr + b * sv0 + h * sv1 + t[:, None] * sv2 + d[None, :] * sv3, mask=tdmask, other=0.0
    ).to(tl.float32)
    do = tl.load(
        do_ptr + b * sd0 + h * sd1 + t[:, None] * sd2 + d[None, :] * sd3, mask=tdmask, other=0.0
    ).to(tl.float32)
    dv = tl.dot(tl.trans(p), do, input_precision="ieee")
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    dq = tl.dot(ds, k, input_precision="ieee") * scale
    dk = tl.dot(tl.trans(ds), q, input_precision="ieee") * scale
    # dq, dk, dv share one layout (strides sg*).
    out = b * sg0 + h * sg1 + t[:, None] * sg2 + d[None, :] * sg3
    tl.store(dq_ptr + out, dq.to(dq_ptr.dtype.element_ty), mask=tdmask)
    tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=tdmask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=tdmask)


def _blocks(t: int, d: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(t)), max(16, triton.next_power_of_2(d))


def _mask_strides(mask: torch.Tensor | None, shape) -> tuple[torch.Tensor | None, list[int]]:
    if mask is None:
        return None, [0, 0, 0, 0]
    mask = mask.expand(shape)
    return mask, list(mask.stride())


def _new_output(q: torch.Tensor) -> torch.Tensor:
    # Laid out (B, T, H, D) and returned as a (B, H, T, D) view, so the usual
    # `.transpose(1, 2).reshape(B, T, H * D)` after attention (and, for the gradients,
    # the `.view(B, T, H, D).transpose(1, 2)` before it) needs no copy.
    b, h, t, d = q.shape
    return q.new_empty(b, t, h, d).transpose(1, 2)


def _run_forward(q, k, v, mask, scale) -> torch.Tensor:
    out = _new_output(q)
    if kernel_backend(q.device) != "triton":
        return out.copy_(attention_reference(q, k, v, mask, scale))
    b, h, t, d = q.shape
    mask, sm = _mask_strides(mask, (b, h, t, t))
    block_t, block_d = _blocks(t, d)
    launch(
        attention_forward,
        (b * h,),
        q,
        k,
        v,
        mask if mask is not None else q,
        out,
        h,
        t,
        d,
        scale,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *sm,
        *out.stride(),
        HAS_MASK=mask is not None,
        BLOCK_T=block_t,
        num_warps=8 if block_t * block_d > 4096 else 4,
        BLOCK_D=block_d,
        written=[out],
    )
    return out


def _run_backward(q, k, v, mask, scale, grad_out, dq, dk, dv, written) -> None:
    """Fill dq, dk, dv (views sharing one layout) with the Triton backward kernel."""
    b, h, t, d = q.shape
    mask, sm = _mask_strides(mask, (b, h, t, t))
    block_t, block_d = _blocks(t, d)
    launch(
        attention_backward,
        (b * h,),
        q,
        k,
        v,
        mask if mask is not None else q,
        grad_out,
        dq,
        dk,
        dv,
        h,
        t,
        d,
        scale,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *sm,
        *grad_out.stride(),
        *dq.stride(),
        HAS_MASK=mask is not None,
        BLOCK_T=block_t,
        num_warps=8 if block_t * block_d > 4096 else 4,
        BLOCK_D=block_d,
        written=written,
    )


def _reference_grads(inputs, mask, mask_needs_grad, scale, grad_out, make_qkv):
    """Gradients by recomputing the reference under autograd; make_qkv(*inputs) -> q, k, v."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in inputs]
        m = mask.detach().requires_grad_(True) if mask_needs_grad else mask
        out = attention_reference(*make_qkv(*leaves), m, scale)
        grads = torch.autograd.grad(out, leaves + ([m] if mask_needs_grad else []), grad_out)
    return list(grads[: len(leaves)]), (grads[-1] if mask_needs_grad else None)


@torch.library.custom_op("strato::attention", mutates_args=())
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q @ kᵀ * scale + mask) @ v for (B, H, T, D) q, k, v."""
    return _run_forward(q, k, v, mask, scale)


@attention.register_fake
def _(q, k, v, mask, scale):
    return _new_output(q)


def _setup(ctx, inputs, output):
    q, k, v, mask, scale = inputs
    ctx.scale = scale
    ctx.mask_needs_grad = mask is not None and mask.requires_grad
    ctx.save_for_backward(q, k, v, mask)


def _backward(ctx, grad_out):
    q, k, v, mask = ctx.saved_tensors
    if kernel_backend(q.device) != "triton" or ctx.mask_needs_grad:
        (dq, dk, dv), dmask = _reference_grads(
            [q, k, v], mask, ctx.mask_needs_grad, ctx.scale, grad_out, lambda *x: x
        )
        return dq, dk, dv, dmask, None
    dq, dk, dv = (_new_output(x) for x in (q, k, v))
    _run_backward(q, k, v, mask, ctx.scale, grad_out, dq, dk, dv, written=[dq, dk, dv])
    return dq, dk, dv, None, None


attention.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------- packed q, k, v
# When q, k and v are views of one tensor (a fused qkv projection split into heads),
# taking that tensor and the views' layouts lets the backward write one gradient
# buffer in place, instead of three that autograd then copies and concatenates.


def _views(qkv: torch.Tensor, layouts: list[int], heads: list[int]) -> list[torch.Tensor]:
    """q, k, v as strided views of `qkv`; layouts holds (offset, 4 strides) per view."""
    size = (qkv.shape[0], *heads)
    return [
        qkv.as_strided(size, layouts[5 * i + 1 : 5 * i + 5], qkv.storage_offset() + layouts[5 * i])
        for i in range(3)
    ]


def covers_exactly(numel_per_batch: int, layouts: list[int], heads: list[int]) -> bool:
    """Whether the three views tile each batch element of the base exactly once."""
    base = torch.arange(numel_per_batch)
    seen = torch.cat(
        [
            base.as_strided(heads, layouts[5 * i + 2 : 5 * i + 5], layouts[5 * i]).reshape(-1)
            for i in range(3)
        ]
    )
    return seen.numel() == numel_per_batch and bool((seen.sort().values == base).all())


@torch.library.custom_op("strato::attention_packed", mutates_args=())
def attention_packed(
    qkv: torch.Tensor,
    layouts: list[int],
    heads: list[int],
    exact: bool,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention over q, k, v = views of contiguous `qkv` (see `_views`); heads = (H, T, D).
    `exact`: the views cover `qkv` exactly, so its gradient needs no zero fill."""
    return _run_forward(*_views(qkv, layouts, heads), mask, scale)


@attention_packed.register_fake
def _(qkv, layouts, heads, exact, mask, scale):
    return _new_output(_views(qkv, layouts, heads)[0])


def _setup_packed(ctx, inputs, output):
    qkv, layouts, heads, exact, mask, scale = inputs
    ctx.layouts, ctx.heads, ctx.exact, ctx.scale = layouts, heads, exact, scale
    ctx.mask_needs_grad = mask is not None and mask.requires_grad
    ctx.save_for_backward(qkv, mask)


def _backward_packed(ctx, grad_out):
    qkv, mask = ctx.saved_tensors
    if kernel_backend(qkv.device) != "triton" or ctx.mask_needs_grad:
        (dqkv,), dmask = _reference_grads(
            [qkv],
            mask,
            ctx.mask_needs_grad,
            ctx.scale,
            grad_out,
            lambda x: _views(x, ctx.layouts, ctx.heads),
        )
        return dqkv, None, None, None, dmask, None
    dqkv = torch.empty_like(qkv) if ctx.exact else torch.zeros_like(qkv)
    q, k, v = _views(qkv, ctx.layouts, ctx.heads)
    dq, dk, dv = _views(dqkv, ctx.layouts, ctx.heads)
    _run_backward(q, k, v, mask, ctx.scale, grad_out, dq, dk, dv, written=[dqkv])
    return dqkv, None, None, None, None, None


attention_packed.register_autograd(_backward_packed, setup_context=_setup_packed)
