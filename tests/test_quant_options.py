"""Quantize options that do not apply are errors naming them; calibration is the user's.

Each request that would quietly do nothing (group_size with int8, calibration data nothing
reads, GPTQ without calibration data, a skip glob matching no layer, a model without
linear layers) raises a StrategyError naming the option, and compiles nothing. GPTQ
calibrates once per model on the user's batches (an iterable), and every graph of the
model (forward, generate's prefill and decode) quantizes each weight from the same numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from conftest import tiny_llama

import strato
from strato.kernels import quantized_linear as ql
from strato.passes import quantize_calibration


def test_options_that_do_not_apply_are_errors_naming_them():
    with pytest.raises(
        strato.StrategyError, match=r"Quantize.group_size: applies to weights='int4'"
    ):
        strato.Quantize(weights="int8", group_size=64)
    with pytest.raises(strato.StrategyError, match="Quantize.calibration: only method='gptq'"):
        strato.Quantize(weights="int4", calibration=[torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(strato.StrategyError, match="Quantize.calibration: method='gptq' needs"):
        strato.Quantize(weights="int4", method="gptq")
    with pytest.raises(strato.StrategyError, match="got one tensor"):
        strato.Quantize(weights="int4", method="gptq", calibration=torch.zeros(2, 4))
    assert strato.Quantize(weights="int4").int4_group_size == 128
    config = strato.Quantize(weights="int4", group_size=32, skip=["lm_head"])
    assert strato.Strategy.from_yaml(strato.Strategy(quantize=config).to_yaml()).quantize == config


def test_skip_glob_matching_nothing_and_models_without_linears_are_refused():
    model = tiny_llama().eval()
    ids = torch.randint(0, 100, (2, 6))
    typo = strato.Strategy(quantize=strato.Quantize(weights="int8", skip=["lm_haed"]))
    with pytest.raises(strato.StratoError, match=r"Quantize.skip: 'lm_haed' matches no.*'lm_head'"):
        strato.compile(model, typo, example_kwargs={"input_ids": ids, "use_cache": False})
    conv = nn.Sequential(nn.Conv1d(4, 4, 3), nn.ReLU()).eval()
    with pytest.raises(strato.StratoError, match="Strategy.quantize: Sequential has no linear"):
        strato.compile(
            conv,
            strato.Strategy(quantize=strato.Quantize(weights="int8")),
            example_inputs=(torch.randn(2, 4, 8),),
        )
    everything = strato.Strategy(quantize=strato.Quantize(weights="int8", skip=["*"]))
    with pytest.warns(UserWarning, match="every linear layer .* nothing is quantized"):
        strato.compile(model, everything, example_kwargs={"input_ids": ids, "use_cache": False})


class Batches:
    """An iterable of calibration batches that counts how often it is read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


def test_gptq_calibrates_once_on_the_users_batches_for_every_graph():
    model = tiny_llama(hidden_size=64, intermediate_size=128, max_position_embeddings=64).eval()
    g = torch.Generator().manual_seed(1)
    batches = Batches([torch.randint(0, 100, (2, 16), generator=g) for _ in range(3)])
    config = strato.Quantize(
        weights="int4", group_size=32, method="gptq", calibration=batches, skip=["lm_head"]
    )
    ids = torch.randint(0, 100, (2, 8))
    compiled = strato.compile(
        model,
        strato.Strategy(quantize=config),
        example_kwargs={"input_ids": ids, "use_cache": False},
    )
    out = compiled.generate(ids, 4, eos_token_id=[])
    assert out.shape == (2, 12)
    assert batches.reads == 1  # the forward graph calibrated; prefill and decode reused it
    forward = compiled.context.records["quantize"]
    decode = compiled._generator.graph(1).context.records["quantize"]
    assert set(decode["layers"]) == set(forward["layers"])  # paths without generate's prefix
    assert "lm_head" in decode["skipped"] and "lm_head" in forward["skipped"]
    # The same packed tensors in every graph (GPTQ ran once per weight).
    name = "model.layers.0.mlp.down_proj"
    fwd_buf = forward["layers"][name]["buffers"]["qweight"]
    dec_buf = decode["layers"][name]["buffers"]["qweight"]
    assert getattr(compiled.graph, fwd_buf) is getattr(compiled._generator.graph(1).graph, dec_buf)
    # GPTQ used the batches: its codes differ from round-to-nearest on the same weight.
    weight = model.model.layers[0].mlp.down_proj.weight
    rtn = ql.quantize_int4(weight, group_size=32)
    assert not torch.equal(getattr(compiled.graph, fwd_buf), rtn.qweight)
    hessians = quantize_calibration._statistics[model]
    assert len(hessians) == 1


def test_smoothquant_without_calibration_warns_that_it_uses_the_example():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    config = strato.Quantize(weights="int8", activations="int8")
    with pytest.warns(UserWarning, match="Quantize.calibration is None"):
        strato.compile(
            model, strato.Strategy(quantize=config), example_inputs=(torch.randn(4, 16),)
        )


def test_load_of_missing_or_foreign_files_says_what_it_is(tmp_path):
    with pytest.raises(strato.ArtifactError, match="does not exist"):
        strato.load(tmp_path / "missing.strato")
    with pytest.raises(strato.ArtifactError, match="is a folder"):
        strato.load(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(strato.ArtifactError, match="not a Strato inference artifact"):
        strato.load(text)


def _serve_quality():
    """bench/serve_quality.py as a module (bench scripts import their siblings by name)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("serve_quality", bench / "serve_quality.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    return module


def test_quality_bench_evaluates_on_tokens_it_never_calibrated_on():
    sq = _serve_quality()
    split = sq.text_split(
        10_000, calibration_sequences=4, calibration_len=256, windows=3, window=512
    )
    calibrated = {t for a, b in split["calibration"] for t in range(a, b)}
    evaluated = {t for a, b in split["evaluation"] for t in range(a, b)}
    assert len(calibrated) == 4 * 256 and len(evaluated) == 3 * 512
    assert not calibrated & evaluated
    # An explicit evaluation offset before the calibration slice is fine when disjoint ...
    before = sq.text_split(
        10_000,
        calibration_sequences=2,
        calibration_len=256,
        windows=2,
        window=512,
        calibration_offset=4096,
        eval_offset=0,
    )
    assert before["evaluation"][-1][1] <= before["calibration"][0][0]
    # ... and refused when it overlaps, or runs past the text.
    with pytest.raises(ValueError, match=r"evaluation tokens \[512, 1536\) overlap calibration"):
        sq.text_split(
            10_000,
            calibration_sequences=4,
            calibration_len=256,
            windows=2,
            window=512,
            eval_offset=512,
        )
    with pytest.raises(ValueError, match="the text has 2000 tokens"):
        sq.text_split(2000, calibration_sequences=4, calibration_len=256, windows=2, window=512)
    tokens = torch.arange(10_000)
    windows = sq.slices(tokens, split["evaluation"])
    assert windows[0].shape == (1, 512) and int(windows[0][0, 0]) == 1024


def test_llama_cpp_rows_pool_every_windows_tokens_into_one_perplexity():
    sq = _serve_quality()
    result = {"window_nll": [10.0, 20.0], "window_tokens": [4, 6], "eval_s": 1.5, "head": "x"}
    row = sq.llama_cpp_row("Q4_1", result)
    assert row["system"] == "llama.cpp Q4_1" and row["perplexity"] == pytest.approx(math.e**3)
    assert row["head"] == "x" and "window_nll" not in row
    assert sq.llama_cpp_row("Q8_0", {"skipped": "why"}) == {
        "system": "llama.cpp Q8_0",
        "skipped": "why",
    }
    assert (
        "malformed"
        in sq.llama_cpp_row("F32", {"window_nll": [1.0], "window_tokens": []})["skipped"]
    )


def test_gptq_on_a_tiny_llama_lowers_held_out_error_against_rounding():
    """Calibrated on one slice of a token stream, scored on a disjoint one: GPTQ's logits
    stay closer to fp32 than round-to-nearest at the same group size."""
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=64, intermediate_size=128, max_position_embeddings=64).eval()
    # A stream with structure (a repeating random phrase, perturbed), so layer inputs correlate.
    g = torch.Generator().manual_seed(3)
    phrase = torch.randint(0, 100, (24,), generator=g)
    stream = phrase.repeat(32)
    noise = torch.rand(stream.shape, generator=g) < 0.2
    stream[noise] = torch.randint(0, 100, (int(noise.sum()),), generator=g)
    calibration = [stream[i : i + 64][None] for i in range(0, 256, 64)]
    held_out = [stream[i : i + 64][None] for i in range(512, 768, 64)]
    ids = held_out[0]
    example = {"input_ids": ids, "use_cache": False}

    def held_out_error(quantize):
        compiled = strato.compile(model, strato.Strategy(quantize=quantize), example_kwargs=example)
        with torch.no_grad():
            return sum(
                (compiled(input_ids=x, use_cache=False).logits - model(input_ids=x).logits)
                .pow(2)
                .mean()
                for x in held_out
            )

    rtn = held_out_error(strato.Quantize(weights="int4", group_size=32))
    gptq = held_out_error(
        strato.Quantize(weights="int4", group_size=32, method="gptq", calibration=calibration)
    )
    assert gptq < 0.8 * rtn, (float(gptq), float(rtn))
