"""The collective shim's gloo algorithms (all_to_all reduce-scatter, broadcast all-gather)
against gloo's own collectives, on 3 real gloo processes: sync and async, the default
group and a subgroup of global ranks {1, 2}, fp32 and bf16."""

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
    for dtype in (torch.float32, torch.bfloat16):
        for async_op in (False, True):
            g = torch.Generator().manual_seed(rank)
            full = torch.randn(n * 5, 2, generator=g).to(dtype)  # rows split over the ranks
            shard = torch.empty(5, 2, dtype=dtype)
            work = collectives.reduce_scatter_tensor(shard, full, group=group, async_op=async_op)
            if async_op:
                work.wait()
            everyone = [torch.empty_like(full) for _ in range(n)]
            dist.all_gather(everyone, full, group=group)
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


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _check(rank, None, list(range(WORLD)))
        pair = dist.new_group([1, 2])  # every rank creates it; only members use it
        if rank in (1, 2):
            _check(rank, pair, [1, 2])
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gloo_direct_collectives_match_gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port,), nprocs=WORLD)
