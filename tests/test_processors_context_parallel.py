"""The dit_accel diffusers backend under diffusers' Ulysses context parallelism (2 CPU ranks, gloo)."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sys.path.insert(0, TESTS_DIR)
        import transformers  # noqa: F401  diffusers' CP hooks call logger.warning_once, which transformers adds
        from conftest import TINY_CASES, run_model
        from diffusers import ContextParallelConfig
        from torch.distributed.device_mesh import init_device_mesh

        import dit_accel

        torch.accelerator.device_count = lambda: 1  # diffusers computes rank % device_count; CPU has none
        case = TINY_CASES["wan"]
        model, inputs = case.build(), case.inputs()
        reference = run_model(model, inputs)
        handle = dit_accel.apply(model, attention=dit_accel.get_method("full", min_seq_len=0))
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, mesh=mesh))
        out = run_model(model, inputs)
        seen = sorted({(s["seq_len"], s["backend"]) for s in handle.stats()})
        queue.put((rank, (out - reference).abs().max().item(), seen, None))
    except Exception as exc:  # report to the parent instead of hanging it
        queue.put((rank, None, None, repr(exc)))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_ulysses_context_parallel_sees_whole_sequence_and_matches_single_process():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for rank, diff, seen, error in results:
        assert error is None, f"rank {rank}: {error}"
        assert diff <= 1e-5
        # each rank's attention ran on all 200 tokens (its half of the heads), on the block-sparse path
        assert seen == [(200, "block_sparse")]
