"""Turn a fused Region into Triton source (by filling its template) and a loaded module."""

from __future__ import annotations

import types

import torch

from .cache import load_kernel_module
from .region import PointwiseCode, Ref, Region, row_op_parts
from .render import CodegenError, render_template

TEMPLATES = {
    "pointwise": "pointwise.py.j2",
    "row": "row_reduction.py.j2",
    "cross_entropy": "cross_entropy.py.j2",
}


def _dtype(d: torch.dtype) -> str:
    return str(d)  # 'torch.float32'


def kernel_source(region: Region) -> str:
    """The Triton module source for `region` (forward and backward kernels + wrappers)."""
    template = TEMPLATES.get(region.kind)
    if template is None:
        raise CodegenError(f"region {region.name!r}: no template for kind {region.kind!r}.")
    common = dict(
        region=region.name,
        # Named by structure, not by the graph nodes: equal regions share one source file.
        region_name=f"{region.kind}_{region.digest()}",
        signature=region.signature(),
        output_dtypes=[_dtype(d) for d in region.output_dtypes],
        outputs=list(region.outputs),
        n_dropout=max(region.n_dropout, 1),
    )
    inputs = [f"in{i}" for i in range(region.n_inputs)]
    if region.kind == "pointwise":
        code = PointwiseCode(region.ops)
        names = [op.name for op in region.ops] + inputs
        return render_template(
            template,
            n_inputs=region.n_inputs,
            forward=code.forward,
            backward=code.reverse(set(names)),
            grad_names=names,
            **common,
        )
    if region.kind == "row":
        row = region.op_by_name(region.row_op)
        prologue = tuple(op for op in region.ops if op.name != region.row_op)
        parts = row_op_parts(row.target, row.args, row.kwargs, ndim=2)
        weight = int(parts.weight.name[2:]) if isinstance(parts.weight, Ref) else None
        bias = int(parts.bias.name[2:]) if isinstance(parts.bias, Ref) else None
        params = [i for i in (weight, bias) if i is not None]
        columns = [i for i in region.column_inputs if i not in params]
        others = sorted(params + columns)
        elementwise = [i for i in range(region.n_inputs) if i not in others]
        code = PointwiseCode(prologue)
        names = [op.name for op in prologue] + [f"in{i}" for i in elementwise + columns]
        eps = parts.eps
        if eps is None:
            row_dtype = region.output_dtypes[region.outputs.index(region.row_op)]
            eps = torch.finfo(row_dtype).eps
        return render_template(
            template,
            n_inputs=region.n_inputs,
            elementwise=elementwise,
            others=others,
            columns=columns,
            slots=params + columns,
            weight_input=weight,
            bias_input=bias,
            row_kind=parts.kind,
            row_op=region.row_op,
            row_input=code.var(parts.input),
            row_input_name=parts.input.name,
            eps=repr(float(eps)) if parts.kind in ("layer_norm", "rms_norm") else "0.0",
            forward=code.forward,
            backward=code.reverse(set(names)),
            grad_names=names,
            **common,
        )
    # cross_entropy: the parameters live on the last op (cross_entropy_loss or nll_loss).
    last = region.ops[-1]
    reduction = {1: "mean", 2: "sum"}[last.args[3] if len(last.args) > 3 else 1]
    ignore_index = last.args[4] if len(last.args) > 4 else -100
    return render_template(
        template,
        reduction=reduction,
        ignore_index=int(ignore_index),
        output_dtype=_dtype(region.output_dtypes[0]),
        **common,
    )


def kernel_module(region: Region) -> types.ModuleType:
    """The generated module for `region`, from the on-disk cache when already generated."""
    return load_kernel_module(kernel_source(region), f"{region.kind}_{region.digest()}")
