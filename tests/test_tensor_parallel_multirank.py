"""Tensor parallelism over real gloo processes (torch.multiprocessing, one thread per rank).

Oracle: one eager process training the same model on the same batch (every rank of a
tensor group sees the whole batch). SGD with momentum, so parameters whose gradient is
zero stay put on both sides; fp32 losses and final weights agree within 1e-5 over 10 steps.
Communication is the runtime's exact payload count under the `tensor` dimension, checked
against Megatron's formula: per layer four all-reduces of b x s x h activations (two in
forward after the row-parallel linears, two in backward before the column-parallel ones),
plus the vocab-parallel embedding (one in forward), the LM head's input gradient (one in
backward), the vocab-parallel cross-entropy (max, sum of exps and target logit: three of
b x s fp32 values) and, where logits are an output, one all-gather of the local logits;
and each step's input check: one all-gather of the batch's fingerprint (2 int64s per rank).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import multirank, tp_worker

pytestmark = pytest.mark.slow

STEPS = 10
TOL = 1e-5
FINGERPRINT_BYTES = 2 * 8
"""What each rank gives the all-gather of `TensorParallel(check_inputs=True)`, per step."""
CLIP = 0.5
"""Below every eager step's gradient norm in the clipping tests (0.8 to 1.9)."""


def launch(spec: dict, world: int, out: Path, timeout: float = 240) -> list[dict]:
    return multirank.launch(tp_worker.run, spec, world, out, timeout)


def sizes(name: str) -> dict[str, int]:
    """layers, hidden, vocab, sequence of each test model."""
    if name == "gpt":
        cfg = tp_worker.GPT_CFG
        return {
            "layers": cfg.n_layers,
            "hidden": cfg.d_model,
            "vocab": cfg.vocab_size,
            "seq": cfg.seq_len,
        }
    config = tp_worker.build_model(name).config
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
        "seq": 12,
    }


def megatron_bytes(name: str, tp: int, record: dict, act: int = 4) -> dict[str, int]:
    """Payload bytes per step under the tensor dimension (all_reduce / broadcast: the
    tensor; all_gather: the local input; reduce_scatter: the whole input)."""
    s = sizes(name)
    tokens = tp_worker.BATCH * s["seq"]
    activations = tokens * s["hidden"] * act
    crossings = 4 * s["layers"] + 2  # blocks in and out, the embedding, the LM head's input
    loss = 3 * tokens * 4  # vocab-parallel cross-entropy: max, sum of exps, target logit
    out = {"all_reduce": crossings * activations + loss}
    if record["sequence_parallel"]:
        # Each all-reduce becomes a reduce-scatter plus an all-gather (same ring bytes);
        # whole values on token shards (norm weights, row biases, position embeddings)
        # sum their gradients; those without one (masks) send nothing.
        params = dict(tp_worker.build_model(name).named_parameters())
        summed = 0
        for whole in record["gradients_summed"]:
            if whole["value"] in params:
                assert whole["numel"] == params[whole["value"]].numel()
            summed += whole["numel"] * 4 if whole["requires_grad"] else 0
        out = {
            "all_reduce": loss + summed,
            "reduce_scatter": crossings * activations,
            "all_gather": crossings * activations // tp,
        }
    if name != "gpt":  # Hugging Face models return the logits too: gathered once
        out["all_gather"] = out.get("all_gather", 0) + tokens * s["vocab"] // tp * act
    # train_step checks that the tensor ranks were given the same batch, each step.
    out["all_gather"] = out.get("all_gather", 0) + FINGERPRINT_BYTES
    return out


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("name", ["gpt", "llama", "gpt2"])
def test_tp2_matches_eager_and_megatron_bytes(name, sequence_parallel, tmp_path):
    spec = {"kind": "train", "model": name, "steps": STEPS, "sequence_parallel": sequence_parallel}
    results = launch(spec, 2, tmp_path)
    want_losses, want = tp_worker.eager_train(name, STEPS)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["losses"], want_losses, atol=TOL, rtol=0, msg=f"rank {rank}")
        for key, value in want.items():
            torch.testing.assert_close(r["full"][key], value, atol=TOL, rtol=0, msg=key)
        record = r["record"]
        assert len(record["row"]) == 2 * sizes(name)["layers"], record
        assert record["vocab"] and record["vocab_cross_entropy"] == 1, record
        for step_bytes in r["comm"]:
            assert step_bytes.get("tensor") == megatron_bytes(name, 2, record), (step_bytes, record)
    # Each rank holds half of every split parameter.
    layout = results[0]["layout"]["tensors"]
    split = [n for n, e in layout.items() if "tensor_parallel" in e["by"]]
    assert len(split) >= 4 * sizes(name)["layers"]


def test_tp2_bf16_close_to_eager_autocast(tmp_path):
    results = launch(
        {"kind": "train", "model": "llama", "steps": 4, "precision": "bf16"}, 2, tmp_path
    )
    want_losses, _ = tp_worker.eager_train("llama", 4, precision="bf16")
    for r in results:
        torch.testing.assert_close(r["losses"], want_losses, atol=3e-2, rtol=0)
        assert r["losses"][-1] < r["losses"][0]


def single_process_engine(name: str):
    """The same model and optimizer without tensor parallelism (one process, no group)."""
    import strato

    model = tp_worker.build_model(name)
    strategy = strato.Strategy(optimizer=strato.SGD(lr=tp_worker.LR, momentum=0.9))
    example = tp_worker.global_batch(name, 0)
    if name != "gpt":
        from tests.hf_models import example_kwargs

        example = {**example_kwargs(name, size=tp_worker.BATCH), **example}
    return strato.compile(model, strategy, example_kwargs=example)


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_checkpoint_tp2_to_tp1_and_back(name, tmp_path):
    steps = 3
    saved = launch(
        {"kind": "train", "model": name, "steps": steps, "save": True}, 2, tmp_path / "tp2"
    )
    # TP=2 -> one process: whole tensors and momentum come back, and training continues as eager.
    engine = single_process_engine(name)
    assert engine.load_checkpoint(tmp_path / "tp2" / "ckpt") == steps
    loaded = engine.full_state_dict()
    for key, value in saved[0]["full"].items():
        torch.testing.assert_close(loaded[key], value, atol=0, rtol=0, msg=key)
    want_losses, _ = tp_worker.eager_train(name, steps + 1)
    next_loss = engine.train_step(**tp_worker.global_batch(name, steps))
    assert abs(next_loss - want_losses[steps]) <= TOL
    # One process -> TP=2.
    engine.save_checkpoint(tmp_path / "tp1")
    engine.wait_for_checkpoint()
    back = launch(
        {"kind": "load", "model": name, "load": str(tmp_path / "tp1")}, 2, tmp_path / "back"
    )
    want_losses, _ = tp_worker.eager_train(name, steps + 2)
    for r in back:
        assert r["step"] == steps + 1
        for key, value in engine.full_state_dict().items():
            torch.testing.assert_close(r["loaded"][key], value, atol=0, rtol=0, msg=key)
        assert abs(r["loss"] - want_losses[steps + 1]) <= TOL


def check_clipped_like_eager(results: list[dict], name: str, steps: int, batch: int) -> None:
    """Every rank's global gradient norm, and its weights after clipping, equal eager
    torch.nn.utils.clip_grad_norm_'s (SGD: weights compared everywhere)."""
    _, want, want_norms = tp_worker.eager_train_clipped(name, steps, CLIP, batch_size=batch)
    assert min(want_norms) > CLIP, want_norms  # clipping was active on every step
    for rank, r in enumerate(results):
        torch.testing.assert_close(
            r["grad_norms"], want_norms, atol=0, rtol=1e-5, msg=f"rank {rank}"
        )
        for key, value in want.items():
            torch.testing.assert_close(r["full"][key], value, atol=TOL, rtol=0, msg=key)


def test_tp2_grad_clip_counts_each_element_once(tmp_path):
    """HF Llama (GQA) with sequence parallelism: split blocks counted by their holder, whole
    tensors (norm weights, their summed token-shard gradients) once per tensor group."""
    steps = 4
    spec = {
        "kind": "train",
        "model": "llama",
        "steps": steps,
        "sequence_parallel": True,
        "grad_clip": CLIP,
    }
    check_clipped_like_eager(launch(spec, 2, tmp_path), "llama", steps, tp_worker.BATCH)


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_tp2_x_dp2_on_four_ranks(zero, tmp_path):
    """2-D: tensor groups [0, 1] and [2, 3], data-parallel (ZeRO) groups [0, 2] and [1, 3];
    ZeRO shards the tensor-parallel blocks (`[box, flat]` layouts). Clipped by the global
    norm: each [box, flat] piece is counted by its one holder."""
    steps = 4
    spec = {"kind": "train", "model": "gpt", "steps": steps, "zero": zero, "grad_clip": CLIP}
    results = launch(spec, 4, tmp_path, timeout=400)
    batch = 2 * tp_worker.BATCH
    want_losses, _, _ = tp_worker.eager_train_clipped("gpt", steps, CLIP, batch_size=batch)
    for i in range(steps):
        mean = sum(r["losses"][i] for r in results) / 4
        assert abs(mean - want_losses[i]) <= TOL, (i, mean, want_losses[i])
    check_clipped_like_eager(results, "gpt", steps, batch)
    for r in results:
        data_parallel_dim = "shard" if zero else "replicate,shard"
        assert {"tensor", data_parallel_dim} <= set(r["comm"][-1]), r["comm"][-1]
    if zero:
        layout = results[0]["layout"]["tensors"]
        kinds = [e["steps"][-1]["kind"] for e in layout.values() if "tensor_parallel" in e["by"]]
        assert kinds and set(kinds) == {"flat"}, layout


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_tp2_serving_equals_single_process(int8, tmp_path):
    """Eval graphs through the same pass (+ int8: each rank quantizes its shard): logits
    match one process's, and greedy decoding picks the same tokens."""
    import strato

    results = launch({"kind": "serve", "int8": int8}, 2, tmp_path)
    quantize = strato.Quantize(weights="int8") if int8 else None
    model = tp_worker.build_model("llama").eval()
    want_logits, want_ids = tp_worker.serve(
        model, strato.Strategy(quantize=quantize), tp_worker.serving_prompt(), 5
    )
    for r in results:
        # int8: a row-parallel shard's per-channel scales cover half the input features, so
        # its rounding differs from the whole layer's (both within int8's error of fp32).
        tol = 2e-2 if int8 else 1e-5
        torch.testing.assert_close(r["logits"], want_logits, atol=tol, rtol=0)
        assert torch.equal(r["ids"], want_ids)


GENERATE_VARIANTS = {
    "llama": [{"model": "llama"}, {"model": "llama", "int8": True, "padded": True}],
    "gpt2": [{"model": "gpt2", "padded": True}, {"model": "gpt2", "int8": True}],
}


@pytest.mark.timeout(600)  # two compiles (prefill, decode) per variant on each rank
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_tp2_generate_equals_single_process(name, tmp_path):
    """`compiled.generate` at TP=2 (HF Llama with GQA, GPT-2; fp32 and int8; batched
    prompts, one left-padded): each rank's KV caches hold its half of the KV heads, and the
    greedy tokens equal one process's."""
    variants = GENERATE_VARIANTS[name]
    per_rank = launch({"kind": "generate", "variants": variants}, 2, tmp_path)
    for i, variant in enumerate(variants):
        prompt, mask = tp_worker.generation_prompt(variant.get("padded", False))
        want = tp_worker.generation_compile(variant, 1).generate(
            prompt, max_new_tokens=6, attention_mask=mask
        )
        for rank, results in enumerate(per_rank):
            r = results[i]
            assert torch.equal(r["ids"], want), (variant, rank, r["ids"], want)
            heads, head_dim = r["whole_key_shape"]
            assert r["key_shape"] == (heads // 2, head_dim), (variant, r)
            assert r["split_inputs"] == {"keys": 2, "values": 2}, r
            # q, k, v, gate, up per Llama layer (c_attn, c_fc per GPT-2 layer), the LM head
            assert len(r["column"]) == (5 if name == "llama" else 2) * 2 + 1, r["column"]


def test_a_rank_with_another_plan_fails_naming_the_module_not_hanging(tmp_path):
    """The tensor-parallel collectives are in the ranks-agree digest: a rank whose plan
    keeps a block whole is told which split differs, on every rank, before any step."""
    results = launch({"kind": "mismatch", "model": "gpt"}, 2, tmp_path, timeout=120)
    for rank, r in enumerate(results):
        error = r["error"]
        assert error and error.startswith("CollectiveMismatchError"), (rank, error)
        assert "split blocks.1.mlp." in error and "group=tensor" in error, (rank, error)


def test_tp2_plan_for_modules_the_matcher_misses_matches_eager(tmp_path):
    """OddMLPNet's MLP halves sit in sibling modules; TensorParallel.plan makes them
    column/row pairs: losses and weights equal eager's, each rank holding half of each."""
    steps = 4
    spec = {"kind": "train", "model": "odd", "steps": steps, "plan": tp_worker.ODD_PLAN}
    results = launch(spec, 2, tmp_path)
    want_losses, want = tp_worker.eager_train("odd", steps)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["losses"], want_losses, atol=TOL, rtol=0, msg=f"rank {rank}")
        for key, value in want.items():
            torch.testing.assert_close(r["full"][key], value, atol=TOL, rtol=0, msg=key)
        assert r["record"]["row"] == ["squeeze.0.dense", "squeeze.1.dense"], r["record"]
        box = r["layout"]["tensors"]["widen.0.dense.weight"]["steps"][0]
        assert box["stops"][0] - box["starts"][0] == 48, box  # half of 3 x 32 features


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
def test_tp2_dropout_draws_one_process_masks(sequence_parallel, tmp_path):
    """Dropout 0.1 on our GPT, each rank seeded differently before compile: the pass gives
    the tensor group rank 0's stream, dropout on split values (local heads, sequence
    shards) keeps its slice of the whole value's mask, so replicated activations stay
    identical across ranks and every step equals eager's with that seed (SGD)."""
    steps = 4
    spec = {
        "kind": "train",
        "model": "gpt",
        "steps": steps,
        "dropout": 0.1,
        "sequence_parallel": sequence_parallel,
    }
    results = launch(spec, 2, tmp_path)
    want_losses, want, _ = tp_worker.eager_train_clipped("gpt", steps, None, dropout=0.1)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["losses"], want_losses, atol=TOL, rtol=0, msg=f"rank {rank}")
        for key, value in want.items():
            torch.testing.assert_close(r["full"][key], value, atol=TOL, rtol=0, msg=key)
    no_dropout, _, _ = tp_worker.eager_train_clipped("gpt", steps, None)
    assert max(abs(a - b) for a, b in zip(want_losses, no_dropout)) > 1e-3  # dropout was on


def test_pipeline2_x_tp2_on_four_ranks_matches_eager_with_clipping(tmp_path):
    """3-D minus data: stages [0, 1] | [2, 3], each stage's blocks split over its tensor
    pair; clipped by the global norm (each stage's shards counted once): losses, norms and
    weights (full_state_dict: each stage's tensors written by its first tensor rank) equal
    eager's."""
    steps = 3
    spec = {
        "kind": "train",
        "model": "gpt",
        "steps": steps,
        "grad_clip": CLIP,
        "pipeline": {"stages": 2, "microbatches": 2},
    }
    results = launch(spec, 4, tmp_path, timeout=400)
    want_losses, _, _ = tp_worker.eager_train_clipped("gpt", steps, CLIP)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["losses"], want_losses, atol=TOL, rtol=0, msg=f"rank {rank}")
    check_clipped_like_eager(results, "gpt", steps, tp_worker.BATCH)


def test_tp2_ranks_fed_different_batches_fail_on_every_rank_then_train_as_eager(tmp_path):
    """HF Llama (GQA, labels): rank r is fed batch 10 + r (a sampler split over the world).
    train_step, an eval call and the three-call loop's forward each raise InputError on
    both ranks naming the input, before any compute; fed the same batches after that, the
    engine trains exactly as eager from the initial weights."""
    steps = 2
    results = launch({"kind": "skewed", "model": "llama", "steps": steps}, 2, tmp_path)
    want_losses, want = tp_worker.eager_train("llama", steps)
    for rank, r in enumerate(results):
        for call, error in r["errors"].items():
            assert error and error.startswith("InputError"), (rank, call, error)
            assert "'input_ids' differs" in error and "[0, 1]" in error, (call, error)
            assert "engine.data_parallel_rank" in error, error
        assert "train_step" in r["errors"]["train_step"]
        assert "(eval)" in r["errors"]["eval"] and "(training)" in r["errors"]["three_call"]
        assert r["data_parallel"] == (0, 1)  # both tensor ranks take the one batch
        torch.testing.assert_close(r["losses"], want_losses, atol=TOL, rtol=0, msg=f"rank {rank}")
        for key, value in want.items():
            torch.testing.assert_close(r["full"][key], value, atol=TOL, rtol=0, msg=key)


def test_sizes_that_do_not_divide_name_the_module_and_numbers(tmp_path):
    errors = launch({"kind": "errors"}, 2, tmp_path)[0]
    assert "blocks.0.attn" in errors["heads"] and "3 attention heads" in errors["heads"]
    assert "TensorParallel.size=2" in errors["heads"]
    assert "lm_head" in errors["vocab"] and "vocabulary of 63 rows" in errors["vocab"]
    assert "k_proj" in errors["kv_heads"] and "1 KV heads" in errors["kv_heads"]
