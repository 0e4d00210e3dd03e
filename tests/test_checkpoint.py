"""Checkpoints in one process: exact resume in a new process, crash-safe saves, verified
and all-or-nothing loads, the layout maps, stage 0 <-> ZeRO-3 resharding, Hugging Face
weights from full_state_dict / save_pretrained / consolidate. Multi-rank resharding and
partial-rank calls: tests/test_checkpoint_multirank.py."""

from __future__ import annotations

import hashlib
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
from strato.compiler import layout
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
    engine.wait_for_checkpoint()
    assert not list(ckpt.glob(".tmp-*"))
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000002", "step-00000003"]


def snapshot_state(engine) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and optimizer-state tensor of an engine, copied."""
    out = {f"model/{n}": t.detach().clone() for n, t in engine.model.named_parameters()}
    out.update({f"buffer/{n}": t.clone() for n, t in engine.model.named_buffers()})
    for i, (p, state) in enumerate(engine.manager.optimizer.state.items()):
        for key, value in state.items():
            out[f"optim/{i}/{tuple(p.shape)}/{key}"] = torch.as_tensor(value).clone()
    return out


def assert_unchanged(engine, before: dict[str, torch.Tensor], step: int) -> None:
    after = snapshot_state(engine)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"a refused load changed {changed[:5]}"
    assert engine.global_step == step


def test_refuses_foreign_and_corrupt_folders(tmp_path):
    engine = small_engine()
    engine_train(engine, steps=1)
    ckpt = tmp_path / "ckpt"
    engine.save_checkpoint(ckpt)
    folder = engine.wait_for_checkpoint()
    before = snapshot_state(engine)

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
    being_written = ckpt / ".tmp-step-00000009"
    being_written.mkdir()
    with pytest.raises(strato.CheckpointError, match="still being written"):
        engine.load_checkpoint(being_written)

    state = folder / "state.rank0.safetensors"
    original = state.read_bytes()
    state.write_bytes(original[: len(original) // 2])
    with pytest.raises(strato.CheckpointError, match="state.rank0.safetensors is .* truncated"):
        engine.load_checkpoint(ckpt)
    # One flipped byte inside a tensor, same size: only the hash can tell.
    flipped = bytearray(original)
    flipped[-5] ^= 0x40
    state.write_bytes(bytes(flipped))
    with pytest.raises(strato.CheckpointError, match="state.rank0.safetensors does not match"):
        engine.load_checkpoint(ckpt)
    assert_unchanged(engine, before, 1)

    # A pickle posing as the tensor file (size and hash forged too) is never unpickled.
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    payload = pickle.dumps(Boom())
    state.write_bytes(payload)
    meta = json.loads((folder / "metadata.json").read_text())
    meta["files"]["state.rank0.safetensors"] = {
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(strato.CheckpointError, match="not a safetensors file"):
        engine.load_checkpoint(ckpt)
    assert not (tmp_path / "pwned").exists()
    state.unlink()
    with pytest.raises(strato.CheckpointError, match="state.rank0.safetensors is missing"):
        engine.load_checkpoint(ckpt)
    assert_unchanged(engine, before, 1)


@pytest.mark.parametrize(
    "other", [{"n_layers": 3}, {"d_model": 48}], ids=["more-layers", "other-widths"]
)
def test_checkpoint_of_another_model_is_refused_and_changes_nothing(tmp_path, other):
    engine = small_engine()
    engine_train(engine, steps=1)
    engine.save_checkpoint(tmp_path, async_save=False)
    target = small_engine(tiny_gpt(1, **other))
    engine_train(target, steps=2)
    before = snapshot_state(target)
    with pytest.raises(strato.CheckpointError, match="does not fit") as info:
        target.load_checkpoint(tmp_path)
    message = str(info.value)
    assert "Nothing was changed" in message
    if "d_model" in other:
        assert "saved (32,) float32, model (48,) float32" in message
    else:
        assert "missing ['blocks.2." in message
    assert_unchanged(target, before, 2)


def test_checkpoint_of_another_optimizer_is_refused(tmp_path):
    engine = small_engine(optimizer=strato.SGD(lr=0.1, momentum=0.9))
    engine_train(engine, steps=1)
    engine.save_checkpoint(tmp_path, async_save=False)
    target = small_engine()
    with pytest.raises(strato.CheckpointError, match="SGD optimizer states.*AdamW"):
        target.load_checkpoint(tmp_path)


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
    assert engine.wait_for_checkpoint() == folder == tmp_path / "step-00000002"
    assert (tmp_path / "latest").read_text().strip() == "step-00000002"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["metadata.json", "state.rank0.safetensors"]
    meta = checkpoint.read_metadata(folder)
    assert meta["global_step"] == 2 and meta["format"] == checkpoint.FORMAT
    info = meta["files"]["state.rank0.safetensors"]
    assert info["sha256"] == checkpoint.sha256_file(folder / "state.rank0.safetensors")
    tensors = load_file(str(folder / "state.rank0.safetensors"))
    assert "model/tok_emb.weight" in tensors and "model/lm_head.weight" not in tensors  # tied
    assert meta["aliases"] == {"lm_head.weight": "tok_emb.weight"}
    entry = meta["tensors"]["optim/blocks.0.attn.qkv.weight/exp_avg"]
    assert entry["shape"] == [96, 32] and entry["follows"] == "blocks.0.attn.qkv.weight"
    assert entry["pieces"] == [
        {
            "file": "state.rank0.safetensors",
            "key": "optim/blocks.0.attn.qkv.weight/exp_avg",
            "intervals": [[0, 96 * 32]],
        }
    ]
    assert "rng/0/torch_cpu" in tensors


def test_async_saves_publish_in_order_and_keep_last(tmp_path):
    engine = small_engine()
    for step in range(1, 4):
        engine_train(engine, steps=1, start=step - 1)
        engine.save_checkpoint(tmp_path, keep_last=2)  # waits for the previous one first
    engine.wait_for_checkpoint()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"
    assert not list(tmp_path.glob(".tmp-*"))
    # The snapshot is taken at the call: training on right after does not leak into it.
    saved = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    engine.save_checkpoint(tmp_path)
    engine_train(engine, steps=1, start=3)
    fresh = small_engine()
    assert fresh.load_checkpoint(tmp_path) == 3  # step 3 saved again, replacing the first
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p.detach(), saved[name]), name


@pytest.mark.parametrize(
    "saved_stage,loaded_stage", [(0, 3), pytest.param(3, 0, marks=pytest.mark.slow), (3, 1)]
)
def test_stage_change_in_one_process_resumes_exactly(tmp_path, saved_stage, loaded_stage):
    """A stage-0 checkpoint into a ZeRO engine and back (one process: the layouts differ,
    the data do not): the next steps match the uninterrupted run exactly."""
    first = small_engine(zero=saved_stage)
    engine_train(first, steps=2)
    first.save_checkpoint(tmp_path)
    uninterrupted = engine_train(first, steps=3, start=2)
    second = small_engine(zero=loaded_stage)
    assert second.load_checkpoint(tmp_path) == 2
    assert engine_train(second, steps=3, start=2) == uninterrupted


def test_layout_steps_compose_and_invert():
    """A ZeRO flat shard over a tensor-parallel column block: the intervals are what the
    index arithmetic says, and the reverse map puts the piece back where it came from."""
    full = torch.arange(6 * 8, dtype=torch.float32).view(6, 8)
    box = {"kind": "box", "starts": [0, 4], "stops": [6, 8]}  # columns 4..7 (TP rank 1 of 2)
    for rank in range(3):  # then ZeRO over 3 ranks: 24 elements, 8 each
        lo, hi = layout.flat_shard(24, rank, 3)
        tl = layout.TensorLayout((6, 8), "float32", (box, {"kind": "flat", "lo": lo, "hi": hi}))
        piece = tl.to_local(full)
        assert torch.equal(piece, full[:, 4:].reshape(-1)[lo:hi])
        spans = tl.intervals()
        assert torch.equal(
            torch.cat([torch.arange(a, b) for a, b in spans]).float(), piece
        )  # row-major global indices of the piece's elements, in order
        back = tl.to_global_(torch.zeros(6, 8), piece)
        mask = torch.zeros(48, dtype=torch.bool)
        for a, b in spans:
            mask[a:b] = True
        assert torch.equal(back.view(-1)[mask], full.view(-1)[mask])
        assert back.view(-1)[~mask].abs().sum() == 0
    # ZeRO's registration lands in the records the runtime reads.
    engine = small_engine(zero=2)
    records = engine.context.records["layout"]["tensors"]
    assert records["tok_emb.weight"]["by"] == ["zero2"]
    assert records["tok_emb.weight"]["steps"] == [{"kind": "flat", "lo": 0, "hi": 64 * 32}]
    layouts, aliases = engine.layout()
    assert aliases == {"lm_head.weight": "tok_emb.weight"} and layouts["tok_emb.weight"].holds_full


@pytest.mark.parametrize(
    "family,zero", [pytest.param("llama", 3, marks=pytest.mark.slow), ("gpt2", 3)]
)
def test_hf_weights_from_full_state_dict_save_pretrained_and_consolidate(tmp_path, family, zero):
    """Llama (GQA) and GPT-2 (tied LM head) trained 2 steps: full_state_dict,
    save_pretrained and the offline consolidation (Python and `python -m
    strato.consolidate`) all give weights that AutoModelForCausalLM.from_pretrained loads,
    with the engine's own logits."""
    from transformers import AutoModelForCausalLM

    from tests.hf_models import hf_model

    def fresh():  # the family under test, freshly initialised
        return hf_model(family)

    model = fresh()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    strategy = strato.Strategy(optimizer=strato.SGD(lr=0.5), zero=zero)
    engine = strato.compile(
        model, strategy, example_kwargs={"input_ids": ids, "labels": ids, "use_cache": False}
    )
    for _ in range(2):
        out = engine(input_ids=ids, labels=ids, use_cache=False)
        engine.backward(out["loss"] if isinstance(out, dict) else out.loss)
        engine.step()
    full = engine.full_state_dict()
    assert list(full) == list(fresh().state_dict())
    engine.save_checkpoint(tmp_path / "ckpt")
    engine.save_pretrained(tmp_path / "pretrained")
    engine.wait_for_checkpoint()
    strato.consolidate(tmp_path / "ckpt", tmp_path / "consolidated")
    proc = subprocess.run(
        [sys.executable, "-m", "strato.consolidate", str(tmp_path / "ckpt"), str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    reference = fresh()
    reference.load_state_dict(full)
    reference.eval()
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        assert not torch.equal(want, fresh().eval()(input_ids=ids).logits)  # it trained
        for folder in ("pretrained", "consolidated", "cli"):
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
            assert torch.equal(loaded(input_ids=ids).logits, want), folder
    if family == "gpt2":  # tied weights stored once, under their first name
        stored = load_file(str(tmp_path / "pretrained" / "model.safetensors"))
        assert "transformer.wte.weight" in stored and "lm_head.weight" not in stored


def test_consolidate_cli_reports_bad_checkpoints(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "strato.consolidate", str(tmp_path / "nowhere"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "does not exist" in proc.stderr
