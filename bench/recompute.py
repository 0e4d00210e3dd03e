"""Activation recomputation: the memory/time frontier of none, selective, full and budgets.

For the reference GPT (4 layers, d_model 256, seq 128; `--layers 8 --seq 512` for the
larger goal) each row compiles a training graph under one `Strategy.recompute` and measures
the bytes a forward leaves alive for backward (`runtime.saved_tensors.kept_bytes`, real
tensors) next to explain()'s estimate, and the median forward+backward time. Rows are timed
round-robin (one step of each row per round), so a machine whose load changes slows every
row alike and the ratios hold. Budget rows sit between full's and none's bytes; each is
checked: its bytes fit the budget, and its time is no worse than the fastest of
none/selective/full that fits (within --noise). With `--torch-compile`, torch.compile's
`activation_memory_budget` runs at the same fractions (inductor: a C++ compiler and
minutes on CPU); its bytes are those autograd's saved-tensor hooks see (inductor allocates
outside the dispatcher). Writes a table, JSON under bench/results/ and a PNG plot.

    .venv/bin/python -m strato.bench.recompute            # short default run
    .venv/bin/python -m strato.bench.recompute --layers 8 --seq 512
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

GOALS = {"selective": (0.50, 1.15), "full": (0.80, 1.40)}
"""Issue #14: bytes at least this much less than none, at most this step-time ratio."""


def strato_row(model, x, y, recompute) -> tuple[dict, callable]:
    engine = strato.compile(
        copy.deepcopy(model), strato.Strategy(recompute=recompute), example_inputs=(x, y)
    )
    engine.train()

    def step():
        engine(x, y).backward()

    record = engine._graphs[True].ctx.records.get("recompute", {})
    row = {
        "kept_bytes": kept_bytes(lambda: engine(x, y)).total,
        "estimate_bytes": engine.explain().activation_bytes,
        "plan": record.get("plan", "none"),
    }
    return row, step


def hooked_bytes(forward) -> int:
    """Bytes of the distinct storages autograd's saved-tensor hooks pack during `forward()`,
    the model's parameters left out."""
    storages: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def torch_compile_row(model, x, y, fraction: float) -> tuple[dict, callable]:
    import torch._functorch.config as functorch_config

    compiled = torch.compile(copy.deepcopy(model))

    def step():
        with functorch_config.patch(activation_memory_budget=fraction):
            compiled(x, y).backward()

    with functorch_config.patch(activation_memory_budget=fraction):
        step()  # compiles under this budget (the patch is part of dynamo's guards)
        kept = hooked_bytes(lambda: compiled(x, y))
    return {"kept_bytes": kept, "fraction": fraction}, step


def time_round_robin(steps: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (CPU, wall) seconds of each step, one step of every row per round. CPU time
    (this process's, one thread) is what the ratios use: on shared cores it counts the
    work done, not the time other processes held the core."""
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            cpu, wall = time.process_time(), time.perf_counter()
            step()
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    return {
        name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for name, ts in times.items()
    }


def check_budgets(rows: dict, noise: float) -> list[str]:
    """Each budget row fits its budget and is no slower than the fastest fixed policy that fits."""
    lines = []
    for name, row in rows.items():
        if "budget_bytes" not in row:
            continue
        limit = row["budget_bytes"]
        fits = [p for p in ("none", "selective", "full") if rows[p]["kept_bytes"] <= limit]
        best = min(fits, key=lambda p: rows[p]["step_s"]) if fits else None
        row["fits"] = row["kept_bytes"] <= limit
        row["best_fixed"] = best
        row["no_slower"] = best is None or row["step_s"] <= rows[best]["step_s"] * (1 + noise)
        versus = f"{row['step_s'] / rows[best]['step_s']:.2f}x {best}" if best else "no fixed fits"
        lines.append(
            f"{name}: {row['kept_bytes']:,d} B {'<=' if row['fits'] else '>'} {limit:,d} B "
            f"[{'ok' if row['fits'] else 'FAIL'}]; time {versus} "
            f"[{'ok' if row['no_slower'] else 'SLOWER'}]"
        )
    return lines


def check_goals(rows: dict) -> list[str]:
    base = rows["none"]
    lines = []
    for policy, (less, slower) in GOALS.items():
        saved = 1 - rows[policy]["kept_bytes"] / base["kept_bytes"]
        ratio = rows[policy]["step_s"] / base["step_s"]
        ok = saved >= less and ratio <= slower
        lines.append(
            f"{policy}: {saved:.0%} fewer bytes (goal >= {less:.0%}), {ratio:.2f}x step time "
            f"(goal <= {slower:.2f}x) [{'met' if ok else 'NOT met'}]"
        )
    return lines


def plot(rows: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("strato", "o"), ("torch.compile", "s")):
        named = {
            n: r for n, r in rows.items() if n.startswith("torch.compile") == (kind != "strato")
        }
        if not named:
            continue
        points = sorted((r["kept_bytes"] / 2**20, r["step_s"] * 1e3, n) for n, r in named.items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=kind)
        for mib, ms, name in points:
            ax.annotate(name, (mib, ms), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("saved activations per forward (MiB)")
    ax.set_ylabel("forward+backward (ms)")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 shared cores)")
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.1, 0.25, 0.5, 0.75])
    parser.add_argument("--noise", type=float, default=0.05, help="timing noise allowed")
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--out", default="bench/results/recompute.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=8192, seq_len=args.seq, d_model=args.d_model, n_layers=args.layers, dropout=0.1
    )
    model = GPT(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    rows, steps = {}, {}
    for policy in ("none", "selective", "full"):
        rows[policy], steps[policy] = strato_row(model, x, y, policy)
    none, full = rows["none"]["kept_bytes"], rows["full"]["kept_bytes"]
    for fraction in args.budgets:  # budgets between full's and none's bytes
        name, limit = f"budget {fraction:.2f}", int(full + fraction * (none - full))
        rows[name], steps[name] = strato_row(model, x, y, strato.Budget(limit))
        rows[name]["budget_bytes"] = limit
    if args.torch_compile:
        for fraction in args.budgets:
            name = f"torch.compile {fraction:.2f}"
            try:
                rows[name], steps[name] = torch_compile_row(model, x, y, fraction)
            except Exception as exc:  # no C++ compiler, an inductor failure on this CPU
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                print(f"torch.compile activation_memory_budget={fraction}: not run ({first})")
    for name, (cpu, wall) in time_round_robin(steps, args.repeats).items():
        rows[name].update(step_s=cpu, wall_s=wall)
    base = rows["none"]
    print(
        f"GPT {args.layers} layers, d_model {args.d_model}, seq {args.seq}, batch {args.batch}, "
        f"{args.threads} thread(s), median of {args.repeats} round-robin steps (CPU ms: this process)"
    )
    header = (
        f"{'config':<22}{'kept MiB':>10}{'vs none':>9}{'estimate':>10}{'CPU ms':>9}"
        f"{'vs none':>9}{'wall ms':>9}"
    )
    print(header + "\n" + "-" * len(header))
    for name, row in rows.items():
        est = row.get("estimate_bytes")
        print(
            f"{name:<22}{row['kept_bytes'] / 2**20:>10.2f}{row['kept_bytes'] / base['kept_bytes']:>9.2f}"
            f"{(est / 2**20 if est is not None else float('nan')):>10.2f}"
            f"{row['step_s'] * 1e3:>9.1f}{row['step_s'] / base['step_s']:>9.2f}{row['wall_s'] * 1e3:>9.1f}"
        )
    checks = check_goals(rows) + check_budgets(rows, args.noise)
    print("\n".join(checks))
    path = write_json({"config": vars(args), "rows": rows, "checks": checks}, args.out)
    print(f"wrote {path}")
    try:
        plot(rows, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    except ImportError:
        print("matplotlib not installed: no PNG")


if __name__ == "__main__":
    main()
