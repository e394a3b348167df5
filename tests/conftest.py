"""Shared pytest fixtures for the kdfast test suite.

`device` parametrises a test over "cpu" and "cuda"; the CUDA case is skipped when no GPU
is visible, so the same tests run unchanged on a GPU machine. `spawn_workers` runs a
function on N spawned processes (torch.distributed tests) and fails the test when one of
them fails or they overrun their time limit. `make_kd_inputs` builds
seeded random student/teacher logits and labels (drawn on the CPU, then moved, so the
values do not depend on the device) for the dense KD loss (`kd_inputs.build_kd_inputs`).
"""

from __future__ import annotations

import pytest
import torch

from kd_inputs import build_kd_inputs

CUDA_AVAILABLE = torch.cuda.is_available()

DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available")),
]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> str:
    return request.param


@pytest.fixture
def spawn_workers(tmp_path):
    """`spawn(worker, world_size, *args, limit=300)` runs `worker(rank, world_size, rendezvous,
    out_dir, *args)` on `world_size` spawned processes (rendezvous: a file:// path for
    `init_process_group`; out_dir: the test's tmp_path) and re-raises a worker's failure."""
    import time

    import torch.multiprocessing as mp

    def spawn(worker, world_size: int, *args, limit: float = 300):
        context = mp.start_processes(worker, args=(world_size, str(tmp_path / "rendezvous"), str(tmp_path)) + args,
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + limit
        while not context.join(timeout=2):  # raises if a worker failed
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the {world_size} workers did not finish within {limit} s")

    return spawn


@pytest.fixture
def make_kd_inputs(device):
    """Factory for seeded KD inputs on the test's device; see `build_kd_inputs`."""

    def factory(leading_shape, vocab_size, **kwargs):
        return build_kd_inputs(leading_shape, vocab_size, device=device, **kwargs)

    return factory
