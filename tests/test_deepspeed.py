"""Strategy.from_deepspeed: DeepSpeed configs (the shapes of DeepSpeed's documentation and of
Hugging Face's ds_config_zero2.json / ds_config_zero3.json, written out here) become the
Strategy a user would write by hand, with DeepSpeed's semantics; every key is accounted for."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch

import strato
from strato.compiler.deepspeed import HONOURED, NO_EFFECT, NOT_MAPPED
from tests.conftest import tiny_llama
from tests.training_utils import batch, reference_groups, tiny_gpt

# Hugging Face's ds_config_zero2.json / ds_config_zero3.json (transformers' DeepSpeed docs).
HF_ZERO2 = {
    "fp16": {
        "enabled": "auto",
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 16,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "bf16": {"enabled": "auto"},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
    },
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "allgather_partitions": True,
        "allgather_bucket_size": 2e8,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": True,
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}
HF_ZERO3 = {
    **copy.deepcopy(HF_ZERO2),
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 1e9,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}
# What the HF Trainer would fill from its TrainingArguments.
TRAINER_ARGS = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "optimizer.params.lr": 3e-4,
    "optimizer.params.betas": [0.9, 0.95],
    "optimizer.params.eps": 1e-8,
    "optimizer.params.weight_decay": 0.1,
    "scheduler.params.warmup_num_steps": 10,
}
# DeepSpeed's config-json page / getting-started example.
DS_DOCS = {
    "train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "Adam", "params": {"lr": 0.00015}},
    "fp16": {"enabled": True},
    "zero_optimization": True,
}


def leaf_keys(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, dict) and value:
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def accounted(report, key: str) -> bool:
    """Some entry names this key or a section above it."""
    return any(key == e.key or key.startswith(e.key + ".") for e in report.entries)


def test_hf_zero2_config_becomes_the_hand_written_strategy():
    strategy, report = strato.convert_deepspeed(HF_ZERO2, auto=TRAINER_ARGS, world_size=2)
    expected = strato.Strategy(
        optimizer=strato.AdamW(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        schedule=strato.Constant(warmup_steps=10, warmup_start=0.0, warmup_shape="log"),
        precision="auto",  # bf16/fp16 "enabled": "auto"
        loss_scaling=strato.LossScaling(growth_interval=1000, hysteresis=2, min_scale=1.0),
        grad_accumulation=2,
        grad_clip=1.0,
        micro_batch_size=4,
        zero=2,
        offload="cpu",
        zero_bucket_mb=2e8 * 4 / 2**20,
    )
    assert strategy == expected
    missing = [k for k in leaf_keys(HF_ZERO2) if not accounted(report, k)]
    assert missing == [], f"keys dropped silently: {missing}"
    no_effect = {e.key for e in report.select(NO_EFFECT)}
    assert {
        "steps_per_print",
        "wall_clock_breakdown",
        "zero_optimization.overlap_comm",
    } <= no_effect
    assert "train_batch_size=None: 16 at world size 2" in str(report)


def test_hf_zero3_autos_come_from_the_model_hidden_size():
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    strategy, report = strato.convert_deepspeed(HF_ZERO3, model=model, auto=TRAINER_ARGS)
    assert strategy.zero == 3 and strategy.offload == "cpu"
    assert strategy.zero_bucket_mb == 64 * 64 * 4 / 2**20  # reduce_bucket_size = hidden^2
    assert strategy.zero_small_param_threshold == 640  # 10 x hidden
    assert strategy.zero_prefetch == 1  # 0.9 x hidden^2 elements: less than one layer
    assert [k for k in leaf_keys(HF_ZERO3) if not accounted(report, k)] == []
    honoured = {e.key: e.note for e in report.select(HONOURED)}
    assert "hidden_size 64" in honoured["zero_optimization.reduce_bucket_size"]
    with pytest.raises(strato.StrategyError, match="pass model="):
        strato.convert_deepspeed(HF_ZERO3, auto=TRAINER_ARGS)


def test_unresolved_autos_are_listed_together_with_what_to_pass():
    with pytest.raises(strato.StrategyError) as info:
        strato.convert_deepspeed(HF_ZERO2)
    message = str(info.value)
    for key in ("train_micro_batch_size_per_gpu", "optimizer.params.lr", "gradient_clipping"):
        assert f"auto={{{key!r}: <value>}}" in message
    assert "TrainingArguments.learning_rate" in message


def test_deepspeed_docs_config_takes_deepspeed_defaults():
    strategy, _ = strato.convert_deepspeed(DS_DOCS, world_size=1)
    assert strategy.zero == 1  # legacy "zero_optimization": true
    assert strategy.micro_batch_size == 8 and strategy.grad_accumulation == 1
    assert strategy.train_batch_size == 8
    # DeepSpeed's Adam is AdamW (adam_w_mode) with FusedAdam's weight_decay default 0.
    assert strategy.optimizer == strato.AdamW(lr=0.00015, weight_decay=0.0)
    assert strategy.precision == "fp16"
    # DeepSpeed's fp16 defaults: 2**16, window 1000, hysteresis 2, min 1.
    assert strategy.loss_scaling == strato.LossScaling(
        initial_scale=2.0**16, growth_interval=1000, hysteresis=2, min_scale=1.0
    )
    torch_adam = {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}
    strategy, _ = strato.convert_deepspeed({**DS_DOCS, "optimizer": torch_adam}, world_size=1)
    assert strategy.optimizer.weight_decay == 0.01  # torch.optim.AdamW's default


@pytest.mark.parametrize(
    "sizes, world, expected",
    [
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4)),
        ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, (24, 4, 3)),
        ({"train_batch_size": 16}, 4, (16, 4, 1)),
        ({"train_micro_batch_size_per_gpu": 2}, 3, (6, 2, 1)),
    ],
)
def test_batch_sizes_fill_the_missing_one_as_deepspeed(sizes, world, expected):
    strategy, _ = strato.convert_deepspeed(sizes, world_size=world)
    total, micro, accumulation = expected
    assert (strategy.micro_batch_size, strategy.grad_accumulation) == (micro, accumulation)
    assert strategy.train_batch_size == (total if "train_batch_size" in sizes else None)


def test_batch_identity_error_shows_the_three_numbers():
    sizes = {
        "train_batch_size": 32,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
    }
    assert strato.convert_deepspeed(sizes, world_size=4)[0].train_batch_size == 32
    with pytest.raises(strato.StrategyError, match=r"32 != .*4 x .*2 x world size 2"):
        strato.convert_deepspeed(sizes, world_size=2)
    # At compile, against the real world size (1 here).
    strategy = strato.convert_deepspeed(sizes, world_size=4)[0].replace(optimizer=strato.SGD())
    model = tiny_gpt()
    with pytest.raises(strato.StrategyError, match=r"32 != micro_batch_size 4 x .* 2 x .* 1 = 8"):
        strato.compile(model, strategy, example_inputs=batch(0, 4))


def test_unsupported_keys_are_all_refused_in_one_message():
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}},
        "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3}},
        "zero_optimization": {"stage": 3, "zero_quantized_weights": True},
        "amp": {"enabled": True},
        "not_a_deepspeed_key": 1,
    }
    with pytest.raises(strato.StrategyError) as info:
        strato.convert_deepspeed(config)
    message = str(info.value)
    for key in (
        "optimizer.type",
        "zero_optimization.zero_quantized_weights",
        "amp",
        "not_a_deepspeed_key",
        "scheduler.params.cycle_momentum",  # OneCycle cycles momentum by default
    ):
        assert key in message, key
    assert message.count("\n") == 5  # a title, then one line each


def test_one_cycle_maps_where_it_is_one_lr_cycle():
    config = {
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "scheduler": {
            "type": "OneCycle",
            "params": {
                "cycle_min_lr": 0.01,
                "cycle_max_lr": 0.1,
                "cycle_first_step_size": 4,
                "cycle_momentum": False,
            },
        },
    }
    strategy, _ = strato.convert_deepspeed(config)
    assert strategy.optimizer.lr == 0.1
    # DeepSpeed's OneCycle: lr = min + (max - min) * x, x up over 4 steps and down over 4.
    expected = [0.01 + 0.09 * (i / 4 if i <= 4 else (8 - i) / 4) for i in range(8)] + [0.01] * 3
    got = [0.1 * strategy.schedule.factor(i) for i in range(11)]
    assert got == pytest.approx(expected)
    config["scheduler"]["params"]["cycle_momentum"] = True
    with pytest.raises(strato.StrategyError, match="cycle_momentum"):
        strato.convert_deepspeed(config)


def deepspeed_lr(kind: str, params: dict, lr: float, i: int) -> float:
    """DeepSpeed's lr_schedules.py formulas at scheduler iteration i (written out here)."""
    warm = max(2, params["warmup_num_steps"])
    log = params.get("warmup_type", "log") == "log"
    gamma = math.log(i + 1) / math.log(warm) if log else i / warm
    if kind == "WarmupCosineLR":
        if i < warm:
            start = params.get("warmup_min_ratio", 0.0)
            return lr * (start + (1 - start) * gamma)
        floor = params.get("cos_min_ratio", 1e-4)
        progress = (i - warm + 1) / (params["total_num_steps"] - warm)
        return lr * max(0.0, floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)
    low, high = params.get("warmup_min_lr", 0.0), params["warmup_max_lr"]
    if i >= warm:
        gamma = 1.0
        if kind == "WarmupDecayLR":
            total = params["total_num_steps"]
            gamma = max(0.0, (total - i) / max(1.0, total - warm))
    return low + (high - low) * gamma


@pytest.mark.parametrize(
    "kind, params",
    [
        ("WarmupLR", {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-3, "warmup_num_steps": 5}),
        ("WarmupLR", {"warmup_max_lr": 1e-3, "warmup_num_steps": 4, "warmup_type": "linear"}),
        ("WarmupDecayLR", {"warmup_max_lr": 1e-3, "warmup_num_steps": 3, "total_num_steps": 9}),
        ("WarmupCosineLR", {"warmup_num_steps": 3, "total_num_steps": 10, "warmup_type": "linear"}),
    ],
)
def test_schedules_follow_deepspeed_formulas(kind, params):
    config = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "scheduler": {"type": kind, "params": params},
    }
    strategy, _ = strato.convert_deepspeed(config)
    got = [strategy.optimizer.lr * strategy.schedule.factor(i) for i in range(14)]
    for i in range(14):
        j = i
        if kind == "WarmupCosineLR" and i >= params["warmup_num_steps"]:
            # DeepSpeed counts the first decay step as 1 (real_last_step = i - warmup + 1):
            # Strato's cosine is the same curve one step later, starting at the peak.
            if i == params["warmup_num_steps"]:
                assert got[i] == pytest.approx(1e-3)
                continue
            j = min(i - 1, params["total_num_steps"] - 1)
        assert got[i] == pytest.approx(deepspeed_lr(kind, params, 1e-3, j), abs=1e-12), i
    if "total_num_steps" in params:  # holds the floor after total_num_steps
        assert got[-1] == got[params["total_num_steps"]]


def test_pipeline_is_named_not_mapped():  # activation_checkpointing: tests/test_recompute_deepspeed.py
    config = {"train_micro_batch_size_per_gpu": 1, "pipeline": {"pipe_partitioned": True}}
    _, report = strato.convert_deepspeed(config)
    assert {e.key for e in report.select(NOT_MAPPED)} == {"pipeline"}
    assert "not mapped yet:" in str(report)
    with pytest.warns(UserWarning, match="pipeline"):
        strato.Strategy.from_deepspeed(config)


def test_from_dict_on_a_deepspeed_config_says_so():
    with pytest.raises(strato.StrategyError, match="looks like a DeepSpeed config.*from_deepspeed"):
        strato.Strategy.from_dict(HF_ZERO2)
    ds_optimizer = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(strato.StrategyError, match="'kind'.*from_deepspeed"):
        strato.Strategy.from_dict({"optimizer": {"type": "AdamW", "lr": 1e-3}, "zero": 0})
    with pytest.raises(strato.StrategyError, match="DeepSpeed's form.*from_deepspeed"):
        strato.Strategy.from_dict(ds_optimizer)


def test_compile_reads_a_deepspeed_json_and_trains_like_the_hand_written_strategy(tmp_path):
    """10 steps of our GPT under the DeepSpeed file equal 10 steps under the Strategy a user
    would write, and eager PyTorch with DeepSpeed's semantics (SGD, so every weight can be
    compared: micro 4 x accumulation 2, clipping 1.0, WarmupLR linear 0.01 -> 0.05)."""
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.01,
                "warmup_max_lr": 0.05,
                "warmup_num_steps": 4,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": 10,
    }
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    hand = strato.Strategy(
        optimizer=strato.SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
        schedule=strato.Constant(warmup_steps=4, warmup_start=0.2, warmup_shape="linear"),
        micro_batch_size=4,
        grad_accumulation=2,
        grad_clip=1.0,
    )
    runs, engines = [], []
    for strategy in (path, hand):
        model = tiny_gpt()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # steps_per_print has no effect: warned
            engine = strato.compile(model, strategy, example_inputs=batch(0, 4))
        for step in range(10):
            x, y = batch(step, 8)
            for k in range(2):
                engine.backward(engine(x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]))
                engine.step()
        runs.append(model)
        engines.append(engine)
    assert engines[0].strategy == hand
    eager = tiny_gpt()
    optimizer = torch.optim.SGD(reference_groups(eager, 0.01), lr=0.05, momentum=0.9)
    for step in range(10):
        for group in optimizer.param_groups:  # DeepSpeed's linear warmup, then constant
            group["lr"] = 0.01 + 0.04 * min(1.0, step / 4)
        x, y = batch(step, 8)
        for k in range(2):
            (eager(x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]) / 2).backward()
        torch.nn.utils.clip_grad_norm_(eager.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for (name, a), b, c in zip(
        runs[0].named_parameters(), runs[1].parameters(), eager.parameters()
    ):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0, msg=name)


def test_offload_and_fp16_sections():
    base = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {}}}
    nvme = {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True}
    zero3 = {"stage": 3, "offload_optimizer": nvme, "offload_param": dict(nvme)}
    strategy, _ = strato.convert_deepspeed({**base, "zero_optimization": zero3})
    assert strategy.offload == strato.NVMe("/local_nvme")
    param_only = {"stage": 3, "offload_param": {"device": "cpu"}}
    with pytest.raises(strato.StrategyError, match="offload_param.*with the optimizer state"):
        strato.convert_deepspeed({**base, "zero_optimization": param_only})
    static = {"enabled": True, "loss_scale": 128, "hysteresis": 2}
    strategy, report = strato.convert_deepspeed({**base, "fp16": static})
    assert strategy.precision == "fp16"
    assert strategy.loss_scaling.initial_scale == 128.0
    assert strategy.loss_scaling.growth_factor == strategy.loss_scaling.backoff_factor == 1.0
    assert "fp16.hysteresis" in {e.key for e in report.select(NO_EFFECT)}  # a fixed scale
    both = {**base, "fp16": {"enabled": True}, "bf16": {"enabled": True}}
    with pytest.raises(strato.StrategyError, match="cannot both be enabled"):
        strato.convert_deepspeed(both)


def test_strategy_file_is_told_apart_by_content(tmp_path):
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text("optimizer: {kind: SGD, lr: 0.1}\nprecision: auto\n")
    assert strato.Strategy.from_file(yaml_file).precision == "auto"
    strato_json = tmp_path / "s.json"
    strato_json.write_text(json.dumps({"optimizer": {"kind": "SGD", "lr": 0.1}, "zero": 1}))
    assert strato.Strategy.from_file(strato_json).zero == 1
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_batch_size": 4, "optimizer": {"type": "SGD"}}))
    assert strato.Strategy.from_file(ds_json).micro_batch_size == 4
    with pytest.raises(strato.StrategyError, match="does not exist"):
        strato.Strategy.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(strato.StrategyError, match="bad.json.*does not parse"):
        strato.Strategy.from_file(tmp_path / "bad.json")
