"""Strategy: validated on construction, unknown keys suggest the right one, YAML round-trips."""

from __future__ import annotations

import pytest

import strato
from examples.custom_pass import tanh_gelu


def test_unknown_key_lists_valid_fields_with_did_you_mean():
    with pytest.raises(strato.StrategyError) as info:
        strato.Strategy.from_dict({"disabel": ["x"]})
    message = str(info.value)
    assert "unknown field 'disabel'" in message
    assert "Did you mean 'disable'?" in message
    assert "passes" in message  # lists the valid fields


def test_unknown_keyword_in_replace_is_an_error():
    with pytest.raises(strato.StrategyError, match="Did you mean 'passes'"):
        strato.Strategy().replace(pases=[])


def test_strategy_is_frozen():
    import attrs

    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        strato.Strategy().disable = ("x",)


def test_bad_disable_value_names_the_field():
    with pytest.raises(strato.StrategyError, match="Strategy.disable"):
        strato.Strategy(disable=[3])


def test_bad_pass_import_path_names_the_field():
    with pytest.raises(strato.StrategyError, match="Strategy.passes: cannot import"):
        strato.Strategy.from_dict({"passes": ["examples.custom_pass:no_such_pass"]})
    with pytest.raises(strato.StrategyError, match="import path"):
        strato.Strategy.from_dict({"passes": ["no_colon_here"]})


def test_yaml_round_trip(tmp_path):
    strategy = strato.Strategy(passes=[tanh_gelu], disable=["eliminate_dead_code"])
    text = strategy.to_yaml(tmp_path / "s.yaml")
    assert "examples.custom_pass:tanh_gelu" in text
    assert strato.Strategy.from_yaml(tmp_path / "s.yaml") == strategy
    assert strato.Strategy.from_yaml(text) == strategy
    assert strato.Strategy.from_dict(strategy.to_dict()) == strategy


def test_yaml_must_be_a_mapping():
    with pytest.raises(strato.StrategyError, match="mapping"):
        strato.Strategy.from_yaml("- a\n- b\n")


def test_every_field_is_documented():
    import attrs

    from strato.compiler.strategy import field_docstrings

    docs = field_docstrings(strato.Strategy)
    missing = [f.name for f in attrs.fields(strato.Strategy) if not docs.get(f.name)]
    assert missing == [], f"Strategy fields without a docstring: {missing}"
    assert "disable" in strato.Strategy.describe()


# ---------------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", [strato.WarmupLinear, strato.WarmupCosine, strato.Polynomial])
def test_decaying_schedules_need_total_steps(kind):
    with pytest.raises(strato.StrategyError, match=rf"{kind.__name__}.total_steps: required"):
        kind(warmup_steps=10)
    with pytest.raises(strato.StrategyError, match=r"total_steps: required"):
        strato.Strategy.from_dict({"schedule": {"kind": kind.__name__}})


def test_training_past_total_steps_holds_the_final_lr_and_warns_once():
    import warnings

    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    schedule = strato.WarmupLinear(total_steps=3, min_lr_ratio=0.25)
    strategy = strato.Strategy(optimizer=strato.SGD(lr=0.1, momentum=0.0), schedule=schedule)
    x = torch.randn(2, 4)
    engine = strato.compile(model, strategy, example_inputs=(x,))
    lrs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            lrs.append(engine.lr)
            engine.backward(engine(x).pow(2).mean())
            engine.step()
    assert lrs == pytest.approx(
        [0.1, 0.1 * (0.25 + 0.75 * 2 / 3), 0.1 * (0.25 + 0.75 / 3)] + [0.025] * 3
    )
    past = [w for w in caught if "past the end of the schedule" in str(w.message)]
    assert len(past) == 1
    assert "WarmupLinear.total_steps=3" in str(past[0].message)


@pytest.mark.parametrize(
    "kind, meant",
    [
        ("WarmupLR", "Constant"),
        ("WarmupDecayLR", "WarmupLinear"),
        ("cosine", "WarmupCosine"),
        ("constant_with_warmup", "Constant"),
        ("warmup_cosine", "WarmupCosine"),
    ],
)
def test_schedule_did_you_mean_points_to_the_same_meaning(kind, meant):
    with pytest.raises(strato.StrategyError) as info:
        strato.Strategy.from_dict({"schedule": {"kind": kind, "warmup_steps": 3}})
    assert f"Did you mean {meant!r}" in str(info.value)
    assert "Strategy.schedule.kind" in str(info.value)


def test_errors_about_optimizers_and_schedules_name_the_kind_key():
    with pytest.raises(strato.StrategyError, match=r"needs a 'kind' key.*AdamW, SGD"):
        strato.Strategy.from_dict({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    with pytest.raises(strato.StrategyError, match=r"needs a 'kind' key"):
        strato.Strategy.from_dict({"schedule": {"warmup_steps": 3}})
    with pytest.raises(
        strato.StrategyError, match=r"optimizer \(kind AdamW\): unknown field 'lrr'.*kind"
    ):
        strato.Strategy.from_dict({"optimizer": {"kind": "AdamW", "lrr": 1e-3}})
    with pytest.raises(strato.StrategyError, match=r"'kind' key names one"):
        strato.Strategy(optimizer={"lr": 1e-3})


# ---------------------------------------------------------------------- precision "auto"


def _fake_cpu(monkeypatch, flags):
    from strato.compiler import hardware

    monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware, "_torch_cpu_check", lambda name: False)
    hardware.cpu_support.cache_clear()
    monkeypatch.setattr(hardware, "_warned_emulated", set())


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    from strato.compiler import hardware

    try:
        _fake_cpu(monkeypatch, {"avx2", "avx512f", "avx512_bf16"})
        assert hardware.choose_precision("auto").precision == "bf16"
        _fake_cpu(monkeypatch, {"avx2", "amx_tile", "amx_bf16"})
        assert hardware.choose_precision("auto").precision == "bf16"
        _fake_cpu(monkeypatch, {"avx2", "avx512f", "avx512bw"})  # AVX-512 without BF16
        choice = hardware.choose_precision("auto")
        assert choice.precision == "fp32" and "no native bf16" in choice.reason
    finally:
        hardware.cpu_support.cache_clear()


def test_auto_precision_matches_this_machine_and_explain_shows_why():
    import torch

    from strato.compiler import hardware

    native = bool(
        torch.cpu._is_avx512_bf16_supported()
        or torch.cpu._is_amx_tile_supported()
        or {"avx512_bf16", "amx_bf16"} & (hardware._cpuinfo_flags() or set())
    )
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    compiled = strato.compile(
        model,
        strato.Strategy(precision="auto", optimizer=strato.SGD(lr=0.1)),
        example_inputs=(torch.randn(3, 8),),
    )
    assert compiled.strategy.precision == ("bf16" if native else "fp32")
    notes = "\n".join(compiled.explain().notes)
    assert f"precision auto -> {compiled.strategy.precision}:" in notes


def test_explicit_bf16_on_emulating_hardware_trains_and_warns_once(monkeypatch):
    import torch

    from strato.compiler import hardware

    _fake_cpu(monkeypatch, {"avx2"})
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        strategy = strato.Strategy(precision="bf16", optimizer=strato.SGD(lr=0.1))
        x = torch.randn(3, 8)
        with pytest.warns(UserWarning, match="fp32 is faster here") as caught:
            engine = strato.compile(model, strategy, example_inputs=(x,))
            strato.compile(model, strategy, example_inputs=(x,))
        assert len([w for w in caught if "fp32 is faster" in str(w.message)]) == 1
        assert engine.strategy.precision == "bf16"
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    finally:
        hardware.cpu_support.cache_clear()


def test_precision_rejects_unknown_values_listing_auto():
    with pytest.raises(strato.StrategyError, match="expected 'auto', 'fp32', 'bf16' or 'fp16'"):
        strato.Strategy(precision="bfloat16")


def test_auto_precision_on_cuda_follows_compute_capability(monkeypatch):
    """No GPU here: torch.cuda's capability queries are stubbed (this tests the rule)."""
    import torch

    from strato.compiler import hardware

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "test GPU")
    for capability, expected in (((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        choice = hardware.choose_precision("auto", torch.device("cuda", 0))
        assert choice.precision == expected, capability
        assert f"compute capability {capability[0]}.{capability[1]}" in choice.reason


def test_batch_sizes_are_checked_against_the_data_parallel_ranks_of_the_mesh():
    """train_batch_size = micro x accumulation x (replicate x shard): on 8 ranks with
    tensor 2 x pipeline 2 only 2 ranks see different samples."""
    from strato.compiler.strategy import check_batch_sizes

    strategy = strato.Strategy(train_batch_size=8, micro_batch_size=2, grad_accumulation=2)
    check_batch_sizes(strategy, {"pipeline": 2, "replicate": 1, "shard": 2, "tensor": 2})
    check_batch_sizes(strategy, {"replicate": 2, "shard": 1})
    with pytest.raises(strato.StrategyError) as info:
        check_batch_sizes(strategy, {"replicate": 1, "shard": 4, "tensor": 2})
    message = str(info.value)
    assert "2 x data-parallel size 4 (mesh replicate x shard, of 8 ranks) = 16" in message
    only_total = strato.Strategy(train_batch_size=12, grad_accumulation=3)
    check_batch_sizes(only_total, {"replicate": 1, "shard": 2, "tensor": 4})
    with pytest.raises(strato.StrategyError, match="not divisible by grad_accumulation 3 x"):
        check_batch_sizes(only_total, {"replicate": 1, "shard": 8})


def test_compile_checks_batch_sizes_against_its_mesh():
    """One process: data-parallel size 1, so 8 != 2 x 2 x 1 is refused at compile."""
    from tests.training_utils import batch, tiny_gpt

    strategy = strato.Strategy(
        optimizer=strato.SGD(lr=0.1), train_batch_size=8, micro_batch_size=2, grad_accumulation=2
    )
    with pytest.raises(strato.StrategyError, match="x data-parallel size 1 = 4"):
        strato.compile(tiny_gpt(), strategy, example_inputs=batch(0, 2))
    fits = strategy.replace(train_batch_size=4)
    strato.compile(tiny_gpt(), fits, example_inputs=batch(0, 2))  # 4 = 2 x 2 x 1: compiles
