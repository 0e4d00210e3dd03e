"""One rank of a Hugging Face mixed-precision test: started by tests/test_hf_multirank.py
with torch.multiprocessing (spawn, gloo, one thread); writes its results to
out_dir/rank<r>.pt (or its traceback to rank<r>.err)."""

from __future__ import annotations

import warnings

import torch

from tests import multirank
from tests.hf_models import example_kwargs, hf_batch, hf_model, train_losses


def train_variants(rank: int, world: int, spec: dict) -> list[dict]:
    """Train each (zero stage, precision) of spec['variants'] for spec['steps'] steps; then
    one eval batch of another size and length (ZeRO-3 cannot capture again: the sizes
    must be symbolic)."""
    import strato

    results = []
    for stage, precision in spec["variants"]:
        strategy = strato.Strategy(
            optimizer=strato.AdamW(lr=spec["lr"]), zero=stage, precision=precision
        )
        name = spec["model"]
        engine = strato.compile(
            hf_model(name), strategy, example_kwargs=example_kwargs(name, size=spec["per_rank"])
        )
        losses = train_losses(engine, name, spec["steps"], rank, world, spec["per_rank"])
        engine.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # a second capture would warn first
            eval_loss = engine(**hf_batch(name, 99, size=3, length=7), use_cache=False).loss
        results.append(
            {
                "stage": stage,
                "precision": precision,
                "losses": losses,
                "eval_loss": eval_loss.item(),
                "skipped": engine.stats()["skipped_steps"],
            }
        )
        getattr(engine.manager, "close", lambda: None)()
    return results


def run(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    multirank.run_rank(
        rank, world, port, out_dir, lambda: train_variants(rank, world, spec), timeout_s=120
    )
