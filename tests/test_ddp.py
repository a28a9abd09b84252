"""symgrad.nn under torch.distributed: DDP (gloo, 2 CPU processes) gives the single-process gradients.

symgrad's modules are ordinary autograd ops, so DDP's gradient hooks see their parameters' gradients
as any torch module's. The test builds the block of test_nn_block in each of two spawned processes,
gives each half the batch, and checks that DDP's averaged gradients equal the gradients of the whole
batch in one process.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import test_nn_block as block


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _, model = block.make_blocks()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        tokens, labels = block.batch(n=2 * world)
        rows = slice(2 * rank, 2 * rank + 2)
        ddp(tokens[rows], labels[rows]).backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out_dir, f"grads{rank}.pt"))
        # Both ranks done before either tears gloo down: a rank destroying the group while the
        # other's gloo threads still ran aborted it once in CI ("terminate called without an
        # active exception", SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not built")
@pytest.mark.skipif(block.DEVICE != "cpu", reason="CPU processes through the interpreter; a GPU run needs a GPU per rank")
def test_ddp_gradients_equal_single_process(tmp_path):
    world = 2
    # the children inherit TRITON_INTERPRET (set by conftest before triton was imported here)
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    _, model = block.make_blocks()
    tokens, labels = block.batch(n=2 * world)
    # Each rank's mean is over its own counted rows; DDP averages the ranks, which is the mean over
    # the whole batch when every rank counts as many rows: make sure they do.
    counted = (labels != -100).reshape(world, -1).sum(1)
    assert counted[0] == counted[1]
    model(tokens, labels).backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    for rank in range(world):
        got = torch.load(tmp_path / f"grads{rank}.pt")
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank}, {n}: {m}")
