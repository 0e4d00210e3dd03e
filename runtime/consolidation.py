"""`strato.consolidate(ckpt, out)`: a checkpoint's model as whole tensors, offline.

No process group and no model are needed: the pieces listed in metadata.json (each file's
sha256 checked first) are put in place by their global flat ranges. For Hugging Face models
the output is what transformers' `save_pretrained` writes (config.json,
generation_config.json where the model generates, model.safetensors with tied weights once),
so `AutoModelForCausalLM.from_pretrained(out)` loads it; for other models, model.safetensors
under the model's own state-dict names.

    python -m strato.consolidate ckpt/ out/   (consolidate.py: this main)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import checkpoint


def consolidate(checkpoint_path: str | Path, out: str | Path) -> Path:
    """Write the model of `checkpoint_path` (a save_checkpoint folder or one of its step
    folders) into `out` as whole tensors; returns `out`."""
    folder = checkpoint.resolve(checkpoint_path)
    metadata = checkpoint.read_metadata(folder)
    reader = checkpoint.TensorReader(folder, metadata)
    tensors = {}
    for name, entry in metadata["tensors"].items():
        if not name.startswith("model/"):
            continue
        numel = math.prod(entry["shape"])
        whole = reader.read(name, [(0, numel)] if numel else [])
        tensors[name.removeprefix("model/")] = whole.view(entry["shape"])
    return write_pretrained(
        Path(out),
        tensors,
        metadata.get("aliases", {}),
        metadata.get("hf_config"),
        metadata.get("hf_generation_config"),
    )


def write_pretrained(
    out: Path,
    tensors: dict[str, torch.Tensor],
    aliases: dict[str, str],
    hf_config: dict[str, Any] | None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """model.safetensors (tied tensors once, under their first name) and, for Hugging Face
    models, config.json / generation_config.json, as transformers' save_pretrained does."""
    out.mkdir(parents=True, exist_ok=True)
    once = {n: t.contiguous() for n, t in tensors.items() if n not in aliases}
    save_file(once, str(out / "model.safetensors"), metadata={"format": "pt"})
    if hf_config is not None:
        (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if generation_config is not None:
        (out / "generation_config.json").write_text(
            json.dumps(generation_config, indent=2, sort_keys=True) + "\n"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m strato.consolidate",
        description="Whole-tensor weights (and a Hugging Face config) from a Strato checkpoint.",
    )
    parser.add_argument("checkpoint", help="folder given to engine.save_checkpoint, or a step-*")
    parser.add_argument("out", help="output folder (from_pretrained loads it for HF models)")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.out)
    except checkpoint.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0
