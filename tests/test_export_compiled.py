"""Artifacts with ahead-of-time compiled step graphs (by default, runtime/compiled_code.py).

`strato.export` stores the packages `compiled.generate` compiled and cached; `strato.load`
runs them by default. The compiled code decodes in a fresh process exactly as the
artifact's portable graphs do (int4 weights: the same CPU GEMV kernels run inside it), and
a package edited after export is refused by its hash before anything loads; one built for
another torch or CPU is not run (a warning names the difference). AOTInductor compiles for
minutes on a busy 2-core machine, so the end-to-end test is slow; the rest are fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import strato
from examples.gpt import GPT
from strato.runtime.compiled_code import packages_dir
from tests.conftest import TINY_GPT, tiny_llama

DECODE_IN_NEW_PROCESS = """
import sys, time, torch
torch.set_num_threads(1)
start = time.perf_counter()
import strato
served = strato.load(sys.argv[1], **({} if sys.argv[2] == "default" else {"compiled_code": False}))
ids = torch.tensor([[5, 17, 3, 44, 9], [8, 8, 61, 2, 30]])
out = served.generate(ids, 8, eos_token_id=[])
print(type(served.steps["decode"]._run).__name__, time.perf_counter() - start)
print(out.tolist())
"""


def _decode(path, compiled_code: bool):
    """(what runs decode steps, seconds to import + load + 8 tokens, tokens) in a new
    process loading `path` by default, or with compiled_code=False."""
    env = {k: v for k, v in os.environ.items() if k != "STRATO_COMPILED_CODE"}
    how = "default" if compiled_code else "portable"
    proc = subprocess.run(
        [sys.executable, "-c", DECODE_IN_NEW_PROCESS, str(path), how],
        capture_output=True, text=True, cwd=path.parent, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runner, seconds = proc.stdout.splitlines()[-2].split()
    return runner, float(seconds), eval(proc.stdout.splitlines()[-1])


@pytest.mark.slow  # AOTInductor compiles two step graphs: minutes on 2 busy cores
@pytest.mark.timeout(1500)
def test_compiled_code_decodes_as_the_portable_graphs_and_is_verified(tmp_path, monkeypatch):
    monkeypatch.delenv("STRATO_COMPILED_CODE", raising=False)  # the defaults, as users get them
    monkeypatch.setenv("STRATO_CACHE_DIR", str(tmp_path / "cache"))
    model = tiny_llama(hidden_size=64, intermediate_size=128, max_position_embeddings=64).eval()
    quantize = strato.Quantize(weights="int4", group_size=32)
    ids = torch.randint(3, 100, (1, 8))
    compiled = strato.compile(
        model, strato.Strategy(quantize=quantize), example_kwargs={"input_ids": ids}
    )
    prompt = torch.tensor([[5, 17, 3, 44, 9], [8, 8, 61, 2, 30]])
    in_process = compiled.generate(prompt, 8, eos_token_id=[]).tolist()  # compiles, caches
    cached = {p.name.split("-")[0]: p.read_bytes() for p in packages_dir().glob("*.pt2")}
    path = tmp_path / "llama.strato"
    strato.export(compiled, path)  # the cached packages: no second compile
    with zipfile.ZipFile(path) as zf:
        assert {kind: zf.read(f"compiled/{kind}.pt2") for kind in cached} == cached
        assert sorted(cached) == ["decode", "prefill"]

    runner, seconds, tokens = _decode(path, compiled_code=True)
    portable_runner, _, portable = _decode(path, compiled_code=False)
    assert portable_runner == "GraphModule" and runner == "CompiledStep"
    assert tokens == portable == in_process
    print(f"fresh process: import + load + 8 tokens from compiled code in {seconds:.2f} s")

    tampered = tmp_path / "tampered.strato"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tampered, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "compiled/decode.pt2":
                data = data[:-64] + bytes(64)  # the end of the package zeroed
            dst.writestr(name, data)
    with pytest.raises(strato.ArtifactError, match="compiled/decode.pt2 is corrupted or was"):
        strato.load(tampered, compiled_code=True)
    with pytest.raises(strato.ArtifactError, match="compiled/decode.pt2 is corrupted or was"):
        strato.load(tampered)  # the archive is verified whole, whether or not code would run


def test_compiled_code_needs_step_graphs_and_an_artifact_that_has_it(tmp_path):
    model = GPT(TINY_GPT).eval()  # not a Hugging Face causal LM: no step graphs
    ids = torch.randint(0, TINY_GPT.vocab_size, (2, TINY_GPT.seq_len))
    compiled = strato.compile(model, example_inputs=(ids,))
    with pytest.raises(strato.ArtifactError, match="compiled_code=True.*has none"):
        strato.export(compiled, tmp_path / "gpt.strato", compiled_code=True)
    assert not (tmp_path / "gpt.strato").exists()
    strato.export(compiled, tmp_path / "gpt.strato")
    with pytest.raises(strato.ArtifactError, match="holds no compiled code"):
        strato.load(tmp_path / "gpt.strato", compiled_code=True)
    assert torch.equal(strato.load(tmp_path / "gpt.strato")(ids), compiled(ids))


def test_compiled_code_built_for_another_torch_is_not_run(tmp_path, monkeypatch):
    monkeypatch.delenv("STRATO_COMPILED_CODE", raising=False)
    model = tiny_llama(max_position_embeddings=64).eval()
    ids = torch.randint(3, 100, (2, 8))
    compiled = strato.compile(
        model, strato.Strategy(compiled_code=False), example_kwargs={"input_ids": ids}
    )
    portable = tmp_path / "portable.strato"
    strato.export(compiled, portable, compiled_code=False)
    # The same artifact as if exported by another torch: packages that must never load.
    other = tmp_path / "other.strato"
    with zipfile.ZipFile(portable) as src, zipfile.ZipFile(other, "w") as dst:
        manifest = json.loads(src.read("manifest.json"))
        for name in src.namelist():
            if name != "manifest.json":
                dst.writestr(name, src.read(name))
        for kind in ("prefill", "decode"):
            data = b"not a package " + kind.encode()
            dst.writestr(f"compiled/{kind}.pt2", data)
            manifest["files"][f"compiled/{kind}.pt2"] = hashlib.sha256(data).hexdigest()
        manifest["compiled_code"] = {"torch_version": "2.0.0", "cpu": "AVX2"}
        dst.writestr("manifest.json", json.dumps(manifest))
    with pytest.warns(RuntimeWarning, match="built for .*2.0.0.*the portable step graphs serve"):
        served = strato.load(other)
    assert type(served.steps["decode"]._run).__name__ == "GraphModule"
    prompt = torch.tensor([[5, 17, 3, 44, 9]])
    expected = strato.load(portable).generate(prompt, 4, eos_token_id=[])
    assert torch.equal(served.generate(prompt, 4, eos_token_id=[]), expected)
    assert (
        type(strato.load(other, compiled_code=False).steps["decode"]._run).__name__ == "GraphModule"
    )
