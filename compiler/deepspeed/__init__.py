"""DeepSpeed configs as Strategies, with DeepSpeed's semantics (its config-json page and
deepspeed/runtime/{config,zero/config,fp16/loss_scaler,lr_schedules}.py).

`convert_deepspeed(config)` returns the Strategy and a `DeepSpeedReport` of what became of
every key: honoured (mapped to a Strategy field), no effect in Strato (logging, knobs
Strato handles its own way), or not mapped yet (pipeline). Keys
Strato cannot honour, and "auto" values nothing resolves, raise one StrategyError listing
them all. Keys a config leaves out take DeepSpeed's defaults where they change the math
(optimizer hyper-parameters, loss scaling, warmup); performance knobs left out keep Strato's.

"auto" values are resolved as the Hugging Face Trainer fills them: the train batch from the
micro batch, accumulation and world size; bucket sizes from the model's hidden size;
warmup_min_lr 0 and warmup_max_lr the optimizer's lr; bf16/fp16 "enabled" becomes
precision='auto'. The rest (learning rate, batch sizes, step counts...) come from the
Trainer's arguments, which Strato does not have: pass them as `auto={"dotted.key": value}`.
"""

from .convert import DEEPSPEED_KEYS, convert_deepspeed, looks_like_deepspeed
from .report import (
    HONOURED,
    NO_EFFECT,
    NOT_MAPPED,
    DeepSpeedReport,
    ReportEntry,
    warn_about_report,
)

__all__ = [
    "HONOURED",
    "NOT_MAPPED",
    "NO_EFFECT",
    "DEEPSPEED_KEYS",
    "DeepSpeedReport",
    "ReportEntry",
    "convert_deepspeed",
    "looks_like_deepspeed",
    "warn_about_report",
]
