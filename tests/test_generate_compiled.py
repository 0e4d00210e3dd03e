"""generate runs ahead-of-time compiled step graphs by default (runtime/compiled_code.py).

The oracle is the portable FX step graphs: greedy tokens of the compiled path equal them
token for token (fp32), for a left-padded batch and a single prompt. The compiled packages
are cached on disk: a second process loads them without compiling. Where compiling fails,
one warning names why and the portable graphs serve; Strategy(compiled_code=False) and
$STRATO_COMPILED_CODE=0 keep them without compiling. The suite runs with
STRATO_COMPILED_CODE=0 (tests/conftest.py); these tests set what they test. Compiling the
two step graphs of a 2-layer Llama takes about 1-2 minutes on 2 busy cores, so the tests
that compile are slow; the rest run in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import strato
from strato.runtime.compiled_code import CompiledStep, packages_dir
from strato.runtime.generate import Generator
from tests.hf_models import hf_model

VOCAB = 100


def llama():
    return hf_model("llama").eval()


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5], mask[2, :2] = 0, 0
    return ids.masked_fill(mask == 0, 0), mask


def hf_generate(model, ids, mask, new_tokens):
    """transformers' greedy generate: the oracle the portable graphs equal (test_generate.py)."""
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )


def test_compiled_code_is_the_default_and_opted_out_by_strategy_or_environment(monkeypatch):
    monkeypatch.delenv("STRATO_COMPILED_CODE", raising=False)
    model = llama()
    assert Generator(model).compiled_code
    assert not Generator(model, strato.Strategy(compiled_code=False)).compiled_code
    monkeypatch.setenv("STRATO_COMPILED_CODE", "0")
    assert not Generator(model).compiled_code
    assert Generator(model, strato.Strategy(compiled_code=True)).compiled_code
    with pytest.raises(strato.StrategyError, match="Strategy.compiled_code"):
        strato.Strategy(compiled_code="yes")


def test_a_failed_compile_warns_once_and_serves_the_portable_graphs(monkeypatch, tmp_path):
    monkeypatch.delenv("STRATO_COMPILED_CODE", raising=False)
    monkeypatch.setenv("STRATO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no C++ compiler to be found
    monkeypatch.delenv("CXX", raising=False)
    model = llama()
    ids, mask = padded_prompts()
    served = strato.compile(model, example_kwargs={"input_ids": ids[:1], "use_cache": False})
    with pytest.warns(RuntimeWarning, match="portable step graphs: no C\\+\\+ compiler"):
        tokens = served.generate(ids, 6, attention_mask=mask, eos_token_id=[])
    runner = vars(served)["_generator"]
    assert runner.compiled_steps() == {}
    with warnings.catch_warnings():  # said once: the next call neither retries nor warns
        warnings.simplefilter("error", RuntimeWarning)
        again = served.generate(ids, 6, attention_mask=mask, eos_token_id=[])
    assert torch.equal(tokens, again)
    assert torch.equal(tokens, hf_generate(model, ids, mask, 6))
    assert not any(tmp_path.rglob("*.pt2"))


SECOND_PROCESS = """
import sys, warnings, torch
sys.path.insert(0, sys.argv[1])
from tests.hf_models import hf_model  # not conftest: it turns compiled code off
import strato
model = hf_model("llama").eval()
ids = torch.tensor(eval(sys.argv[2]))
served = strato.compile(model, example_kwargs={"input_ids": ids[:1], "use_cache": False})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = served.generate(ids, 6, eos_token_id=[])
notes = [str(w.message) for w in caught if "compiling generate" in str(w.message)]
runner = vars(served)["_generator"]
print(type(runner.compiled_steps()["decode"]).__name__, len(notes))
print(out.tolist())
"""


@pytest.mark.slow  # compiles the two step graphs once (1-2 minutes on 2 busy cores)
@pytest.mark.timeout(1200)
def test_compiled_steps_equal_the_portable_graphs_and_a_second_process_hits_the_cache(
    monkeypatch, tmp_path
):
    monkeypatch.delenv("STRATO_COMPILED_CODE", raising=False)
    monkeypatch.setenv("STRATO_CACHE_DIR", str(tmp_path))
    model = llama()
    ids, mask = padded_prompts()
    served = strato.compile(model, example_kwargs={"input_ids": ids[:1], "use_cache": False})
    portable = strato.compile(
        model, strato.Strategy(compiled_code=False), example_kwargs={"input_ids": ids[:1]}
    )
    with pytest.warns(UserWarning, match=f"compiling generate's prefill and decode.*{tmp_path}"):
        tokens = served.generate(ids, 12, attention_mask=mask, eos_token_id=[])
    steps = vars(served)["_generator"].compiled_steps()
    assert sorted(steps) == ["decode", "prefill"]
    assert all(isinstance(s, CompiledStep) for s in steps.values())
    assert torch.equal(tokens, portable.generate(ids, 12, attention_mask=mask, eos_token_id=[]))
    single = ids[1:2, 3:]  # batch 1, another prompt length
    assert torch.equal(
        served.generate(single, 20, eos_token_id=[]), portable.generate(single, 20, eos_token_id=[])
    )
    packages = sorted(packages_dir().glob("*.pt2"))
    assert [p.name.split("-")[0] for p in packages] == ["decode", "prefill"]

    env = {k: v for k, v in os.environ.items() if k != "STRATO_COMPILED_CODE"}
    proc = subprocess.run(
        [sys.executable, "-c", SECOND_PROCESS, os.getcwd(), str(ids[1:].tolist())],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    kind, notes = proc.stdout.splitlines()[-2].split()
    assert (kind, notes) == ("CompiledStep", "0")  # loaded from the cache: no compile note
    expected = portable.generate(ids[1:], 6, eos_token_id=[])
    assert eval(proc.stdout.splitlines()[-1]) == expected.tolist()
    assert sorted(packages_dir().glob("*.pt2")) == packages
