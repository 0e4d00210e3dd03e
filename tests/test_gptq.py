"""GPTQ (kernels/gptq.py) against a column-by-column reference, its group grids, and the
calibration's shared Hessians (passes/quantize_calibration.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import strato
from strato.kernels import gptq
from strato.kernels import quantized_linear as ql
from strato.passes import quantize_calibration


def reference_gptq(w: torch.Tensor, h: torch.Tensor, scales, zeros, group_size: int):
    """Textbook GPTQ in fp64, one column at a time, no blocks: act order by the Hessian
    diagonal, 1% damping, U = the upper Cholesky factor of H^-1; each column's error
    divided by U_jj is taken off every later column through U's row j."""
    w, h = w.double().clone(), h.double().clone()
    order = torch.argsort(h.diagonal(), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += gptq.DAMPING * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for j in range(w.shape[1]):
        g = int(order[j]) // group_size
        s, z = scales[:, g].double(), zeros[:, g].double()
        q = torch.clamp(torch.round(w[:, j] / s + z), 0, 15)
        codes[:, j] = q.to(torch.uint8)
        err = (w[:, j] - (q - z) * s) / u[j, j]
        w[:, j + 1 :] -= err[:, None] * u[j, j + 1 :][None, :]
    return codes[:, torch.argsort(order)]


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_equals_a_column_by_column_reference(symmetric):
    torch.manual_seed(0)
    k, n = 96, 24  # three blocks of 32 columns
    x = torch.randn(400, k) @ torch.randn(k, k) * 0.3
    h = x.double().t() @ x.double()
    w = torch.randn(n, k)
    codes, scales, zeros = gptq.gptq_int4(w[None], h[None].float(), 32, symmetric)
    expected = reference_gptq(w, h, scales[0], zeros[0], 32)
    same = (codes[0] == expected).float().mean()
    assert same > 0.99, float(same)  # a few codes may sit on a rounding tie in fp32
    if symmetric:
        assert torch.equal(zeros, torch.full_like(zeros, 8.0))


def test_asymmetric_groups_reproduce_a_q4_1_grid_exactly():
    """Weights already on a Q4_1 grid (each group of 32: min + u * d, u in [0, 15]) come
    back exactly: the fractional zero point holds any minimum, and GPTQ has no error to
    spread. An integer zero point (round-to-nearest's) cannot."""
    torch.manual_seed(0)
    n, k = 16, 64
    u = torch.randint(0, 16, (n, k // 32, 32)).float()
    u[..., 0], u[..., 1] = 0, 15  # every group spans its grid
    d = torch.rand(n, k // 32, 1) * 0.1 + 0.01
    low = torch.randn(n, k // 32, 1) * 0.1 - 0.5 * d * 15
    w = (low + u * d).view(n, k)
    x = torch.randn(200, k)
    packed = gptq.quantize_int4_gptq(
        [w], [x.double().t() @ x.double()], group_size=32, symmetric=False, names=["w"]
    )[0]
    torch.testing.assert_close(ql.dequantize(packed), w, atol=1e-6, rtol=0)
    rtn = ql.quantize_int4(w, group_size=32, symmetric=False)
    assert (ql.dequantize(rtn) - w).abs().max() > 1e-3


def test_group_clipping_never_loses_to_the_full_range():
    torch.manual_seed(0)
    groups = torch.randn(300, 32) * torch.rand(300, 1)
    groups[::7, 3] *= 20  # outliers: clipping pays off there
    for symmetric in (True, False):
        scales, zeros = gptq.group_qparams(groups, symmetric)

        def err(s, z):
            q = torch.clamp(torch.round(groups / s[:, None] + z[:, None]), 0, 15)
            return ((q - z[:, None]) * s[:, None] - groups).pow(2).sum(-1)

        if symmetric:
            full = groups.abs().amax(-1) / 7
            full_z = torch.full_like(full, 8.0)
        else:
            full = (groups.amax(-1) - groups.amin(-1)) / 15
            full_z = -groups.amin(-1) / full
        assert (err(scales, zeros) <= err(full, full_z) * (1 + 1e-5)).all()
        assert (err(scales, zeros) < 0.9 * err(full, full_z)).any()


def test_layers_reading_one_input_share_one_hessian_equal_to_their_inputs_xtx():
    model = tiny_llama(hidden_size=64, intermediate_size=128, max_position_embeddings=64).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 100, (2, 12), generator=g) for _ in range(2)]
    seen = {}

    def keep(name):
        def hook(module, args):
            rows = args[0].detach().double().reshape(-1, args[0].shape[-1])
            seen[name] = seen.get(name, 0) + rows.t() @ rows

        return hook

    layer = model.model.layers[0]
    handles = [
        layer.self_attn.q_proj.register_forward_pre_hook(keep("q")),
        layer.mlp.down_proj.register_forward_pre_hook(keep("down")),
    ]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    config = strato.Quantize(weights="int4", group_size=32, method="gptq", calibration=batches)
    strato.compile(
        model,
        strato.Strategy(quantize=config),
        example_kwargs={"input_ids": batches[0], "use_cache": False},
    )
    stats = next(iter(quantize_calibration._statistics[model].values()))
    attn, mlp = layer.self_attn, layer.mlp
    assert stats[attn.q_proj.weight] is stats[attn.k_proj.weight] is stats[attn.v_proj.weight]
    assert stats[mlp.gate_proj.weight] is stats[mlp.up_proj.weight]
    assert stats[attn.q_proj.weight] is not stats[attn.o_proj.weight]
    torch.testing.assert_close(stats[attn.q_proj.weight], seen["q"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats[mlp.down_proj.weight], seen["down"], rtol=1e-5, atol=1e-4)
