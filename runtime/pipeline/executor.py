"""Runs a pipeline schedule: this rank's actions over its stages' GraphModules.

`PipelineRunner` is a pipelined engine's `engine.schedule` (runtime/train_step.py's seam):
`train_step` calls it as `schedule(engine, micro_batches)`; called with no arguments it
returns the `PipelineSchedule` (print it for the rank x time grid, `.plot(png)`).

One step on pipeline rank r (stage s runs on rank s % P):
- F(s, m): stage s's graph on micro-batch m's flat inputs and the boundary tensors it
  received (each a detached leaf, so each stage backpropagates on its own); the last
  stage turns its outputs into the model's output and the loss.
- B(s, m): backward from the loss / M (last stage) or from the received output gradients,
  into the parameters and the received inputs, whose gradients go back to their producers.
  Under zero-bubble B computes only the inputs' gradients (`autograd.grad`, graph kept)
  and W(s, m) the parameters' (`autograd.backward(inputs=params)`).
- SEND/RECV: point to point over the mesh's `pipeline` group (runtime/collectives.py):
  a header of sizes (boundary shapes are symbolic) then each tensor, tagged by
  (micro-batch, stages, index). Sends are asynchronous and awaited at the end of the step;
  receives block, as the schedule validator assumed. Stages on the same rank (one process,
  or interleaved residuals) hand tensors over locally; a single process runs every
  rank's list, merged in an order the schedule allows.
Gradients accumulate locally (the state manager's non-boundary micro-steps); at the end
the gradients of weights several stages hold (tied) are summed over the pipeline group,
and the manager's boundary reduction (data parallel / ZeRO over replicate x shard) runs
at the update. The micro-batch losses are broadcast from the last stage and averaged
over data-parallel ranks, so every rank returns the same step loss.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.utils._pytree as pytree

from ...compiler.errors import StratoError
from ...passes.pipeline_cut import StageGraph, split_stages
from .. import collectives
from ..calls import bind_call
from ..train_step import MicroBatch, loss_of
from .schedules import Action, PipelineSchedule, build_schedule, in_send_order
from .split_backward import WeightBackward, backward_inputs
from .timeline import Timeline


class PipelineRunner:
    """A pipelined engine's schedule: the plan (call with no arguments) and its executor."""

    def __init__(self, engine: Any, gm: torch.fx.GraphModule, ctx: Any) -> None:
        record = ctx.records["pipeline_cut"]
        self.record = record
        self.stages: list[StageGraph] = split_stages(gm, record, engine.model)
        self.ranks = record["ranks"]
        mesh = ctx.mesh
        self.group = mesh.group("pipeline")
        """The pipeline group: one rank per stage, or only this process (then every stage
        runs here)."""
        self.local = self.group.size == 1
        self.rank = self.group.rank
        self.dp_group = mesh.group("replicate", "shard")
        """Ranks holding the same stages: losses are averaged over them."""
        self.codegen = gm.graph._codegen
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        producers = {s.stage: tuple(sorted({p for p, _ in s.receives})) for s in self.stages}
        self.plan: PipelineSchedule = build_schedule(
            record["schedule"],
            self.ranks,
            record["microbatches"],
            record["virtual_stages"],
            producers,
        )
        if not self.local and self.group.device.type == "cuda" and not in_send_order(self.plan):
            raise StratoError(
                f"pipeline: the {self.plan.name} schedule of this cut receives some boundary "
                "tensors in another order than they are sent (a residual crossing to a later "
                "virtual stage), which NCCL cannot match; use another schedule or cut."
            )
        self.params = dict(engine.model.named_parameters())
        self.shapes = {name: p.shape for name, p in self.params.items()}
        self.others = (
            set()
            if self.local
            else {
                name
                for name, stages in record["param_stages"].items()
                if not any(s % self.ranks == self.rank for s in stages)
            }
        )
        """Parameters no stage on this rank reads: their storage is freed between steps."""
        self.last_timeline = Timeline(self.ranks)
        self.parameters_stale = False
        """True while other stages' parameters here are freed (or old): whole-model reads
        first fetch them (`synchronize_parameters`)."""

    def __call__(self, engine: Any = None, micro_batches: list[MicroBatch] | None = None):
        if engine is None:
            return self.plan
        return self.run(engine, micro_batches)

    # ------------------------------------------------------------------ one step
    def run(self, engine: Any, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
        m = len(micro_batches)
        if m != self.plan.microbatches:
            raise StratoError(
                f"pipeline: got {m} micro-batches for Pipeline(microbatches="
                f"{self.plan.microbatches})."
            )
        self.release_other_stages()
        engine.manager.synchronize()  # ZeRO-1/2 gathers left in flight land before any stage
        engine.manager.prepare_micro_step(is_boundary=False)  # accumulate locally
        step = _Step(self, engine, micro_batches)
        order = (
            self._merged_order()
            if self.local
            else [(self.rank, a) for a in self.plan.actions[self.rank]]
        )
        for rank, action in order:
            step.do(rank, action)
        for work in step.sends:
            work.wait()
        self._sum_tied_gradients()
        engine.manager.prepare_micro_step(is_boundary=True)  # the update reduces everything
        losses = self._step_losses(step.losses, m)
        self.last_timeline = step.timeline
        engine._loss_sum = float(losses.sum())
        engine.micro_step = m
        # stats()["tokens_per_s"] multiplies by the world size: each stage counts 1/P.
        engine._tokens += sum(_first_tensor_numel(mb) for mb in micro_batches) // self.group.size
        return list(losses.unbind())

    def _merged_order(self) -> list[tuple[int, Action]]:
        """Every rank's actions in one order the schedule allows (one process runs them)."""
        actions = self.plan.actions
        position = [0] * len(actions)
        sent: set[tuple] = set()
        order: list[tuple[int, Action]] = []
        while len(order) < sum(map(len, actions)):
            for r, rank_actions in enumerate(actions):
                while position[r] < len(rank_actions):
                    a = rank_actions[position[r]]
                    if (
                        a.kind.startswith("RECV")
                        and (a.kind[-1], a.peer, a.stage, a.microbatch) not in sent
                    ):
                        break
                    if a.kind.startswith("SEND"):
                        sent.add((a.kind[-1], a.stage, a.peer, a.microbatch))
                    order.append((r, a))
                    position[r] += 1
        return order

    def _sum_tied_gradients(self) -> None:
        """Weights several stages read got a gradient on each: sum them over the pipeline
        group (a single process accumulated them into the one parameter already)."""
        if self.local:
            return
        for name in sorted(self.record["tied"]):
            p = self.params[name]
            # A rank whose stages do not read it joins with zeros (its copy is freed).
            grad = p.grad if p.grad is not None else torch.zeros(self.shapes[name], dtype=p.dtype)
            buffer = grad.to(self.group.device)
            collectives.all_reduce(buffer, group=self.group)
            if any(s % self.ranks == self.rank for s in self.record["tied"][name]):
                p.grad = buffer.to(p.device) if buffer is not grad else grad

    def _step_losses(self, losses: dict[int, torch.Tensor], m: int) -> torch.Tensor:
        """The M micro-batch losses on every rank, averaged over data-parallel ranks."""
        device = self.group.device
        values = torch.zeros(m, dtype=torch.float64, device=device)
        for i, loss in losses.items():
            values[i] = float(loss)
        if not self.local:
            last_rank = (self.plan.stage_count - 1) % self.ranks
            collectives.broadcast(values, src=self.group.ranks[last_rank], group=self.group)
        if self.dp_group.size > 1:
            collectives.all_reduce(values, group=self.dp_group)
            values /= self.dp_group.size
        return values.cpu()

    # ------------------------------------------------------------------ inspection
    def timeline(self) -> Timeline:
        """The last step's measured timeline, with every pipeline rank's events (call on
        every rank of a multi-rank run: it gathers them)."""
        own = self.last_timeline
        if self.local:
            return own
        rows = torch.tensor(own.to_rows(), dtype=torch.float64).reshape(-1, 6)
        counts = torch.empty(self.group.size, dtype=torch.float64, device=self.group.device)
        count = torch.tensor([float(len(rows))], dtype=torch.float64, device=self.group.device)
        collectives.all_gather_into_tensor(counts, count, group=self.group)
        longest = int(counts.max())  # ranks have different numbers of transfers: pad
        padded = torch.full((longest, 6), -1.0, dtype=torch.float64)
        padded[: len(rows)] = rows
        out = torch.empty((self.group.size, longest, 6), dtype=torch.float64)
        collectives.all_gather_into_tensor(out, padded.to(self.group.device), group=self.group)
        kept = [row for row in out.reshape(-1, 6).tolist() if row[0] >= 0]
        return Timeline.from_rows(self.ranks, kept)

    def release_other_stages(self) -> None:
        """Free the parameters no stage on this rank reads (after the state manager's
        start-up broadcast, and again after an eval forward fetched them): this rank then
        holds only its stages' weights, as its layout says."""
        if self.parameters_stale or not self.others:
            return
        for name in self.others:
            p = self.params[name]
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.parameters_stale = True

    def synchronize_parameters(self) -> None:
        """Bring every stage's parameters back on every rank (eval forwards run the whole
        model): each is broadcast from the first stage that reads it, into a fresh buffer
        where this rank had freed it. The next train_step frees them again."""
        if not self.parameters_stale:
            return
        with torch.no_grad():
            for name in self.others:
                p = self.params[name]
                p.data = torch.empty(self.shapes[name], dtype=p.dtype, device=p.device)
            for name, stages in sorted(self.record["param_stages"].items()):
                p = self.params[name]
                buffer = p.detach().to(self.group.device)
                collectives.broadcast(
                    buffer, src=self.group.ranks[stages[0] % self.ranks], group=self.group
                )
                if buffer is not p.detach():
                    p.detach().copy_(buffer)
        self.parameters_stale = False


class _Step:
    """The state of one pipelined step on this process."""

    def __init__(self, runner: PipelineRunner, engine: Any, micro_batches: list[MicroBatch]):
        self.runner = runner
        self.engine = engine
        self.micro_batches = micro_batches
        self.m = len(micro_batches)
        self.inputs = [_flat_inputs(runner, engine, mb) for mb in micro_batches]
        self.received: dict[tuple[int, int], dict[str, Any]] = {}
        """(stage, mb) -> boundary input name -> value (leaf tensors for floats)."""
        self.outputs: dict[tuple[int, int], tuple] = {}
        self.output_grads: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.input_grads: dict[tuple[int, int], dict[str, torch.Tensor | None]] = {}
        self.loss_tensors: dict[int, torch.Tensor] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.local_box: dict[tuple, list] = {}
        self.sends: list[Any] = []
        self._keep: list[torch.Tensor] = []
        """Tensors of sends in flight (held until their works are waited for)."""
        self._w_pending: dict[tuple[int, int], WeightBackward] = {}
        """Zero-bubble: the weight-gradient pass each W still has to run."""
        self.timeline = Timeline(runner.ranks)
        self.stage_count = runner.plan.stage_count

    def _is_local(self, a: int, b: int) -> bool:
        """Whether stages a and b run in this process (tensors are handed over locally)."""
        return self.runner.local or a % self.runner.ranks == b % self.runner.ranks

    def do(self, rank: int, a: Action) -> None:
        if self.runner.local and a.kind not in ("F", "B", "W"):
            return  # one process: the compute actions hand tensors over themselves
        if a.kind in ("F", "B", "W"):
            start = time.time()
            getattr(self, f"_{a.kind.lower()}")(a.stage, a.microbatch)
            self.timeline.add(rank, a.kind, a.stage, a.microbatch, start, time.time())
        elif a.kind.startswith("SEND"):
            start = time.time()
            if a.kind == "SEND_F":
                self._send(a, self._forward_message(a.stage, a.peer, a.microbatch), "F")
            else:
                self._send(a, self._grad_message(a.stage, a.peer, a.microbatch), "B")
            self.timeline.add(rank, "SEND", a.stage, a.microbatch, start, time.time())
        else:
            start = time.time()
            if a.kind == "RECV_F":
                self._recv_forward(a)
            else:
                self._recv_grads(a)
            self.timeline.add(rank, "RECV", a.stage, a.microbatch, start, time.time())

    # -------------------------------------------------------------- compute
    def _f(self, s: int, m: int) -> None:
        stage = self.runner.stages[s]
        got = self.received.setdefault((s, m), {})
        for producer in sorted({p for p, _ in stage.receives}):
            if self._is_local(producer, s):
                got.update(self._take_local("F", producer, s, m))
        boundary = [got[name] for _, name in stage.receives]
        out = stage.gm(*self.inputs[m], *boundary)
        if s == self.stage_count - 1:
            output = _model_output(self.runner.codegen, out)
            loss = loss_of(output, self.micro_batches[m], self.engine._loss_fn)
            self.loss_tensors[m] = loss
            self.losses[m] = loss.detach()
        else:
            self.outputs[(s, m)] = tuple(out)
            self._hand_over_locally(s, m)

    def _hand_over_locally(self, s: int, m: int) -> None:
        """Outputs for stages on this process go into the local box."""
        stage = self.runner.stages[s]
        for c in sorted({u for _, users in stage.sends for u in users}):
            if self._is_local(s, c):
                self.local_box[("F", s, c, m)] = self._forward_message(s, c, m)

    def _backward_roots(
        self, s: int, m: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        if s == self.stage_count - 1:
            loss = self.loss_tensors[m]
            scaler = self.engine.scaler  # fp16: every stage's gradients carry the loss scale
            scale = scaler.scale if scaler is not None else 1.0
            return [loss * (scale / self.m)], None
        stage = self.runner.stages[s]
        self._collect_local_grads(s, m)
        grads = self.output_grads.get((s, m), {})
        roots, root_grads = [], []
        for (name, _), value in zip(stage.sends, self.outputs[(s, m)]):
            if isinstance(value, torch.Tensor) and value.requires_grad and name in grads:
                roots.append(value)
                root_grads.append(grads[name])
        return roots, root_grads

    def _leaf_inputs(self, s: int, m: int) -> list[tuple[str, torch.Tensor]]:
        got = self.received.get((s, m), {})
        return [
            (name, got[name])
            for _, name in self.runner.stages[s].receives
            if isinstance(got[name], torch.Tensor) and got[name].requires_grad
        ]

    def _b(self, s: int, m: int) -> None:
        roots, root_grads = self._backward_roots(s, m)
        leaves = self._leaf_inputs(s, m)
        if self.runner.plan.split_backward:
            grads, self._w_pending[(s, m)] = backward_inputs(
                roots, root_grads, [t for _, t in leaves], self._stage_params(s)
            )
        else:
            if roots:
                torch.autograd.backward(roots, grad_tensors=root_grads)
            grads = [t.grad for _, t in leaves]
        self.input_grads[(s, m)] = {
            name: g if g is not None else torch.zeros_like(t) for (name, t), g in zip(leaves, grads)
        }
        if not self.runner.plan.split_backward:
            self._release(s, m)
        self._hand_grads_locally(s, m)

    def _w(self, s: int, m: int) -> None:
        self._w_pending.pop((s, m)).run()
        self._release(s, m)

    def _stage_params(self, s: int) -> list[torch.Tensor]:
        params = self.runner.params
        return [params[n] for n in self.runner.stages[s].params if params[n].requires_grad]

    def _release(self, s: int, m: int) -> None:
        self.outputs.pop((s, m), None)
        self.received.pop((s, m), None)
        self.output_grads.pop((s, m), None)
        self.loss_tensors.pop(m, None) if s == self.stage_count - 1 else None

    def _hand_grads_locally(self, s: int, m: int) -> None:
        stage = self.runner.stages[s]
        for p in sorted({p for p, _ in stage.receives}):
            if self._is_local(s, p):
                self.local_box[("B", s, p, m)] = self._grad_message(s, p, m)

    def _collect_local_grads(self, s: int, m: int) -> None:
        stage = self.runner.stages[s]
        for c in sorted({u for _, users in stage.sends for u in users}):
            key = ("B", c, s, m)
            if key in self.local_box:
                self._add_grads(s, m, c, self.local_box.pop(key))

    # -------------------------------------------------------------- messages
    def _forward_message(self, s: int, c: int, m: int) -> list:
        stage = self.runner.stages[s]
        return [v for (_, users), v in zip(stage.sends, self.outputs[(s, m)]) if c in users]

    def _names_to(self, s: int, c: int) -> list[str]:
        return [name for name, users in self.runner.stages[s].sends if c in users]

    def _grad_message(self, s: int, p: int, m: int) -> list[torch.Tensor]:
        """Gradients of the floating inputs stage s received from p (zeros where none)."""
        grads = self.input_grads[(s, m)]
        return [grads.pop(name) for name, val in self.received_meta(s, p) if _is_float(val)]

    def received_meta(self, s: int, p: int) -> list[tuple[str, Any]]:
        by_name = self._node_meta()
        return [(name, by_name[name]) for q, name in self.runner.stages[s].receives if q == p]

    def _node_meta(self) -> dict[str, Any]:
        cached = getattr(self.runner, "_meta_by_name", None)
        if cached is None:
            cached = {}
            for stage in self.runner.stages:
                for node in stage.gm.graph.nodes:
                    if node.op == "placeholder" and node.name.startswith("recv_"):
                        cached[node.name.removeprefix("recv_")] = node.meta.get("val")
            self.runner._meta_by_name = cached
        return cached

    def _take_local(self, kind: str, src: int, dst: int, m: int) -> dict[str, Any]:
        values = self.local_box.pop((kind, src, dst, m))
        return {name: _as_leaf(v) for name, v in zip(self._names_to(src, dst), values)}

    def _add_grads(self, s: int, m: int, c: int, grads: list[torch.Tensor]) -> None:
        floats = [
            name
            for (name, users), v in zip(self.runner.stages[s].sends, self.outputs[(s, m)])
            if c in users and isinstance(v, torch.Tensor) and v.is_floating_point()
        ]
        mine = self.output_grads.setdefault((s, m), {})
        for name, g in zip(floats, grads):
            mine[name] = g if name not in mine else mine[name] + g

    def _send(self, a: Action, values: list, kind: str) -> None:
        group = self.runner.group
        dst = a.peer % self.runner.ranks
        base = _tag(a.microbatch, a.stage, a.peer, self.stage_count)
        if kind == "F":
            header = torch.tensor(_header(values), dtype=torch.int64, device=group.device)
            self.sends.append(collectives.isend(header, dst, group, tag=base))
            self._keep.append(header)
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        for i, t in enumerate(tensors):
            t = t.detach().to(group.device).contiguous()
            self._keep.append(t)
            self.sends.append(collectives.isend(t, dst, group, tag=base + 1 + i))

    def _recv_forward(self, a: Action) -> None:
        group = self.runner.group
        src = a.peer % self.runner.ranks
        base = _tag(a.microbatch, a.peer, a.stage, self.stage_count)
        meta = self.received_meta(a.stage, a.peer)
        header = torch.empty(
            sum(_header_len(v) for _, v in meta), dtype=torch.int64, device=group.device
        )
        collectives.recv(header, src, group, tag=base)
        sizes = header.tolist()
        got = self.received.setdefault((a.stage, a.microbatch), {})
        i = 0
        k = 0
        for name, val in meta:
            if isinstance(val, torch.Tensor):
                shape = sizes[i : i + val.ndim]
                i += val.ndim
                buffer = torch.empty(shape, dtype=val.dtype, device=group.device)
                collectives.recv(buffer, src, group, tag=base + 1 + k)
                k += 1
                got[name] = _as_leaf(buffer)
            else:
                got[name] = sizes[i]
                i += 1

    def _recv_grads(self, a: Action) -> None:
        group = self.runner.group
        src = a.peer % self.runner.ranks
        base = _tag(a.microbatch, a.peer, a.stage, self.stage_count)
        outputs = self.outputs[(a.stage, a.microbatch)]
        sends = self.runner.stages[a.stage].sends
        grads = []
        k = 0
        for (_, users), v in zip(sends, outputs):
            if a.peer in users and isinstance(v, torch.Tensor) and v.is_floating_point():
                buffer = torch.empty(v.shape, dtype=v.dtype, device=group.device)
                collectives.recv(buffer, src, group, tag=base + 1 + k)
                k += 1
                grads.append(buffer)
        self._add_grads(a.stage, a.microbatch, a.peer, grads)


# ---------------------------------------------------------------------- helpers


def _flat_inputs(runner: PipelineRunner, engine: Any, mb: MicroBatch) -> list:
    """The micro-batch as the graph's placeholders take it (bound like a model call)."""
    call = bind_call(engine.model, mb.args, mb.kwargs, engine._call_defaults)
    leaves, _ = pytree.tree_flatten((call.args, call.kwargs))
    if len(leaves) != len(runner.placeholders):
        leaves = [x for x in leaves if isinstance(x, torch.Tensor)]
    if len(leaves) != len(runner.placeholders):
        raise StratoError(
            f"pipeline: the micro-batch has {len(leaves)} inputs, the captured graph takes "
            f"{len(runner.placeholders)} ({', '.join(p.name for p in runner.placeholders)}); "
            "call train_step with the same arguments as the example inputs."
        )
    return leaves


def _first_tensor_numel(mb: MicroBatch) -> int:
    first = next(
        (t for t in pytree.tree_leaves((mb.args, mb.kwargs)) if isinstance(t, torch.Tensor)),
        None,
    )
    return first.numel() if first is not None else 0


def _model_output(codegen: Any, flat: Any) -> Any:
    """The last stage's flat outputs as the model returns them (ModelOutput, tuple...)."""
    process = getattr(codegen, "process_outputs", None)
    if process is None:
        return flat
    return process(flat)


def _as_leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        leaf = value.detach()
        if leaf.is_floating_point():
            leaf.requires_grad_(True)
        return leaf
    return value


def _is_float(val: Any) -> bool:
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _header(values: list) -> list[int]:
    out: list[int] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.extend(int(d) for d in v.shape)
        else:
            out.append(int(v))
    return out


def _header_len(val: Any) -> int:
    return val.ndim if isinstance(val, torch.Tensor) else 1


def _tag(m: int, src: int, dst: int, stages: int) -> int:
    """A tag per (micro-batch, sender stage, receiver stage), room for 255 tensors."""
    return (((m * stages + src) * stages + dst) << 8) % (2**31 - 256)
