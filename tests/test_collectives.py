"""The collective shim's gloo algorithms (all_to_all reduce-scatter, broadcast all-gather)
against gloo's own collectives, on 3 real gloo processes: sync and async, the default
group, a subgroup of global ranks {1, 2} and a mesh group, fp32 and bf16. Over the mesh
group every tensor a collective receives is on the group's device (recorded with
collectives.observe), bytes are counted under its dimension, and a tensor on another
device is refused before gloo sees it."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow
WORLD = 3


def _check(rank: int, group, members: list[int]) -> None:
    from strato.runtime import collectives

    n = len(members)
    me = members.index(rank)
    torch_group = getattr(group, "process_group", group)  # a MeshGroup's, for torch's own
    for dtype in (torch.float32, torch.bfloat16):
        for async_op in (False, True):
            g = torch.Generator().manual_seed(rank)
            full = torch.randn(n * 5, 2, generator=g).to(dtype)  # rows split over the ranks
            shard = torch.empty(5, 2, dtype=dtype)
            work = collectives.reduce_scatter_tensor(shard, full, group=group, async_op=async_op)
            if async_op:
                work.wait()
            everyone = [torch.empty_like(full) for _ in range(n)]
            dist.all_gather(everyone, full, group=torch_group)
            want = sum(t.float() for t in everyone).chunk(n)[me]
            torch.testing.assert_close(shard.float(), want, atol=2e-2, rtol=1e-2)

            gathered = torch.empty(n * 5, 2, dtype=dtype)
            mine = torch.full((5, 2), float(rank), dtype=dtype)
            work = collectives.all_gather_into_tensor(
                gathered, mine, group=group, async_op=async_op
            )
            if async_op:
                work.wait()
            want = torch.cat([torch.full((5, 2), float(r), dtype=dtype) for r in members])
            assert torch.equal(gathered, want)


def _check_mesh_group(rank: int) -> None:
    import strato
    from strato.runtime import collectives
    from strato.runtime.mesh import build_mesh

    mesh = build_mesh(strato.Mesh(shard=WORLD))
    group = mesh.group("shard")
    assert group.device == torch.device("cpu") and group.ranks == (0, 1, 2)
    seen: list[tuple[str, str, str]] = []
    before = collectives.comm_bytes_by_dim().get("shard", {})

    def record(op: str, name: str, devices: list[torch.device]) -> None:
        seen.extend((op, name, d.type) for d in devices)

    with collectives.observe(record):
        _check(rank, group, list(range(WORLD)))
    assert seen and {(name, device) for _, name, device in seen} == {("shard", "cpu")}, seen
    after = collectives.comm_bytes_by_dim()["shard"]
    assert after["all_gather"] > before.get("all_gather", 0)
    try:
        collectives.all_reduce(torch.empty(2, device="meta"), group=group)
    except collectives.CollectiveDeviceError as exc:
        assert "all_reduce over mesh group 'shard' got a tensor on meta" in str(exc)
    else:
        raise AssertionError("a meta tensor reached a gloo collective")


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _check(rank, None, list(range(WORLD)))
        pair = dist.new_group([1, 2])  # every rank creates it; only members use it
        if rank in (1, 2):
            _check(rank, pair, [1, 2])
        _check_mesh_group(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gloo_direct_collectives_match_gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port,), nprocs=WORLD)
