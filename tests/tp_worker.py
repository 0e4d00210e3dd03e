"""One rank of a tensor-parallel test: started by tests/test_tensor_parallel_multirank.py
(torch.multiprocessing spawn, gloo, one thread), writes what it measured to out/rank<r>.pt."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from examples.gpt import GPT, GPTConfig
from tests.hf_models import example_kwargs, hf_batch, hf_model
from tests.multirank import run_rank
from tests.training_utils import batch

# Heads and MLP width divide by 2 and 4; the vocabulary by 2; the LM head is tied.
GPT_CFG = GPTConfig(vocab_size=64, seq_len=12, d_model=32, n_layers=2, n_heads=4)
BATCH = 4
LR = 0.1
DROPOUT_SEED = 1234


class _Projection(torch.nn.Module):
    """One linear wrapped in its own module (so the matcher, which pairs linears of one
    module, never sees a column/row pair)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class OddMLPNet(torch.nn.Module):
    """Token embedding, residual MLPs split over two submodules (`widen.dense` ->
    gelu -> `squeeze.dense`), LM head, cross-entropy: only a plan shards the MLPs."""

    def __init__(self, vocab: int = 64, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(width) for _ in range(layers))
        self.widen = torch.nn.ModuleList(_Projection(width, 3 * width) for _ in range(layers))
        self.squeeze = torch.nn.ModuleList(_Projection(3 * width, width) for _ in range(layers))
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for norm, widen, squeeze in zip(self.norms, self.widen, self.squeeze):
            x = x + squeeze(torch.nn.functional.gelu(widen(norm(x))))
        logits = self.head(x)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


ODD_PLAN = {"widen.*.dense": "column", "squeeze.*.dense": "row"}
"""The plan that shards OddMLPNet's MLPs Megatron-style."""


def build_model(name: str, seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    if name in ("gpt", "odd"):
        torch.manual_seed(seed)
        return GPT(replace(GPT_CFG, dropout=dropout)) if name == "gpt" else OddMLPNet()
    return hf_model(name, seed, dropout=dropout)


def global_batch(name: str, step: int, size: int = BATCH) -> dict:
    """Batch `step` as keyword inputs (our GPT: idx/targets; HF: input_ids/labels...)."""
    if name in ("gpt", "odd"):
        x, y = batch(step, size, GPT_CFG)
        return {"idx": x, "targets": y}
    return hf_batch(name, step, size=size)


def loss_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.loss


def eager_train(
    name: str, steps: int, precision: str = "fp32", batch_size: int = BATCH
) -> tuple[list[float], dict]:
    """The oracle: one process, plain PyTorch SGD on the whole (global) batch."""
    losses, weights, _ = eager_train_clipped(name, steps, None, precision, batch_size)
    return losses, weights


def eager_train_clipped(
    name: str,
    steps: int,
    clip: float | None,
    precision: str = "fp32",
    batch_size: int = BATCH,
    dropout: float = 0.0,
) -> tuple[list[float], dict, list[float]]:
    """`eager_train` with torch.nn.utils.clip_grad_norm_(clip) before each update: losses,
    final weights and the norm of each step (clip None: the norm, unclipped). With
    `dropout`, the RNG is seeded DROPOUT_SEED after building the model, as rank 0 does."""
    model = build_model(name, dropout=dropout)
    torch.manual_seed(DROPOUT_SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses, norms = [], []
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_of(model(**global_batch(name, step, batch_size)))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf)
        norms.append(float(norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: t.detach().clone() for n, t in model.state_dict().items()}, norms


def make_engine(spec: dict, rank: int, world: int):
    import strato

    name = spec["model"]
    model = build_model(name, dropout=spec.get("dropout", 0.0))
    # Each rank seeds its own stream; the pass gives the tensor group rank 0's (dropout).
    torch.manual_seed(DROPOUT_SEED + rank)
    tp = strato.TensorParallel(
        size=spec.get("size", 2),
        sequence_parallel=spec.get("sequence_parallel", False),
        plan=spec.get("plan"),
    )
    strategy = strato.Strategy(
        optimizer=strato.SGD(lr=LR, momentum=0.9),
        tensor_parallel=tp,
        precision=spec.get("precision", "fp32"),
        zero=spec.get("zero", 0),
        grad_clip=spec.get("grad_clip"),
        mesh=strato.Mesh(**spec.get("mesh", {})),
        pipeline=strato.Pipeline(**spec["pipeline"]) if "pipeline" in spec else None,
    )
    example = local_batch(spec, 0, rank, world)
    if name not in ("gpt", "odd"):
        example = {**example_kwargs(name, size=len(example["labels"])), **example}
    return strato.compile(model, strategy, example_kwargs=example)


def local_batch(spec: dict, step: int, rank: int, world: int) -> dict:
    """This rank's part of the global batch: ranks of one tensor group share their batch."""
    size = spec.get("size", 2) * spec.get("pipeline", {}).get("stages", 1)
    replicas = world // size
    data_rank = rank // size
    full = global_batch(spec["model"], step, BATCH * replicas)
    return {k: v[data_rank * BATCH : (data_rank + 1) * BATCH] for k, v in full.items()}


def scenario_train(rank: int, spec: dict, out: Path) -> dict:
    from strato.runtime import collectives

    engine = make_engine(spec, rank, dist.get_world_size())
    losses, norms, comm = [], [], []
    for step in range(spec["steps"]):
        before = collectives.comm_bytes_by_dim()
        losses.append(engine.train_step(**local_batch(spec, step, rank, dist.get_world_size())))
        comm.append(collectives.growth_by_dim(before, collectives.comm_bytes_by_dim()))
        norms.append(engine.stats()["grad_norm"])
    result = {
        "losses": losses,
        "grad_norms": norms,
        "comm": comm,
        "record": json.loads(json.dumps(engine.context.records["tensor_parallel"], default=str)),
        "layout": engine.context.records["layout"],
        "full": engine.full_state_dict(),
        "mesh": str(engine.mesh),
    }
    if spec.get("save"):
        engine.save_checkpoint(out / "ckpt")
        engine.wait_for_checkpoint()
    return result


def scenario_load(rank: int, spec: dict, out: Path) -> dict:
    """Load a checkpoint written at another tensor-parallel size, then train one step."""
    engine = make_engine(spec, rank, dist.get_world_size())
    step = engine.load_checkpoint(spec["load"])
    loaded = engine.full_state_dict()
    loss = engine.train_step(**local_batch(spec, step, rank, dist.get_world_size()))
    return {"step": step, "loaded": loaded, "loss": loss}


def serve(model: torch.nn.Module, strategy, prompt: torch.Tensor, tokens: int):
    """Compile `model` for inference and decode greedily (the whole prefix each step):
    (first logits, generated ids)."""
    import strato

    compiled = strato.compile(
        model, strategy, example_kwargs={"input_ids": prompt, "use_cache": False}
    )
    ids, first = prompt, None
    with torch.no_grad():
        for _ in range(tokens):
            logits = compiled(input_ids=ids, use_cache=False).logits
            first = logits if first is None else first
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return first, ids


def serving_prompt() -> torch.Tensor:
    return hf_batch("llama", 0, size=2, length=6)["input_ids"]


def scenario_serve(rank: int, spec: dict, out: Path) -> dict:
    """Tensor-parallel serving of the eval graph, optionally int8 (each rank quantizes its
    own blocks, since the tensor_parallel pass runs before quantize)."""
    import strato

    quantize = strato.Quantize(weights="int8") if spec.get("int8") else None
    strategy = strato.Strategy(
        tensor_parallel=strato.TensorParallel(size=spec.get("size", 2)), quantize=quantize
    )
    logits, ids = serve(build_model("llama").eval(), strategy, serving_prompt(), 5)
    return {"logits": logits, "ids": ids}


def scenario_errors(rank: int, spec: dict, out: Path) -> dict:
    """Compile models whose sizes do not divide over 2 ranks; the error of each."""
    import transformers as tf

    import strato

    cases = {
        "heads": GPT(GPTConfig(vocab_size=64, seq_len=8, d_model=36, n_layers=1, n_heads=3)),
        "vocab": GPT(GPTConfig(vocab_size=63, seq_len=8, d_model=32, n_layers=1, n_heads=2)),
        "kv_heads": tf.LlamaForCausalLM(
            tf.LlamaConfig(
                num_hidden_layers=1,
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=1,
                vocab_size=64,
            )
        ),
    }
    errors = {}
    for case, model in cases.items():
        strategy = strato.Strategy(
            optimizer=strato.SGD(lr=LR), tensor_parallel=strato.TensorParallel(size=2)
        )
        ids = torch.randint(0, 60, (2, 8))
        try:
            if case == "kv_heads":
                strato.compile(model, strategy, example_kwargs={"input_ids": ids, "labels": ids})
            else:
                strato.compile(model, strategy, example_inputs=(ids, ids))
            errors[case] = None
        except strato.StratoError as exc:
            errors[case] = str(exc)
    return errors


def scenario_generate(rank: int, spec: dict, out: Path) -> list[dict]:
    """`compiled.generate` (greedy) of tensor-parallel eval compiles, one per variant of
    spec['variants'] ({'model', 'int8', 'padded'}: left-padded batched prompts): the
    tokens, the per-rank cache layout and what the decode graph's pass recorded."""
    from strato.runtime.generate import generator_for

    results = []
    for variant in spec["variants"]:
        compiled = generation_compile(variant, spec.get("size", 2))
        prompt, mask = generation_prompt(variant.get("padded", False))
        ids = compiled.generate(prompt, max_new_tokens=6, attention_mask=mask)
        runner = generator_for(compiled)
        decode = runner.graph(1).context.records["tensor_parallel"]
        results.append(
            {
                "ids": ids,
                "key_shape": runner.layout.key_shape,
                "whole_key_shape": runner.capture_layout.key_shape,
                "split_inputs": decode["split_inputs"],
                "column": decode["column"],
            }
        )
    return results


def generation_compile(variant: dict, size: int):
    """The variant's model compiled for serving (tensor_parallel of `size`; 1: none)."""
    import strato

    quantize = strato.Quantize(weights="int8") if variant.get("int8") else None
    tensor_parallel = strato.TensorParallel(size=size) if size > 1 else None
    strategy = strato.Strategy(tensor_parallel=tensor_parallel, quantize=quantize)
    model = build_model(variant.get("model", "llama")).eval()
    prompt, _ = generation_prompt(False)
    return strato.compile(model, strategy, example_kwargs={"input_ids": prompt, "use_cache": False})


def generation_prompt(padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Two prompts of 6 tokens; `padded`: the second left-padded to 4 real tokens."""
    ids = hf_batch("llama", 0, size=2, length=6)["input_ids"]
    if not padded:
        return ids, None
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def scenario_mismatch(rank: int, spec: dict, out: Path) -> dict:
    """Rank 1 keeps the second MLP whole (plan 'replicate'), rank 0 splits it: building the
    engine must fail on every rank with the first differing collective, not hang."""
    import strato

    mine = {**spec, "plan": {"blocks.1.mlp.*": "replicate"} if rank == 1 else None}
    try:
        make_engine(mine, rank, dist.get_world_size())
    except strato.StratoError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": None}


def scenario_skewed(rank: int, spec: dict, out: Path) -> dict:
    """The tensor ranks are fed different batches (rank-offset steps, as a sampler split
    over the whole world would give): train_step, an eval call and the three-call loop's
    forward must each fail on every rank naming the input; then, fed the same batches,
    training goes on as eager from the untouched weights (SGD)."""
    import strato

    engine = make_engine(spec, rank, dist.get_world_size())
    errors = {}
    calls = {
        "train_step": lambda: engine.train_step(**global_batch(spec["model"], 10 + rank)),
        "eval": lambda: engine.eval()(**global_batch(spec["model"], 10 + rank)),
        "three_call": lambda: engine.train()(**global_batch(spec["model"], 10 + rank)),
    }
    for what, call in calls.items():
        try:
            call()
            errors[what] = None
        except strato.StratoError as exc:
            errors[what] = f"{type(exc).__name__}: {exc}"
    engine.train()
    losses = [engine.train_step(**global_batch(spec["model"], s)) for s in range(spec["steps"])]
    return {
        "errors": errors,
        "losses": losses,
        "full": engine.full_state_dict(),
        "data_parallel": (engine.data_parallel_rank, engine.data_parallel_size),
    }


SCENARIOS = {
    "skewed": scenario_skewed,
    "mismatch": scenario_mismatch,
    "train": scenario_train,
    "load": scenario_load,
    "serve": scenario_serve,
    "errors": scenario_errors,
    "generate": scenario_generate,
}


def run(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    out = Path(out_dir)
    run_rank(rank, world, port, out_dir, lambda: SCENARIOS[spec["kind"]](rank, spec, out))
