#!/usr/bin/env bash
# Two-GPU NCCL check of Strato's collectives: every tensor every collective receives must be
# on the GPU (NCCL rejects CPU tensors), for data parallel and ZeRO 1-3 on the meshes
# replicate=1 x shard=2 and replicate=2 x shard=1, and the stages must train alike.
# Needs 2 CUDA GPUs; not runnable on a CPU-only machine.
#
#     bash bench/gpu_check.sh            # prints one line per (mesh, stage), exits 1 on failure
#     DEVICE=cpu bash bench/gpu_check.sh # the same check over gloo on CPU (a dry run of the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export DEVICE=${DEVICE:-cuda}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$DEVICE" = cuda ] && [ "$GPUS" -lt 2 ]; then
    echo "bench/gpu_check.sh needs 2 CUDA GPUs; this machine has $GPUS." >&2
    exit 2
fi
SCRIPT=$(mktemp --suffix=.py)
trap 'rm -f "$SCRIPT"' EXIT
cat > "$SCRIPT" <<'PY'
import os
import sys

import torch

sys.path.insert(0, os.getcwd())  # examples/
import strato  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402
from strato.runtime import collectives  # noqa: E402

CFG = GPTConfig(vocab_size=97, seq_len=16, d_model=64, n_layers=2, n_heads=4)
rank = int(os.environ["RANK"])
device = os.environ["DEVICE"]
if device == "cuda":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
failures = []
for mesh in ({"replicate": 1, "shard": 2}, {"replicate": 2, "shard": 1}):
    losses = {}
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        model = GPT(CFG).to(device)
        strategy = strato.Strategy(
            optimizer=strato.SGD(lr=0.1), zero=stage, mesh=strato.Mesh(**mesh)
        )
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len), generator=g).to(device)
        y = torch.roll(x, -1, dims=1)
        engine = strato.compile(model, strategy, example_inputs=(x, y))
        seen = set()
        with collectives.observe(lambda op, group, devs: seen.update((op, group, d.type) for d in devs)):
            for _ in range(3):
                loss = engine.train_step(x, y)
        losses[stage] = float(loss)
        wrong = sorted(s for s in seen if s[2] != device)
        status = "ok" if seen and not wrong else f"FAIL (not on {device}: {wrong or 'no collectives'})"
        if status != "ok":
            failures.append((mesh, stage))
        if rank == 0:
            print(f"mesh {mesh} zero={stage}: loss {losses[stage]:.6f}, "
                  f"{len(seen)} (op, group) kinds, {status}")
        if hasattr(engine.manager, "close"):
            engine.manager.close()
    spread = max(losses.values()) - min(losses.values())
    if spread > 1e-4:
        failures.append((mesh, "losses differ across stages", losses))
if rank == 0:
    print("PASS" if not failures else f"FAIL: {failures}")
sys.exit(1 if failures else 0)
PY
OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 "$SCRIPT"
