"""Codegen plumbing: template rendering errors, the on-disk kernel cache, the backend switch."""

from __future__ import annotations

import pytest
import torch

from strato.codegen import cache
from strato.codegen.generate import kernel_source
from strato.codegen.region import Ref, Region, RegionOp
from strato.codegen.render import CodegenError, render_template, template_names
from strato.kernels.backend import KernelBackendError, kernel_backend

aten = torch.ops.aten


def test_templates_are_listed():
    assert {"pointwise.py.j2", "row_reduction.py.j2", "cross_entropy.py.j2"} <= set(
        template_names()
    )


def test_missing_parameter_names_template_region_and_variable():
    with pytest.raises(CodegenError) as exc:
        render_template("pointwise.py.j2", region="blocks.0.mlp:gelu", region_name="x")
    msg = str(exc.value)
    assert "pointwise.py.j2" in msg and "blocks.0.mlp:gelu" in msg
    assert "undefined" in msg  # names what is missing (jinja: "'...' is undefined")


def test_unknown_template_lists_the_available_ones():
    with pytest.raises(CodegenError, match="no such template.*pointwise.py.j2"):
        render_template("nope.py.j2", region="r")


def test_rendered_source_that_is_not_python_is_an_error():
    region = Region(
        kind="pointwise",
        name="bad-region",
        ops=(RegionOp("a", aten.add.Tensor, (Ref("in0"), Ref("in1"))),),
        n_inputs=2,
        input_dtypes=(torch.float32,) * 2,
        outputs=("a",),
        output_dtypes=(torch.float32,),
    )
    source = kernel_source(region)
    assert "def pointwise_forward" in source and f"pointwise_{region.digest()}" in source
    assert "bad-region" not in source  # sources are named by structure, so regions share them
    with pytest.raises(CodegenError, match="bad-region.*not valid Python"):
        render_template(
            "pointwise.py.j2",
            region="bad-region",
            region_name="r",
            signature="s",
            n_inputs=1,
            outputs=["a"],
            output_dtypes=["torch.float32"],
            forward=["v_a = (("],
            backward=[],
            grad_names=[],
            n_dropout=1,
        )


def test_cache_counts_generated_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATO_CACHE_DIR", str(tmp_path))
    before = cache.cache_stats()
    first = cache.load_kernel_module("VALUE = 1\n", "unit test")
    again = cache.load_kernel_module("VALUE = 1\n", "unit test")
    other = cache.load_kernel_module("VALUE = 2\n", "unit test")
    after = cache.cache_stats()
    assert first is again and first.VALUE == 1 and other.VALUE == 2
    assert after.generated - before.generated == 2
    assert after.reused - before.reused == 1
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("unit_test_") for f in files)


def test_kernel_backend_defaults_and_errors(monkeypatch):
    monkeypatch.delenv("STRATO_KERNELS", raising=False)
    assert kernel_backend("cpu") == "reference"
    assert kernel_backend("cuda") == "triton"
    monkeypatch.setenv("STRATO_KERNELS", "reference")
    assert kernel_backend("cuda") == "reference"
    monkeypatch.setenv("STRATO_KERNELS", "tirton")
    with pytest.raises(KernelBackendError, match="STRATO_KERNELS='tirton'.*triton, reference"):
        kernel_backend("cpu")
    monkeypatch.setenv("STRATO_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelBackendError, match="TRITON_INTERPRET"):
        kernel_backend("cpu")
