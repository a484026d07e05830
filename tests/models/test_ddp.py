"""DoEForCausalLM under DistributedDataParallel: 2 gloo processes on the CPU give the gradients of
one process on the whole global batch, without find_unused_parameters."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from doe_ext.models import DoEForCausalLM
from test_doe_model import K, V, tiny

WORLD = 2


def _global_batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, V, (4, 8), generator=g)
    topics = torch.randint(0, K, (4, 8), generator=g)  # no -1: every rank averages over as many labels
    return ids, topics


def _model():
    torch.manual_seed(0)
    # eval(): the VAE routers use z = mu, so no noise differs between one process and two.
    return DoEForCausalLM(tiny(num_hidden_layers=3)).eval()


def _worker(rank: int, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model = DDP(_model())  # find_unused_parameters=False: every parameter must get a gradient
    ids, topics = _global_batch()
    part = slice(rank * 2, rank * 2 + 2)
    model(ids[part], topic_ids=topics[part], labels=ids[part]).loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, os.path.join(out_dir, "grads.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # Leave without running destructors: freeing the DDP reducer frees its gloo group while holding
    # the GIL, and gloo's worker thread may be waiting for the GIL to drop a Python object: the
    # process then hangs forever (seen here in CI). An exception above still reaches mp.spawn.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ddp_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path):
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=2):  # raises if a worker failed
        if time.monotonic() > deadline:  # never let a hung collective hang the whole suite
            for p in ctx.processes:
                p.kill()
            pytest.fail("the DDP workers did not finish within 300 s")
    ddp_grads = torch.load(tmp_path / "grads.pt")
    model = _model()
    ids, topics = _global_batch()
    model(ids, topic_ids=topics, labels=ids).loss.backward()
    assert ddp_grads.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        assert ddp_grads[name] is not None, f"{name} got no gradient under DDP"
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
