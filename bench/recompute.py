"""Activation recomputation: the memory/time frontier of none, selective, full and budgets.

For the reference GPT (4 layers, d_model 256, seq 128; `--layers 8 --seq 512` for the
larger goal) each row compiles a training graph under one `Strategy.recompute`, measures
the bytes a forward leaves alive for backward (`runtime.saved_tensors.kept_bytes`, real
tensors) and the median forward+backward time, and prints explain()'s estimate next to it.
With `--torch-compile`, torch.compile's `activation_memory_budget` runs at the same
fractions (inductor: needs a C++ compiler on CPU, and minutes). Writes a table, JSON under
bench/results/ and, where matplotlib is installed, a PNG plot.

    .venv/bin/python -m strato.bench.recompute            # short default run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import strato
from strato.bench.common import write_json
from strato.examples.gpt import GPT, GPTConfig
from strato.runtime.saved_tensors import kept_bytes


def _step_seconds(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def strato_row(model, x, y, recompute, repeats: int) -> dict:
    engine = strato.compile(
        copy.deepcopy(model), strato.Strategy(recompute=recompute), example_inputs=(x, y)
    )
    engine.train()

    def step():
        engine(x, y).backward()

    kept = kept_bytes(lambda: engine(x, y)).total
    return {
        "kept_bytes": kept,
        "estimate_bytes": engine.explain().activation_bytes,
        "step_s": _step_seconds(step, repeats),
        "plan": engine._graphs[True].ctx.records.get("recompute", {}).get("plan", "none"),
    }


def torch_compile_row(model, x, y, fraction: float, repeats: int) -> dict:
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    with functorch_config.patch(activation_memory_budget=fraction):
        compiled = torch.compile(copy.deepcopy(model))

        def step():
            compiled(x, y).backward()

        step()  # compiles
        kept = kept_bytes(lambda: compiled(x, y)).total
        return {"kept_bytes": kept, "step_s": _step_seconds(step, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.25, 0.5, 0.75])
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--out", default="bench/results/recompute.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=8192, seq_len=args.seq, d_model=args.d_model, n_layers=args.layers, dropout=0.1
    )
    model = GPT(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    rows = {}
    for policy in ("none", "selective", "full"):
        rows[policy] = strato_row(model, x, y, policy, args.repeats)
    none, full = rows["none"]["kept_bytes"], rows["full"]["kept_bytes"]
    for fraction in args.budgets:  # budgets between full's and none's bytes
        limit = int(full + fraction * (none - full))
        rows[f"budget {fraction:.2f}"] = {
            **strato_row(model, x, y, strato.Budget(limit), args.repeats),
            "budget_bytes": limit,
        }
    if args.torch_compile:
        for fraction in args.budgets:
            try:
                rows[f"torch.compile {fraction:.2f}"] = torch_compile_row(
                    model, x, y, fraction, args.repeats
                )
            except Exception as exc:  # no C++ compiler, an inductor failure on this CPU
                print(f"torch.compile activation_memory_budget={fraction}: skipped ({exc})")
    base = rows["none"]
    print(f"GPT {args.layers} layers, d_model {args.d_model}, seq {args.seq}, batch {args.batch}")
    header = (
        f"{'config':<22}{'kept MiB':>10}{'vs none':>9}{'estimate':>10}{'step ms':>9}{'vs none':>9}"
    )
    print(header + "\n" + "-" * len(header))
    for name, row in rows.items():
        est = row.get("estimate_bytes")
        print(
            f"{name:<22}{row['kept_bytes'] / 2**20:>10.2f}{row['kept_bytes'] / base['kept_bytes']:>9.2f}"
            f"{(est / 2**20 if est is not None else float('nan')):>10.2f}"
            f"{row['step_s'] * 1e3:>9.1f}{row['step_s'] / base['step_s']:>9.2f}"
        )
    path = write_json({"config": vars(args), "rows": rows}, args.out)
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in rows.items():
        ax.scatter(row["kept_bytes"] / 2**20, row["step_s"] * 1e3)
        ax.annotate(name, (row["kept_bytes"] / 2**20, row["step_s"] * 1e3), fontsize=8)
    ax.set_xlabel("saved activations (MiB)")
    ax.set_ylabel("forward+backward (ms)")
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120, bbox_inches="tight")
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
