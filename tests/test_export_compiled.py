"""Artifacts with ahead-of-time compiled step graphs (strato.export(compiled_code=True)).

The compiled code decodes in a fresh process exactly as the artifact's portable graphs do
(int4 weights: the same CPU GEMV kernels run inside it), and a package edited after export
is refused by its hash before anything loads. AOTInductor compiles for minutes on a busy
2-core machine, so the end-to-end test is slow; the refusals that need no compile are fast.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
import torch

import strato
from examples.gpt import GPT
from tests.conftest import TINY_GPT, tiny_llama

DECODE_IN_NEW_PROCESS = """
import sys, time, torch
torch.set_num_threads(1)
start = time.perf_counter()
import strato
served = strato.load(sys.argv[1], compiled_code=sys.argv[2] == "1")
ids = torch.tensor([[5, 17, 3, 44, 9], [8, 8, 61, 2, 30]])
out = served.generate(ids, 8, eos_token_id=[])
print(type(served.steps["decode"]._run).__name__, time.perf_counter() - start)
print(out.tolist())
"""


def _decode(path, compiled_code: bool):
    proc = subprocess.run(
        [sys.executable, "-c", DECODE_IN_NEW_PROCESS, str(path), str(int(compiled_code))],
        capture_output=True, text=True, cwd=path.parent, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runner, seconds = proc.stdout.splitlines()[-2].split()
    return runner, float(seconds), eval(proc.stdout.splitlines()[-1])


@pytest.mark.slow  # AOTInductor compiles two step graphs: 18 min on 2 cores at load 20
@pytest.mark.timeout(1500)
def test_compiled_code_decodes_as_the_portable_graphs_and_is_verified(tmp_path):
    model = tiny_llama(hidden_size=64, intermediate_size=128, max_position_embeddings=64).eval()
    quantize = strato.Quantize(weights="int4", group_size=32)
    ids = torch.randint(3, 100, (1, 8))
    compiled = strato.compile(
        model, strato.Strategy(quantize=quantize), example_kwargs={"input_ids": ids}
    )
    path = tmp_path / "llama.strato"
    strato.export(compiled, path, compiled_code=True)
    with zipfile.ZipFile(path) as zf:
        assert {"compiled/prefill.pt2", "compiled/decode.pt2"} <= set(zf.namelist())

    runner, seconds, tokens = _decode(path, compiled_code=True)
    portable_runner, _, portable = _decode(path, compiled_code=False)
    assert portable_runner == "GraphModule" and runner != "GraphModule"
    assert tokens == portable
    prompt = torch.tensor([[5, 17, 3, 44, 9], [8, 8, 61, 2, 30]])
    assert tokens == compiled.generate(prompt, 8, eos_token_id=[]).tolist()
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
