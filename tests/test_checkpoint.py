"""Checkpoints: exact resume in a new process, crash-safe saves, clear refusals."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import strato
from strato.runtime import checkpoint
from tests.training_utils import batch, engine_train, tiny_gpt

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(ROOT / "tests" / "training_worker.py")


def run_worker(*args: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, WORKER, *args], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def small_engine(model=None, **strategy):
    x, y = batch(0, 2)
    strategy = {"optimizer": strato.AdamW(lr=3e-3), **strategy}
    return strato.compile(model or tiny_gpt(0), strato.Strategy(**strategy), example_inputs=(x, y))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_in_new_process_is_bit_identical(tmp_path, precision):
    """10 steps in one process == 5 steps + save, then load in a new process + 5 steps:
    identical losses and weights (dropout on, so RNG state must be restored too; fp16
    also restores the loss scale)."""
    straight, first, second = tmp_path / "straight", tmp_path / "first", tmp_path / "second"
    for d in (straight, first, second):
        d.mkdir()
    ckpt = tmp_path / "ckpt"
    common = ["--scenario", "resume", "--precision", precision]
    run_worker("--out", str(straight), *common, "--steps", "10")
    run_worker("--out", str(first), *common, "--steps", "5", "--save", str(ckpt))
    run_worker("--out", str(second), *common, "--steps", "5", "--start", "5", "--load", str(ckpt))
    losses = json.loads((straight / "results.json").read_text())["losses"]
    resumed = json.loads((first / "results.json").read_text())["losses"]
    resumed += json.loads((second / "results.json").read_text())["losses"]
    assert resumed == losses
    a = load_file(str(straight / "weights.safetensors"))
    b = load_file(str(second / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_process_killed_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    ckpt = tmp_path / "ckpt"
    args = ["--out", str(tmp_path), "--scenario", "resume", "--steps", "3", "--save", str(ckpt)]
    run_worker(*args, "--kill-during-save", expect_rc=-9)
    assert (ckpt / "latest").read_text().strip() == "step-00000002"
    assert list(ckpt.glob(".tmp-step-00000003")), "the killed save should have left its temp folder"
    engine = small_engine(tiny_gpt(0, dropout=0.1))
    assert engine.load_checkpoint(ckpt) == 2
    saved = load_file(str(tmp_path / "weights_at_save.safetensors"))
    for name, p in engine.model.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name
    # The next save cleans the leftover up.
    engine_train(engine, steps=1, start=2)
    engine.save_checkpoint(ckpt)
    assert not list(ckpt.glob(".tmp-*"))
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000002", "step-00000003"]


def test_refuses_foreign_and_corrupt_folders(tmp_path):
    engine = small_engine()
    engine_train(engine, steps=1)
    ckpt = tmp_path / "ckpt"
    folder = engine.save_checkpoint(ckpt)

    with pytest.raises(strato.CheckpointError, match="does not exist"):
        engine.load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(strato.CheckpointError, match="not a Strato checkpoint"):
        engine.load_checkpoint(tmp_path / "empty")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "metadata.json").write_text(json.dumps({"format": "deepspeed"}))
    with pytest.raises(strato.CheckpointError, match="not Strato checkpoint metadata"):
        engine.load_checkpoint(foreign)

    state = folder / "state.safetensors"
    original = state.read_bytes()
    state.write_bytes(original[: len(original) // 2])
    with pytest.raises(strato.CheckpointError, match="truncated or corrupt"):
        engine.load_checkpoint(ckpt)
    # Same size, damaged header: safetensors refuses to parse it.
    state.write_bytes(b"\xff" * 16 + original[16:])
    with pytest.raises(strato.CheckpointError, match="corrupt"):
        engine.load_checkpoint(ckpt)

    # A pickle posing as a checkpoint file is never unpickled.
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    payload = pickle.dumps(Boom())
    state.write_bytes(payload)
    meta = json.loads((folder / "metadata.json").read_text())
    meta["files"]["state.safetensors"] = len(payload)
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(strato.CheckpointError, match="corrupt"):
        engine.load_checkpoint(ckpt)
    assert not (tmp_path / "pwned").exists()


def test_refuses_checkpoint_of_another_model(tmp_path):
    engine = small_engine()
    engine_train(engine, steps=1)
    engine.save_checkpoint(tmp_path)
    other = small_engine(tiny_gpt(0, n_layers=3))
    with pytest.raises(strato.CheckpointError, match="does not fit"):
        other.load_checkpoint(tmp_path)


def test_save_mid_accumulation_is_refused(tmp_path):
    engine = small_engine(grad_accumulation=2)
    x, y = batch(0, 2)
    engine.backward(engine(x, y))
    engine.step()
    with pytest.raises(RuntimeError, match="middle of a gradient accumulation"):
        engine.save_checkpoint(tmp_path)
    assert not any(tmp_path.iterdir())


def test_checkpoint_layout_is_safetensors_and_json(tmp_path):
    engine = small_engine()
    engine_train(engine, steps=2)
    folder = engine.save_checkpoint(tmp_path)
    assert folder == tmp_path / "step-00000002"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["metadata.json", "rng.rank0.safetensors", "state.safetensors"]
    meta = checkpoint.read_metadata(folder)
    assert meta["global_step"] == 2 and meta["format"] == checkpoint.FORMAT
    tensors = load_file(str(folder / "state.safetensors"))
    assert "model/tok_emb.weight" in tensors and "model/lm_head.weight" not in tensors  # tied
    assert meta["manager"]["model_aliases"] == {"lm_head.weight": "tok_emb.weight"}
    assert "optim/blocks.0.attn.qkv.weight/exp_avg" in tensors
