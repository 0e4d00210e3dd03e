"""DeepSpeed's activation_checkpointing section maps onto Strategy.recompute: every key is
honoured, has no effect, or is refused with its reason; the compiled model recomputes."""

from __future__ import annotations

import pytest

import strato
from strato.compiler.deepspeed import HONOURED, NO_EFFECT
from tests.training_utils import batch, tiny_gpt

SECTION = {
    "partition_activations": True,
    "cpu_checkpointing": True,
    "contiguous_memory_optimization": False,
    "number_checkpoints": 4,
    "synchronize_checkpoint_boundary": False,
    "profile": True,
}


def test_every_key_is_reported_and_recompute_is_set():
    config = {"train_micro_batch_size_per_gpu": 2, "activation_checkpointing": SECTION}
    strategy, report = strato.convert_deepspeed(config, world_size=1)
    assert strategy.recompute == strato.Recompute(modules=["<layers>"], policy="full", offload=True)
    status = {e.key: e.status for e in report.entries}
    assert status["activation_checkpointing"] == HONOURED
    assert status["activation_checkpointing.cpu_checkpointing"] == HONOURED
    for name in SECTION.keys() - {"cpu_checkpointing"}:
        assert status[f"activation_checkpointing.{name}"] == NO_EFFECT, name
    assert "activation_checkpointing" in str(report)


def test_section_compiles_to_recomputed_layers():
    strategy, _ = strato.convert_deepspeed(
        {"train_micro_batch_size_per_gpu": 2, "activation_checkpointing": {}}, world_size=1
    )
    assert strategy.recompute.offload is False
    model = tiny_gpt()
    compiled = strato.compile(model.train(), strategy, example_inputs=batch(0, 2))
    record = compiled._graphs[True].ctx.records["recompute"]
    assert record["plan"] == {"blocks.0": "full", "blocks.1": "full"}


def test_unknown_and_mistyped_keys_are_refused():
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "activation_checkpointing": {"cpu_checkpoint": True, "cpu_checkpointing": "yes"},
    }
    with pytest.raises(strato.StrategyError) as info:
        strato.convert_deepspeed(config, world_size=1)
    text = str(info.value)
    assert "activation_checkpointing.cpu_checkpoint = true: not a key" in text
    assert "Did you mean 'cpu_checkpointing'" in text
    assert 'activation_checkpointing.cpu_checkpointing = "yes": expected true or false' in text
