"""Pipeline parallelism: throughput, measured bubble and peak stored activations per stage
for each schedule at P=2 and P=4, against the single-process run of the same model and batch.

Every pipelined run is real processes over gloo (torch.multiprocessing, one thread each).
The bubble is measured from the executor's timeline (idle time / step span on each rank,
averaged over ranks and warm steps) next to the planned one (unit costs) and the 1F1B
ideal (P-1)/(M+P-1). Stored activations: a saved-tensor hook counts the bytes autograd
keeps (distinct storages, parameters excluded) and their peak during a step, shown also in
micro-batches' worth (GPipe's peak / M). Model-state bytes per rank (parameters,
gradients, AdamW states: each rank holds only its stages' parameters) are shown next to
the single process's, the largest rank's as a fraction of it. DeepSpeed's PipelineModule is run when
`deepspeed` is installed (it is not here: the row says so).

    python bench/pipeline.py [--steps 6] [--microbatches 8] [--out bench/results/pipeline.json]

Note: this machine has 2 cores shared by every process, so P=4 runs 4 ranks on 2 cores:
its times and bubbles measure contention as much as the schedule.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT.parent) not in sys.path:
    sys.path.insert(0, str(ROOT.parent))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import first_error, launch_ranks, run_rank, write_json  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402

CFG = GPTConfig(vocab_size=2048, seq_len=64, d_model=128, n_layers=4, n_heads=4)
BATCH = 16


class SavedActivations:
    """Bytes of distinct storages autograd holds for backward (parameters excluded), now
    and at their peak, via a saved-tensor hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.refs: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int, nbytes: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.current -= nbytes

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        holder = _Saved(t)
        if ptr in self.params or t.device.type == "meta":
            return holder
        if ptr not in self.refs:
            self.refs[ptr] = 0
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[ptr] += 1
        weakref.finalize(holder, self._release, ptr, storage.nbytes())
        return holder

    @staticmethod
    def unpack(holder):
        return holder.tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, CFG.vocab_size, (BATCH, CFG.seq_len + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def run_variant(variant: dict, steps: int, rank: int, out: str) -> dict:
    import strato

    torch.manual_seed(0)
    model = GPT(CFG)
    pipeline = None
    if variant["stages"] > 1:
        pipeline = strato.Pipeline(
            stages=variant["stages"],
            microbatches=variant["microbatches"],
            schedule=variant["schedule"],
            virtual_stages=variant.get("virtual_stages", 1),
        )
    strategy = strato.Strategy(
        optimizer=strato.AdamW(lr=1e-4),
        pipeline=pipeline,
        grad_accumulation=1 if pipeline else variant["microbatches"],
    )
    engine = strato.compile(model, strategy, example_inputs=batch(0))
    saved = SavedActivations(model)
    times, bubbles, peaks = [], [], []
    for step in range(steps):
        saved.peak = saved.current
        start = time.perf_counter()
        with saved.hooks():
            loss = engine.train_step(*batch(step))
        times.append(time.perf_counter() - start)
        peaks.append(saved.peak)
        if pipeline is not None:
            timeline = engine.timeline()
            bubbles.append(timeline.mean_bubble())
            if rank == 0 and step == steps - 1 and variant.get("png"):
                timeline.plot(variant["png"])
                engine.schedule().plot(variant["png"].replace(".png", "_plan.png"))
    result = {
        "times": times,
        "peak_saved": max(peaks[1:] or peaks),
        "loss": loss,
        # Parameters + gradients + AdamW states this rank holds (its stages' only).
        "model_state_bytes": engine.stats()["model_state_bytes"],
    }
    if pipeline is not None:
        result["bubble"] = statistics.mean(bubbles[2:] or bubbles)
        result["planned_bubble"] = engine.schedule().bubble()
    return result


def worker(rank: int, world: int, port: int, out: str, variant: dict, steps: int) -> None:
    def work() -> dict:
        if world > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        return run_variant(variant, steps, rank, out)

    run_rank(rank, world, port, out, work)


def launch(variant: dict, steps: int) -> dict:
    ranks = launch_ranks(worker, variant["stages"], variant, steps)
    if first_error(ranks):
        return {"error": first_error(ranks)}
    warm = [statistics.median(r["times"][2:] or r["times"]) for r in ranks]
    step_s = max(warm)
    result = {
        "step_s": step_s,
        "tokens_per_s": BATCH * CFG.seq_len / step_s,
        "peak_saved_per_rank": [r["peak_saved"] for r in ranks],
        "model_state_bytes_per_rank": [r["model_state_bytes"] for r in ranks],
        "loss": ranks[0]["loss"],
    }
    if "bubble" in ranks[0]:
        result["bubble"] = ranks[0]["bubble"]
        result["planned_bubble"] = ranks[0]["planned_bubble"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per run (first 2 warm up)")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--out", default="bench/results/pipeline.json")
    parser.add_argument("--only", default="", help="comma-separated names, e.g. p2-1f1b")
    args = parser.parse_args()
    m = args.microbatches
    png = str(Path(args.out).with_name("pipeline_timeline.png"))
    variants = [
        {"name": "single", "stages": 1, "microbatches": m},
        {"name": "p2-gpipe", "stages": 2, "schedule": "gpipe", "microbatches": m},
        {"name": "p2-1f1b", "stages": 2, "schedule": "1f1b", "microbatches": m, "png": png},
        {
            "name": "p2-interleaved",
            "stages": 2,
            "schedule": "interleaved",
            "virtual_stages": 2,
            "microbatches": m,
        },
        {"name": "p2-zero_bubble", "stages": 2, "schedule": "zero_bubble", "microbatches": m},
        {"name": "p4-gpipe", "stages": 4, "schedule": "gpipe", "microbatches": m},
        {"name": "p4-1f1b", "stages": 4, "schedule": "1f1b", "microbatches": m},
        {"name": "p4-zero_bubble", "stages": 4, "schedule": "zero_bubble", "microbatches": m},
    ]
    only = {n for n in args.only.split(",") if n}
    results: dict[str, dict] = {}
    for variant in variants:
        if only and variant["name"] not in only:
            continue
        results[variant["name"]] = {**launch(variant, args.steps), "config": variant}
    results["deepspeed-pipe"] = _deepspeed_row()
    gpipe_peak = {
        p: max(results[f"p{p}-gpipe"]["peak_saved_per_rank"]) / m
        for p in (2, 4)
        if "peak_saved_per_rank" in results.get(f"p{p}-gpipe", {})
    }
    print(
        f"GPT d={CFG.d_model} L={CFG.n_layers} vocab={CFG.vocab_size} seq={CFG.seq_len}, "
        f"batch {BATCH}, M={m} micro-batches, AdamW fp32, gloo on CPU"
    )
    header = (
        f"{'run':<16}{'step ms':>9}{'tok/s':>9}{'bubble':>9}{'planned':>9}"
        f"{'ideal 1F1B':>11}{'peak act (mb)':>15}{'state/rank':>12}"
    )
    print(header)
    single_state = results.get("single", {}).get("model_state_bytes_per_rank", [0])[0]
    for name, r in results.items():
        if "error" in r or "skipped" in r:
            print(f"{name:<16}  {r.get('skipped') or r['error'].strip().splitlines()[-1]}")
            continue
        p = r["config"]["stages"]
        ideal = (p - 1) / (m + p - 1) if p > 1 else 0.0
        r["ideal_1f1b_bubble"] = ideal
        unit = gpipe_peak.get(p)
        peak = max(r["peak_saved_per_rank"])
        r["peak_saved_microbatches"] = peak / unit if unit else None
        shown = f"{peak / 2**20:.1f}MiB" + (f" ({peak / unit:.1f})" if unit else "")
        state = max(r["model_state_bytes_per_rank"])
        if single_state:
            r["model_state_vs_single"] = state / single_state
        state_shown = f"{state / 2**20:.1f}MiB" + (
            f" ({state / single_state:.2f})" if single_state else ""
        )
        print(
            f"{name:<16}{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>9.0f}"
            f"{r.get('bubble', 0.0):>9.1%}{r.get('planned_bubble', 0.0):>9.1%}"
            f"{ideal:>11.1%}{shown:>15}{state_shown:>17}"
        )
    print(f"measured timeline: {png}")
    path = write_json(results, args.out)
    print(f"wrote {path}")


def _deepspeed_row() -> dict:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return {"skipped": "deepspeed is not installed here: no PipelineModule row"}
    return {"skipped": "deepspeed is installed but its PipelineModule run is not written yet"}


if __name__ == "__main__":
    main()
