"""strato.export / strato.load: bit-identical reload in a fresh process (quantized, fused, and
quantized + fused graphs), refusal of bad files and of edited kernels."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import strato
from examples.gpt import GPT
from tests.conftest import TINY_GPT, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny GPT compiled with int4 weights (tied LM head), exported; inputs and outputs."""
    torch.manual_seed(0)
    model = GPT(TINY_GPT).eval()
    ids = torch.randint(0, TINY_GPT.vocab_size, (3, TINY_GPT.seq_len))
    quantize = strato.Quantize(weights="int4", group_size=32, symmetric=False)
    engine = strato.compile(model, strato.Strategy(quantize=quantize), example_inputs=(ids,))
    path = tmp_path_factory.mktemp("export") / "gpt.strato"
    strato.export(engine, path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fresh process below runs with one thread too
    try:
        with torch.no_grad():
            expected = engine(ids)
    finally:
        torch.set_num_threads(threads)
    return path, ids, expected


def test_load_in_fresh_process_is_bit_identical(exported, tmp_path):
    path, ids, expected = exported
    save_file({"ids": ids}, tmp_path / "inputs.safetensors")
    script = (
        "import sys, torch, strato\n"
        "from safetensors.torch import load_file, save_file\n"
        "torch.set_num_threads(1)\n"
        "served = strato.load(sys.argv[1])\n"
        "ids = load_file(sys.argv[2])['ids']\n"
        "save_file({'out': served(ids)}, sys.argv[3])\n"
        "assert 'examples.gpt' not in sys.modules, 'loading needed the model source'\n"
    )
    out_file = tmp_path / "out.safetensors"
    subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(path),
            str(tmp_path / "inputs.safetensors"),
            str(out_file),
        ],
        check=True,
        cwd=tmp_path,  # not the checkout: nothing of the model's source is importable there
        timeout=120,
    )
    got = load_file(out_file)["out"]
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_artifact_is_small_and_documents_itself(exported):
    path, ids, _ = exported
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["graph.json", "manifest.json", "weights.safetensors"]
        manifest = json.loads(zf.read("manifest.json"))
        graph = json.loads(zf.read("graph.json"))
    assert manifest["quantize"]["scheme"].startswith("int4 g32 asym")
    targets = {n.get("target") for n in graph["nodes"] if n["op"] == "call_function"}
    assert "strato::quant_linear_int4" in targets and "aten::linear" not in targets
    served = strato.load(path)
    assert served.quantization["bytes_after"] < served.quantization["bytes_before"] / 4
    # One artifact serves other batch sizes and lengths, up to the model's length bound.
    assert served(ids[:2, :5]).shape == (2, 5, TINY_GPT.vocab_size)
    too_long = torch.randint(0, TINY_GPT.vocab_size, (1, TINY_GPT.seq_len + 1))
    with pytest.raises(strato.InputError, match=r"input 'idx' must be int64\[.*\]: dim 1 is 17"):
        served(too_long)


def _rewrite(src: Path, dst: Path, change) -> None:
    with zipfile.ZipFile(src) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    change(members)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_corrupted_artifacts_are_refused(exported, tmp_path):
    path, _, _ = exported
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped byte in the middle of the weights
    flipped = tmp_path / "flipped.strato"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(strato.ArtifactError, match="corrupted"):
        strato.load(flipped)

    def edit_weights(members):
        tensors = {k: v.clone() for k, v in _tensors(members).items()}
        first = sorted(tensors)[0]
        tensors[first].view(-1)[0] += 1
        from safetensors.torch import save

        members["weights.safetensors"] = save(tensors)

    edited = tmp_path / "edited.strato"
    _rewrite(path, edited, edit_weights)
    with pytest.raises(
        strato.ArtifactError, match="weights.safetensors is corrupted or was modified"
    ):
        strato.load(edited)

    truncated = tmp_path / "truncated.strato"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(strato.ArtifactError, match="not a Strato inference artifact"):
        strato.load(truncated)


def _tensors(members):
    from safetensors.torch import load

    return load(members["weights.safetensors"])


def test_pickle_payloads_and_foreign_ops_are_refused(exported, tmp_path):
    path, _, _ = exported
    checkpoint = tmp_path / "model.pt"
    torch.save(GPT(TINY_GPT).state_dict(), checkpoint)
    with pytest.raises(strato.ArtifactError, match="pickle"):
        strato.load(checkpoint)

    smuggled = tmp_path / "smuggled.strato"
    _rewrite(path, smuggled, lambda m: m.update({"data.pkl": b"\x80\x04cos\nsystem\n."}))
    with pytest.raises(strato.ArtifactError, match="pickle"):
        strato.load(smuggled)

    # A forged graph with a consistent manifest still cannot name code outside the allow-list.
    def forge(members):
        graph = json.loads(members["graph.json"])
        node = next(n for n in graph["nodes"] if n["op"] == "call_function")
        node["target"] = "builtins.exec"
        members["graph.json"] = json.dumps(graph).encode()
        manifest = json.loads(members["manifest.json"])
        manifest["files"]["graph.json"] = hashlib.sha256(members["graph.json"]).hexdigest()
        members["manifest.json"] = json.dumps(manifest).encode()

    forged = tmp_path / "forged.strato"
    _rewrite(path, forged, forge)
    with pytest.raises(strato.ArtifactError, match="'builtins.exec' is not allowed"):
        strato.load(forged)


def test_export_refuses_non_compiled_models(tmp_path):
    with pytest.raises(TypeError, match="compiled model"):
        strato.export(GPT(TINY_GPT), tmp_path / "x.strato")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------- fused graphs


@pytest.fixture(scope="module")
def fused_exported(tmp_path_factory):
    """A fused GPT and an int8 + fused Hugging Face Llama, exported, with their inputs and
    in-process outputs (one thread, as in the fresh process)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fused")
    gpt = GPT(TINY_GPT).eval()
    ids = torch.randint(0, TINY_GPT.vocab_size, (3, TINY_GPT.seq_len))
    fused = strato.compile(gpt, strato.Strategy(fuse=True), example_inputs=(ids,))
    llama = tiny_llama().eval()
    llama_ids = torch.randint(0, 100, (2, 8))
    quantized = strato.compile(
        llama,
        strato.Strategy(fuse=True, quantize=strato.Quantize(weights="int8")),
        example_kwargs={"input_ids": llama_ids, "use_cache": False},
    )
    assert fused.kernels() and quantized.kernels()
    strato.export(fused, folder / "fused.strato")
    strato.export(quantized, folder / "quantized_fused.strato")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            expected = {
                "fused": fused(ids),
                "quantized_fused": quantized(input_ids=llama_ids, use_cache=False).logits,
            }
    finally:
        torch.set_num_threads(threads)
    save_file({"ids": ids, "llama_ids": llama_ids}, folder / "inputs.safetensors")
    return folder, expected, {"fused": fused, "quantized_fused": quantized}


def test_fused_graphs_load_in_fresh_process_with_their_kernels(fused_exported, tmp_path):
    folder, expected, compiled = fused_exported
    for name, engine in compiled.items():
        with zipfile.ZipFile(folder / f"{name}.strato") as zf:
            kernels = {n for n in zf.namelist() if n.startswith("kernels/")}
        ops = {r["kernel"].removeprefix("strato::") for r in engine.kernels()}
        assert kernels == {f"kernels/{op}.py" for op in ops if not op.startswith("attention")}
    script = (
        "import sys, torch, strato\n"
        "from safetensors.torch import load_file, save_file\n"
        "torch.set_num_threads(1)\n"
        "folder = sys.argv[1]\n"
        "inputs = load_file(folder + '/inputs.safetensors')\n"
        "fused = strato.load(folder + '/fused.strato')\n"
        "quantized = strato.load(folder + '/quantized_fused.strato')\n"
        "out = quantized(input_ids=inputs['llama_ids'], use_cache=False)\n"
        "save_file({'fused': fused(inputs['ids']), 'quantized_fused': out['logits']}, sys.argv[2])\n"
        "for module in ('examples.gpt', 'transformers'):\n"
        "    assert module not in sys.modules, f'loading imported {module}'\n"
    )
    out_file = tmp_path / "out.safetensors"
    subprocess.run(
        [sys.executable, "-c", script, str(folder), str(out_file)],
        check=True,
        cwd=tmp_path,  # not the checkout: nothing of the models' source is importable there
        timeout=300,
        env={**os.environ, "STRATO_CACHE_DIR": str(tmp_path / "cache")},  # an empty cache
    )
    got = load_file(out_file)
    for name, want in expected.items():
        assert torch.equal(got[name], want), name


def test_edited_kernels_are_refused_naming_the_file(fused_exported, tmp_path):
    folder, _, _ = fused_exported
    path = folder / "fused.strato"
    with zipfile.ZipFile(path) as zf:
        member = next(n for n in zf.namelist() if n.startswith("kernels/"))

    def edit(members):
        members[member] = members[member].replace(b"import torch", b"import os, torch", 1)

    def edit_and_rehash(members):
        edit(members)
        manifest = json.loads(members["manifest.json"])
        manifest["files"][member] = hashlib.sha256(members[member]).hexdigest()
        members["manifest.json"] = json.dumps(manifest).encode()

    def drop(members):
        del members[member]

    cases = {
        "edited": (edit, f"{member} is corrupted or was modified"),
        "rehashed": (edit_and_rehash, f"{member}: the source differs from the kernel"),
        "dropped": (drop, "do not match the manifest"),
    }
    for case, (change, message) in cases.items():
        bad = tmp_path / f"{case}.strato"
        _rewrite(path, bad, change)
        with pytest.raises(strato.ArtifactError, match=re.escape(message)):
            strato.load(bad)
