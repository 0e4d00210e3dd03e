"""Zero-bubble's split backward over one stage's autograd graph: B computes the gradients of
the stage's inputs only, W the parameters' gradients, without walking B's chain again.

B runs `autograd.grad` into the received inputs and, on the way, keeps the gradient that
flows into each *joint*: a node of the input-gradient chain that a parameter's gradient
path joins (a linear's `addmm` for its weight). W then starts from those joints with the
kept gradients and reaches only the parameters (`autograd.backward` over gradient edges,
one call per group of parameters sharing joints), so its cost is the weight-gradient
kernels alone. This is the approach of torch.distributed.pipelining's
`stage_backward_input` / `stage_backward_weight` (torch/distributed/pipelining/_backward.py),
written against public autograd API (`Node.register_prehook`, `GradientEdge`) because
that module is private. A parameter with a path to the roots that avoids the inputs (every
parameter of a first stage, whose inputs are token ids) gets its gradient in W from the
roots, the graph kept by B.
"""

from __future__ import annotations

import attrs
import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


@attrs.define(eq=False)
class _Group:
    """Parameters whose gradients all flow through these joints (their kept gradients)."""

    joints: list[Node]
    params: list[torch.Tensor]
    grads: dict[int, tuple] = attrs.field(factory=dict)
    """Joint index -> the gradients that flowed into it during B."""


@attrs.define(eq=False)
class WeightBackward:
    """What W needs after B: the groups with their kept gradients, and the roots for the
    parameters reached from the roots directly."""

    groups: list[_Group]
    roots: list[torch.Tensor]
    root_grads: list[torch.Tensor] | None
    direct: list[torch.Tensor]
    """Parameters W differentiates from the roots (some path avoids the inputs)."""

    def run(self) -> None:
        """Accumulate the parameters' gradients into `.grad` (hooks fire as in backward).
        The graph is kept through every call (a parameter used at two depths walks from
        its upper joint through other groups' nodes) and freed when W drops the roots."""
        if self.direct and self.roots:
            torch.autograd.backward(
                self.roots,
                grad_tensors=self.root_grads,
                inputs=self.direct,
                retain_graph=bool(self.groups),
            )
        for group in self.groups:
            edges, grads = [], []
            for i, joint in enumerate(group.joints):
                for k, g in enumerate(group.grads.get(i, ())):
                    if g is not None:
                        edges.append(GradientEdge(joint, k))
                        grads.append(g)
            if not edges:
                continue
            clamps = []
            if len(group.joints) > 1:
                # A joint below another would get both its kept gradient and the one
                # flowing down from the upper joint: keep only its own.
                for i, joint in enumerate(group.joints):
                    kept = group.grads.get(i)
                    clamps.append(joint.register_prehook(lambda _, kept=kept: kept))
            try:
                torch.autograd.backward(
                    edges, grad_tensors=grads, inputs=group.params, retain_graph=True
                )
            finally:
                for handle in clamps:
                    handle.remove()
        self.groups, self.roots, self.root_grads = [], [], None


def backward_inputs(
    roots: list[torch.Tensor],
    root_grads: list[torch.Tensor] | None,
    inputs: list[torch.Tensor],
    params: list[torch.Tensor],
) -> tuple[list[torch.Tensor | None], WeightBackward]:
    """B: the gradients of `inputs` (None where unused), and the W still to run for `params`."""
    root_nodes = [t.grad_fn for t in roots if t.grad_fn is not None]
    users = _users(root_nodes)
    input_side = _above(
        [get_gradient_edge(t).node for t in inputs], users
    )  # nodes on the input-gradient chain
    groups, direct = _param_groups(params, users, input_side)
    hooks = []
    for group in groups:
        for i, joint in enumerate(group.joints):

            def keep(grad_outputs, group=group, i=i):
                group.grads[i] = tuple(grad_outputs)

            hooks.append(joint.register_prehook(keep))
    try:
        grads: list = [None] * len(inputs)
        if roots and inputs:
            grads = list(
                torch.autograd.grad(
                    roots, inputs, grad_outputs=root_grads, retain_graph=True, allow_unused=True
                )
            )
    finally:
        for handle in hooks:
            handle.remove()
    return grads, WeightBackward(groups, roots, root_grads, direct)


def _users(root_nodes: list[Node]) -> dict[Node, list[Node]]:
    """Every node reachable from the roots -> the nodes that feed it a gradient."""
    users: dict[Node, list[Node]] = {n: [] for n in root_nodes}
    queue = list(root_nodes)
    while queue:
        node = queue.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child not in users:
                users[child] = []
                queue.append(child)
            users[child].append(node)
    return users


def _above(starts: list[Node], users: dict[Node, list[Node]]) -> set[Node]:
    """The nodes between `starts` and the roots (the starts included)."""
    seen = {n for n in starts if n in users}
    queue = list(seen)
    while queue:
        for user in users[queue.pop()]:
            if user not in seen:
                seen.add(user)
                queue.append(user)
    return seen


def _param_groups(
    params: list[torch.Tensor], users: dict[Node, list[Node]], input_side: set[Node]
) -> tuple[list[_Group], list[torch.Tensor]]:
    """Group the parameters by the input-side joints their gradient paths reach; those
    with a path to a root that meets no joint go to `direct`; unused ones nowhere."""
    by_joint: dict[Node, _Group] = {}
    direct: list[torch.Tensor] = []
    for p in params:
        start = get_gradient_edge(p).node
        if start not in users:
            continue  # no gradient reaches it in this stage
        joints: dict[Node, None] = {}  # ordered: the same order on every run
        escapes = False
        seen = {start}
        queue = [start]
        while queue:
            node = queue.pop()
            if not users[node]:
                escapes = True  # a root outside the input-gradient chain
            for user in users[node]:
                if user in input_side:
                    joints[user] = None
                elif user not in seen:
                    seen.add(user)
                    queue.append(user)
        if escapes or not joints:
            direct.append(p)
            continue
        merged = {id(by_joint[j]): by_joint[j] for j in joints if j in by_joint}.values()
        group = _Group(
            list(dict.fromkeys([*joints, *(j for g in merged for j in g.joints)])),
            [p, *(q for g in merged for q in g.params)],
        )
        for j in group.joints:
            by_joint[j] = group
    unique = {id(g): g for g in by_joint.values()}
    return list(unique.values()), direct
