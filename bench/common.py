"""What the benchmarks share: Llama-style models built from configs, launching ranks and
collecting their results, and writing results."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def llama(
    hidden_size: int,
    intermediate_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab_size: int,
):
    """A Llama-style causal LM of these sizes (512 positions), random weights, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def llama_100m():
    """A Llama-style causal LM of 134M parameters (12 layers, d=768), random weights."""
    return llama(768, 2048, layers=12, heads=12, kv_heads=12, vocab_size=32000)


def llama_30m():
    """A Llama-style causal LM of about 30M parameters (6 layers, d=512), random weights."""
    return llama(512, 1376, layers=6, heads=8, kv_heads=4, vocab_size=16000)


def write_json(result: dict, path: str | Path) -> Path:
    """Write `result` as indented JSON, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


# ---------------------------------------------------------------------- ranks


def launch_ranks(worker: Callable, world: int, *args, timeout: float = 900) -> list[dict]:
    """Run `worker(rank, world, port, out_dir, *args)` in `world` spawned processes (a free
    local port for their rendezvous) and return each rank's result dict, read from
    out_dir/rank<r>.json (written by `run_rank`); a rank that wrote none, or ran past
    `timeout` seconds (then killed), gives {"error": ...}."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=worker, args=(r, world, port, out, *args)) for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
        ranks = []
        for r in range(world):
            path = Path(out, f"rank{r}.json")
            ranks.append(json.loads(path.read_text()) if path.exists() else {"error": "no result"})
    return ranks


def first_error(ranks: list[dict]) -> str | None:
    """The first rank's traceback among `launch_ranks` results, or None."""
    return next((r["error"] for r in ranks if "error" in r), None)


def run_rank(rank: int, world: int, port: int, out: str, work: Callable[[], dict], **env) -> None:
    """One rank of `launch_ranks`: one thread, the env:// variables (and `env`) set, then
    `work()` (which initialises torch.distributed as it needs); its result, or the
    traceback as {"error": ...}, goes to out/rank<r>.json."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
        **env,
    )
    try:
        result = work()
    except Exception:
        result = {"error": traceback.format_exc()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
