"""The activation_checkpointing section: DeepSpeed's settings for the checkpointed layers a
Megatron-style model runs through deepspeed.checkpointing.checkpoint. Strato recomputes each
numbered layer fully instead (Strategy.recompute); cpu_checkpointing becomes offload, the
buffer, profiling and synchronisation knobs have no effect."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import did_you_mean
from ..recompute_config import Recompute

if TYPE_CHECKING:
    from .convert import Converter

_NO_EFFECT = {
    "contiguous_memory_optimization": "DeepSpeed copies partitioned checkpoints into one "
    "preallocated buffer against fragmentation; Strato leaves memory to PyTorch's allocator",
    "number_checkpoints": "sizes DeepSpeed's contiguous checkpoint buffer, which Strato has not",
    "synchronize_checkpoint_boundary": "a device synchronize at each checkpoint boundary "
    "(DeepSpeed's profiling aid); Strato's regions run without one",
    "profile": "DeepSpeed's timers of checkpointed forward/backward; time engine.train_step",
}
KEYS = ("partition_activations", "cpu_checkpointing", *_NO_EFFECT)
"""The keys of DeepSpeed's activation_checkpointing section (its config-json page)."""


def convert_activation_checkpointing(c: Converter, section: Mapping) -> None:
    """The section asks for checkpointed layers: Recompute('<layers>', 'full', offload)."""
    prefix = "activation_checkpointing"
    offload = section.get("cpu_checkpointing", False)
    if not isinstance(offload, bool):
        c.refuse(f"{prefix}.cpu_checkpointing", offload, "expected true or false")
        offload = False
    c.fields["recompute"] = Recompute(modules=("<layers>",), policy="full", offload=offload)
    c.honour(
        prefix,
        dict(section),
        f"recompute=Recompute(modules=['<layers>'], policy='full', offload={offload}): "
        "every numbered layer is recomputed in backward, as the layers a DeepSpeed model "
        "checkpoints (the loss tail is not: add '<tail>' to modules for it)",
    )
    for name, value in section.items():
        key = f"{prefix}.{name}"
        if name == "cpu_checkpointing":
            if isinstance(value, bool):
                c.honour(key, value, f"Recompute.offload={value} (region inputs kept on the host)")
        elif name == "partition_activations":
            if value and c.fields.get("tensor_parallel") is not None:
                c.refuse(
                    key,
                    value,
                    "splitting checkpointed inputs across tensor-parallel ranks is not "
                    "supported: every rank keeps its region inputs whole; set it to false",
                )
            else:
                c.no_effect(
                    key,
                    value,
                    "DeepSpeed splits checkpointed inputs across model-parallel ranks; "
                    "without tensor parallelism there is one, so they stay whole there too",
                )
        elif name in _NO_EFFECT:
            c.no_effect(key, value, _NO_EFFECT[name])
        else:
            c.refuse(
                key,
                value,
                f"not a key of DeepSpeed's activation_checkpointing section (its keys: "
                f"{', '.join(KEYS)}).{did_you_mean(name, KEYS)}",
            )
