"""One rank of an expert-parallel test (started by tests/test_moe_multirank.py with
torch.multiprocessing: spawn, gloo, one thread), and the tiny MoE GPT the MoE tests share."""

from __future__ import annotations

from pathlib import Path

import torch

from examples.gpt import GPT, GPTConfig
from tests.multirank import run_rank

CFG = GPTConfig(vocab_size=53, seq_len=8, d_model=16, n_layers=2, n_heads=2)
PER_RANK = 2
D_FF = 24


def moe_gpt(num_experts: int = 4, top_k: int = 2, seed: int = 0, **layer) -> GPT:
    """The test GPT with every block's MLP replaced by a strato.nn.MoE (path blocks.N.mlp)."""
    import strato

    torch.manual_seed(seed)
    model = GPT(CFG)
    settings = {"capacity_factor": 4.0, **layer}  # nothing dropped unless a test asks
    for block in model.blocks:
        block.mlp = strato.nn.MoE(CFG.d_model, D_FF, num_experts, top_k, **settings)
    return model


def tiny_batch(step: int, rows: int, vocab: int = CFG.vocab_size, seq: int = CFG.seq_len):
    """Deterministic tokens and next-token targets for `step`."""
    g = torch.Generator().manual_seed(1000 + step)
    data = torch.randint(0, vocab, (rows, seq + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def local_batch(step: int, rank: int, world: int):
    x, y = tiny_batch(step, PER_RANK * world)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return x[rows], y[rows]


# ---------------------------------------------------------------------- scenarios


def scenario_layer(rank: int, world: int, spec: dict, out_dir: Path) -> dict:
    """The expert-parallel layer on this rank's tokens vs the local layer on the same
    tokens: outputs, aux loss, gradients (summed over ranks by the caller), all-to-all bytes."""
    import strato
    from strato.runtime import collectives, expert_parallel
    from strato.runtime.mesh import build_mesh

    torch.manual_seed(0)
    layer = strato.nn.MoE(16, 24, 4, spec.get("top_k", 2), capacity_factor=4.0,
                          drop_tokens=spec.get("drop_tokens", True), aux_loss_weight=0.1,
                          z_loss_weight=0.01)  # fmt: skip
    mesh = build_mesh(strato.Mesh())
    group, _ = mesh.expert_groups(spec["expert_size"])
    settings = expert_parallel.layer_settings(layer)
    parallel = expert_parallel.ExpertParallelMoE(settings, group, None)
    torch.manual_seed(1 + rank)
    x = torch.randn(5 + rank, 16, requires_grad=True)  # ranks route different token counts
    before = collectives.comm_bytes()
    y = parallel(x, layer.gate, layer.w_in, layer.w_out)
    forward_bytes = collectives.comm_bytes().get("all_to_all", 0) - before.get("all_to_all", 0)
    stats = layer.stats()
    y.pow(2).sum().backward()
    total = collectives.comm_bytes().get("all_to_all", 0) - before.get("all_to_all", 0)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return {"x": x.detach(), "y": y.detach(), "x_grad": x.grad.clone(), "grads": grads,
            "stats": stats, "forward_bytes": forward_bytes, "step_bytes": total,
            "state": {n: p.detach().clone() for n, p in layer.named_parameters()}}  # fmt: skip


def train_strategy(spec: dict):
    import strato

    return strato.Strategy(
        optimizer=strato.SGD(lr=0.1, momentum=0.0)
        if spec.get("optimizer") == "sgd"
        else strato.AdamW(lr=1e-3),
        zero=spec.get("zero", 0),
        precision=spec.get("precision", "fp32"),
        moe=strato.ExpertParallel(size=spec["expert_size"]),
        grad_clip=spec.get("grad_clip"),
    )


def scenario_train(rank: int, world: int, spec: dict, out_dir: Path) -> dict:
    """Train the MoE GPT under spec's strategy (from spec['load'], a checkpoint folder, if
    given); losses, final weights, stats, graph, what this rank holds."""
    import strato

    model = moe_gpt(seed=spec.get("seed", 0), **spec.get("layer", {}))
    strategy = train_strategy(spec)
    engine = strato.compile(model, strategy, example_inputs=local_batch(0, rank, world))
    loaded = None
    if spec.get("load"):
        engine.load_checkpoint(spec["load"])
        loaded = engine.full_state_dict()
    losses, norms = [], []
    for step in range(spec["steps"]):
        losses.append(engine.train_step(*local_batch(step, rank, world)))
        norms.append(engine.stats()["grad_norm"])
    full = engine.full_state_dict()
    result = {"losses": losses, "grad_norms": norms, "full": full, "stats": engine.stats(), "mesh": str(engine.mesh),
              "record": engine.context.records.get("moe_dispatch"), "loaded": loaded,
              "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()},
              "graph": engine.graph.print_readable(print_output=False) if rank == 0 else ""}  # fmt: skip
    masters = getattr(engine.manager, "masters", {})  # ZeRO: this rank's optimizer tensors
    state = getattr(engine.manager, "optimizer", None)
    result["moments"] = {
        name: state.state[m]["exp_avg"].numel()
        for name, m in masters.items()
        if state is not None and "exp_avg" in state.state.get(m, {})
    }
    if spec.get("checkpoint"):
        engine.save_checkpoint(spec.get("save", out_dir / "ckpt"))
        engine.wait_for_checkpoint()
    return result


def scenario_mismatch(rank: int, world: int, spec: dict, out_dir: Path) -> dict:
    """Rank 1 builds its MoE layers with top_k=1, rank 0 with top_k=2 (same parameters):
    compiling must fail on both with the MoE layer named, not hang in an all-to-all."""
    import strato
    from strato.runtime.collective_schedule import CollectiveMismatchError

    model = moe_gpt(top_k=2 - rank)
    try:
        strato.compile(model, train_strategy(spec), example_inputs=local_batch(0, rank, world))
    except CollectiveMismatchError as error:
        return {"error": str(error)}
    return {"error": None}


def tiny_mixtral(seed: int = 0):
    """A one-layer Hugging Face Mixtral from a config, experts as batched GEMMs (capturable)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=24,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                           num_local_experts=4, use_cache=False)  # fmt: skip
    model = MixtralForCausalLM(config)
    model.set_experts_implementation("batched_mm")
    return model


def tiny_qwen2_moe(seed: int = 0, **config):
    """A one-layer Hugging Face Qwen2-MoE (routed experts + a gated shared expert), experts
    as batched GEMMs (capturable)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    settings = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                    moe_intermediate_size=16, shared_expert_intermediate_size=24,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=50, num_experts=4,
                    num_experts_per_tok=2, use_cache=False)  # fmt: skip
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**settings, **config}))
    with torch.no_grad():  # HF initialises the router to zeros: give it something to route by
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    model.set_experts_implementation("batched_mm")
    return model


def mixtral_batch(step: int, rank: int, world: int) -> dict:
    ids = torch.randint(0, 50, (2 * world, 6), generator=torch.Generator().manual_seed(step))
    ids = ids[2 * rank : 2 * rank + 2]
    return {"input_ids": ids, "labels": ids}


def scenario_mixtral(rank: int, world: int, spec: dict, out_dir: Path) -> dict:
    """A tiny Mixtral trained with labels under expert parallelism (its sparse MoE blocks
    recognised and dispatched like strato.nn.MoE)."""
    import strato

    strategy = strato.Strategy(optimizer=strato.SGD(lr=0.1, momentum=0.0),
                               zero=spec.get("zero", 0), moe=strato.ExpertParallel(size=2))  # fmt: skip
    model = tiny_qwen2_moe() if spec.get("model") == "qwen2_moe" else tiny_mixtral()
    engine = strato.compile(model, strategy, example_kwargs=mixtral_batch(0, rank, world))
    losses = [engine.train_step(**mixtral_batch(step, rank, world)) for step in range(2)]
    return {"losses": losses, "full": engine.full_state_dict(), "stats": engine.stats(),
            "record": engine.context.records.get("moe_dispatch"),
            "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()}}  # fmt: skip


def scenario_expert_x_tensor(rank: int, world: int, spec: dict, out_dir: Path) -> dict:
    """4 ranks, EP=2 x TP=2 (tensor pairs [0, 1] and [2, 3], each pair one data-parallel
    rank's batch): a plan reaching into the MoE block fails on every rank naming it; the
    default plan splits attention and the LM head, and the MoE block (Qwen2-MoE's shared
    expert too) is left whole to the expert dispatch."""
    import strato

    data_rank = rank // 2
    errors = {}
    for case, plan in {"router": {"model.layers.*.mlp.gate": "column"},
                       "shared": {"model.layers.*.mlp.shared_expert.*_proj": "column"}}.items():  # fmt: skip
        strategy = strato.Strategy(optimizer=strato.SGD(lr=0.1), moe=strato.ExpertParallel(size=2),
                                   tensor_parallel=strato.TensorParallel(size=2, plan=plan))  # fmt: skip
        try:
            strato.compile(tiny_qwen2_moe(), strategy, example_kwargs=mixtral_batch(0, 0, 2))
            errors[case] = None
        except strato.StratoError as error:
            errors[case] = str(error)
    strategy = strato.Strategy(optimizer=strato.SGD(lr=0.1), moe=strato.ExpertParallel(size=2),
                               tensor_parallel=strato.TensorParallel(size=2))  # fmt: skip
    engine = strato.compile(tiny_qwen2_moe(), strategy, example_kwargs=mixtral_batch(0, 0, 2))
    losses = [engine.train_step(**mixtral_batch(step, data_rank, 2)) for step in range(2)]
    return {"errors": errors, "losses": losses, "full": engine.full_state_dict(),
            "column": engine.context.records["tensor_parallel"]["column"],
            "experts": engine.context.records["moe_dispatch"]["expert_params"]}  # fmt: skip


SCENARIOS = {"layer": scenario_layer, "train": scenario_train, "mixtral": scenario_mixtral,
             "mismatch": scenario_mismatch, "expert_x_tensor": scenario_expert_x_tensor}  # fmt: skip


def run(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    out = Path(out_dir)
    run_rank(rank, world, port, out_dir, lambda: SCENARIOS[spec["kind"]](rank, world, spec, out))
