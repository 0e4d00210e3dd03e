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
import os
import statistics
import sys
import time
import weakref
from pathlib import Path

import attrs
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT.parent) not in sys.path:
    sys.path.insert(0, str(ROOT.parent))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import first_error, launch_ranks, run_rank, write_json  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402


@attrs.frozen
class Preset:
    """A model and micro-batch size for the runs (batch = micro_batch x M)."""

    model: GPTConfig
    """The GPT the runs train."""
    micro_batch: int
    """Sequences per micro-batch."""
    note: str
    """What the preset is for."""


PRESETS = {
    "compute": Preset(
        GPTConfig(vocab_size=8192, seq_len=128, d_model=512, n_layers=8, n_heads=8),
        micro_batch=2,
        note="one micro-batch's F is tens of ms: compute dominates gloo latency",
    ),
    "small": Preset(
        GPTConfig(vocab_size=2048, seq_len=64, d_model=128, n_layers=4, n_heads=4),
        micro_batch=2,
        note="last session's model: a few ms per F, latency and Python overhead dominate",
    ),
}


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
        holder = _Saved(t.detach())  # not t: an output saved with its grad_fn is a cycle
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


def batch(preset: Preset, microbatches: int, step: int):
    cfg = preset.model
    g = torch.Generator().manual_seed(step)
    x = torch.randint(
        0, cfg.vocab_size, (preset.micro_batch * microbatches, cfg.seq_len + 1), generator=g
    )
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def run_variant(variant: dict, steps: int, rank: int, out: str) -> dict:
    import strato

    preset = PRESETS[variant["preset"]]
    m = variant["microbatches"]
    torch.manual_seed(0)
    model = GPT(preset.model)
    pipeline = None
    if variant["stages"] > 1:
        pipeline = strato.Pipeline(
            stages=variant["stages"],
            microbatches=m,
            schedule=variant["schedule"],
            virtual_stages=variant.get("virtual_stages", 1),
        )
    strategy = strato.Strategy(
        optimizer=strato.AdamW(lr=1e-4),
        pipeline=pipeline,
        grad_accumulation=1 if pipeline else m,
    )
    engine = strato.compile(model, strategy, example_inputs=batch(preset, m, 0))
    saved = SavedActivations(model)
    times, cpu_times, bubbles, peaks, breakdowns, per_mb = [], [], [], [], [], []
    for step in range(steps):
        saved.peak = saved.current
        start, cpu_start = time.perf_counter(), time.process_time()
        with saved.hooks():
            loss = engine.train_step(*batch(preset, m, step))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        peaks.append(saved.peak)
        if pipeline is not None:
            timeline = engine.timeline()
            bubbles.append(timeline.mean_bubble())
            breakdowns.append(timeline.breakdown())
            per_mb.append(timeline.compute_per_microbatch())
            if rank == 0 and step == steps - 1 and variant.get("png"):
                timeline.plot(variant["png"])
                engine.schedule().plot(variant["png"].replace(".png", "_plan.png"))
    result = {
        "times": times,
        "cpu_times": cpu_times,
        "peak_saved": max(peaks[1:] or peaks),
        "loss": loss,
        # Parameters + gradients + AdamW states this rank holds (its stages' only).
        "model_state_bytes": engine.stats()["model_state_bytes"],
    }
    if pipeline is not None:
        warm = slice(2, None) if steps > 2 else slice(None)
        result["bubble"] = statistics.mean(bubbles[warm])
        result["planned_bubble"] = engine.schedule().bubble()
        ranks = sorted(breakdowns[0])
        result["breakdown_per_rank"] = [
            {k: statistics.mean(b[r][k] for b in breakdowns[warm]) for k in breakdowns[0][r]}
            for r in ranks
        ]
        result["compute_per_microbatch_s"] = [
            statistics.mean(c[r] for c in per_mb[warm]) for r in ranks
        ]
    return result


def worker(rank: int, world: int, port: int, out: str, variant: dict, steps: int) -> None:
    def work() -> dict:
        if world > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        return run_variant(variant, steps, rank, out)

    run_rank(rank, world, port, out, work)


def launch(variant: dict, steps: int) -> dict:
    preset = PRESETS[variant["preset"]]
    ranks = launch_ranks(worker, variant["stages"], variant, steps)
    if first_error(ranks):
        return {"error": first_error(ranks)}
    warm = slice(2, None) if steps > 2 else slice(None)
    slowest = max(range(len(ranks)), key=lambda r: statistics.median(ranks[r]["times"][warm]))
    step_s = statistics.median(ranks[slowest]["times"][warm])
    tokens = preset.micro_batch * variant["microbatches"] * preset.model.seq_len
    result = {
        "step_s": step_s,
        "step_cpu_s": statistics.median(ranks[slowest]["cpu_times"][warm]),
        "tokens_per_s": tokens / step_s,
        "peak_saved_per_rank": [r["peak_saved"] for r in ranks],
        "model_state_bytes_per_rank": [r["model_state_bytes"] for r in ranks],
        "loss": ranks[0]["loss"],
    }
    for key in ("bubble", "planned_bubble", "breakdown_per_rank", "compute_per_microbatch_s"):
        if key in ranks[0]:
            result[key] = ranks[0][key]
    return result


def variants(m: int, png: str) -> list[dict]:
    interleaved = {"schedule": "interleaved", "virtual_stages": 2}
    out = [{"name": "single", "stages": 1}]
    for p, schedules in (
        (2, ("gpipe", "1f1b", "interleaved", "zero_bubble")),
        (4, ("gpipe", "1f1b", "zero_bubble")),
    ):
        for schedule in schedules:
            run = {"name": f"p{p}-{schedule}", "stages": p, "schedule": schedule}
            if schedule == "interleaved":
                run.update(interleaved)
            out.append(run)
    for run in out:
        run["microbatches"] = m
        if run["name"] == "p2-1f1b":
            run["png"] = png
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="compute", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=4, help="steps per run (first 2 warm up)")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--out", default="bench/results/pipeline.json")
    parser.add_argument("--only", default="", help="comma-separated names, e.g. single,p2-1f1b")
    parser.add_argument(
        "--deepspeed-path",
        default="",
        help="a folder holding deepspeed (pip install --target ...): adds the DeepSpeed row",
    )
    args = parser.parse_args()
    m = args.microbatches
    preset = PRESETS[args.preset]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    png = str(Path(args.out).with_name("pipeline_timeline.png"))
    only = {n for n in args.only.split(",") if n}
    results: dict[str, dict] = {}
    for variant in variants(m, png):
        if only and variant["name"] not in only:
            continue
        variant["preset"] = args.preset
        results[variant["name"]] = {**launch(variant, args.steps), "config": variant}
    if not only or "deepspeed-pipe" in only:
        results["deepspeed-pipe"] = deepspeed_row(args, 2)
    cfg = preset.model
    cores = os.cpu_count() or 1
    print(
        f"preset {args.preset}: GPT d={cfg.d_model} L={cfg.n_layers} vocab={cfg.vocab_size} "
        f"seq={cfg.seq_len}, micro-batch {preset.micro_batch} x M={m}, AdamW fp32, gloo on "
        f"CPU, {cores} cores ({preset.note})"
    )
    print(
        f"{'run':<16}{'step ms':>9}{'cpu ms':>8}{'tok/s':>8}{'vs 1':>6}{'bubble':>8}"
        f"{'planned':>8}{'ideal':>7}{'F+B+W/mb per rank (ms)':>24}{'peak act (mb)':>15}"
        f"{'state/rank':>17}"
    )
    gpipe_peak = {  # one micro-batch's stored activations on a rank: GPipe's peak / M
        p: max(results[f"p{p}-gpipe"]["peak_saved_per_rank"]) / m
        for p in (2, 4)
        if "peak_saved_per_rank" in results.get(f"p{p}-gpipe", {})
    }
    single = results.get("single", {})
    single_state = single.get("model_state_bytes_per_rank", [0])[0]
    single_tok = single.get("tokens_per_s")
    for name, r in results.items():
        if "error" in r or "skipped" in r:
            print(f"{name:<16}  {r.get('skipped') or r['error'].strip().splitlines()[-1]}")
            continue
        p = r["config"]["stages"]
        ideal = (p - 1) / (m + p - 1) if p > 1 else 0.0
        r["ideal_1f1b_bubble"] = ideal
        peak = max(r["peak_saved_per_rank"])
        unit = gpipe_peak.get(p)
        r["peak_saved_microbatches"] = peak / unit if unit else None
        shown = f"{peak / 2**20:.1f}MiB" + (f" ({peak / unit:.1f})" if unit else "")
        state = max(r["model_state_bytes_per_rank"])
        if single_state:
            r["model_state_vs_single"] = state / single_state
        state_shown = f"{state / 2**20:.1f}MiB" + (
            f" ({state / single_state:.2f})" if single_state else ""
        )
        if single_tok:
            r["tokens_per_s_vs_single"] = r["tokens_per_s"] / single_tok
        per_mb = "/".join(f"{c * 1e3:.0f}" for c in r.get("compute_per_microbatch_s", []))
        print(
            f"{name:<16}{r['step_s'] * 1e3:>9.1f}{r['step_cpu_s'] * 1e3:>8.0f}"
            f"{r['tokens_per_s']:>8.0f}{r.get('tokens_per_s_vs_single', 0):>6.2f}"
            f"{_percent(r.get('bubble')):>8}{_percent(r.get('planned_bubble')):>8}"
            f"{ideal:>7.1%}{per_mb:>24}{shown:>15}{state_shown:>17}"
        )
    print("\nwhere each rank's step span goes (mean of warm steps; % of span):")
    print(
        f"{'run':<16}{'rank':>5}{'span ms':>9}{'F':>7}{'B':>7}{'W':>7}{'recv wait':>10}{'send':>7}{'other':>7}"
    )
    for name, r in results.items():
        for rank, b in enumerate(r.get("breakdown_per_rank", [])):
            span = b["span"] or 1.0
            print(
                f"{name:<16}{rank:>5}{b['span'] * 1e3:>9.1f}{b['F'] / span:>7.1%}{b['B'] / span:>7.1%}"
                f"{b['W'] / span:>7.1%}{b['recv_wait'] / span:>10.1%}{b['send'] / span:>7.1%}"
                f"{b['other'] / span:>7.1%}"
            )
    if any(r.get("config", {}).get("stages", 1) > cores for r in results.values()):
        print(
            f"note: P=4 runs 4 ranks on {cores} cores (oversubscribed): their times and "
            "bubbles measure contention as much as the schedule, so no goal is claimed there."
        )
    print(f"measured timeline: {png}")
    path = write_json(results, args.out)
    print(f"wrote {path}")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


# ---------------------------------------------------------------------- DeepSpeed


def deepspeed_row(args: argparse.Namespace, stages: int) -> dict:
    """DeepSpeed's PipelineModule on the same GPT, M and micro-batch (1F1B, its only
    schedule), in its own processes with `--deepspeed-path` on their sys.path; a row that
    says why when it cannot run."""
    path = args.deepspeed_path
    if not path:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            return {
                "skipped": "deepspeed is not installed in this environment (pass "
                "--deepspeed-path DIR, DIR from pip install --target DIR deepspeed)"
            }
    elif not Path(path, "deepspeed").is_dir():
        return {"skipped": f"--deepspeed-path {path}: no deepspeed package there"}
    variant = {
        "name": "deepspeed-pipe",
        "stages": stages,
        "microbatches": args.microbatches,
        "preset": args.preset,
        "schedule": "1f1b",
    }
    ranks = launch_ranks(deepspeed_worker, stages, variant, args.steps, path)
    error = first_error(ranks)
    if error:
        return {
            "skipped": "DeepSpeed failed: " + error.strip().splitlines()[-1],
            "error_text": error,
        }
    warm = slice(2, None) if args.steps > 2 else slice(None)
    step_s = max(statistics.median(r["times"][warm]) for r in ranks)
    preset = PRESETS[args.preset]
    tokens = preset.micro_batch * args.microbatches * preset.model.seq_len
    return {
        "step_s": step_s,
        "step_cpu_s": max(statistics.median(r["cpu_times"][warm]) for r in ranks),
        "tokens_per_s": tokens / step_s,
        "peak_saved_per_rank": [r["peak_saved"] for r in ranks],
        "model_state_bytes_per_rank": [r["model_state_bytes"] for r in ranks],
        "loss": ranks[0]["loss"],
        "version": ranks[0]["version"],
        "config": variant,
    }


class _Embed(torch.nn.Module):
    """GPT's token + position embeddings as a pipe layer (its tok_emb is tied to the head)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok_emb = torch.nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = torch.nn.Embedding(cfg.seq_len, cfg.d_model)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))


def _head(embed: _Embed, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, embed.tok_emb.weight)


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    )


def deepspeed_worker(
    rank: int, world: int, port: int, out: str, variant: dict, steps: int, path: str
) -> None:
    def work() -> dict:
        if path:
            sys.path.insert(0, path)
        import deepspeed
        from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

        from examples.gpt import Block

        preset = PRESETS[variant["preset"]]
        cfg, m = preset.model, variant["microbatches"]
        deepspeed.init_distributed(dist_backend="gloo")
        torch.manual_seed(0)
        layers = [
            TiedLayerSpec("embed", _Embed, cfg, tied_weight_attr="tok_emb.weight"),
            *(LayerSpec(Block, cfg) for _ in range(cfg.n_layers)),
            LayerSpec(torch.nn.LayerNorm, cfg.d_model),
            TiedLayerSpec(
                "embed", _Embed, cfg, forward_fn=_head, tied_weight_attr="tok_emb.weight"
            ),
        ]
        model = PipelineModule(
            layers, num_stages=world, loss_fn=_loss, partition_method="type:Block"
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        config = {
            "train_batch_size": preset.micro_batch * m,
            "train_micro_batch_size_per_gpu": preset.micro_batch,
            "gradient_accumulation_steps": m,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        saved = SavedActivations(model)
        times, cpu_times, peaks, loss = [], [], [], None
        for step in range(steps):
            x, y = batch(preset, m, step)
            micro = list(zip(x.split(preset.micro_batch), y.split(preset.micro_batch)))
            saved.peak = saved.current
            start, cpu_start = time.perf_counter(), time.process_time()
            with saved.hooks():
                loss = engine.train_batch(data_iter=iter(micro))
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            peaks.append(saved.peak)
        params = [p for p in model.parameters() if p.requires_grad]
        state = sum(p.numel() * p.element_size() for p in params) * 4  # weights, grads, Adam m, v
        return {
            "times": times,
            "cpu_times": cpu_times,
            "peak_saved": max(peaks[1:] or peaks),
            "loss": float(loss),
            "model_state_bytes": state,
            "version": deepspeed.__version__,
        }

    run_rank(rank, world, port, out, work, DS_ACCELERATOR="cpu")


if __name__ == "__main__":
    main()
