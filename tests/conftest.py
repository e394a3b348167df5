"""Shared pytest fixtures for the kdfast test suite.

`device` parametrises a test over "cpu" and "cuda"; the CUDA case is skipped when no GPU
is visible, so the same tests run unchanged on a GPU machine. `spawn_workers` runs a
function on N spawned processes (torch.distributed tests) and fails the test when one of
them fails or they overrun their time limit. `make_kd_inputs` builds
seeded random student/teacher logits and labels (drawn on the CPU, then moved, so the
values do not depend on the device) for the dense KD loss.
"""

from __future__ import annotations

from typing import Optional, Sequence

import pytest
import torch

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


def build_kd_inputs(
    leading_shape: Sequence[int],
    vocab_size: int,
    *,
    seed: int,
    device: str = "cpu",
    student_dtype: torch.dtype = torch.float32,
    teacher_dtype: Optional[torch.dtype] = None,
    logit_scale: float = 3.0,
    ignored_fraction: float = 0.0,
    ignore_index: int = -100,
    with_labels: bool = True,
):
    """Returns (student_logits, teacher_logits, labels) with fresh seeded values.

    Logits are N(0, logit_scale²) (student and teacher drawn independently) and rounded to
    their dtypes; labels are uniform in [0, V), and about `ignored_fraction` of the rows
    (never all, unless the fraction is 1) are set to `ignore_index`.
    """
    teacher_dtype = student_dtype if teacher_dtype is None else teacher_dtype
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(leading_shape) + (vocab_size,)
    student = (torch.randn(shape, generator=generator, dtype=torch.float64) * logit_scale).to(student_dtype)
    teacher = (torch.randn(shape, generator=generator, dtype=torch.float64) * logit_scale).to(teacher_dtype)
    labels = None
    if with_labels:
        labels = torch.randint(0, vocab_size, tuple(leading_shape), generator=generator, dtype=torch.long)
        if ignored_fraction >= 1.0:
            labels.fill_(ignore_index)
        elif ignored_fraction > 0.0:
            ignored = torch.rand(tuple(leading_shape), generator=generator) < ignored_fraction
            flat_ignored = ignored.reshape(-1)
            if flat_ignored.numel() > 1:
                flat_ignored[0] = True
                flat_ignored[-1] = False
            labels[ignored] = ignore_index
        labels = labels.to(device)
    return student.to(device), teacher.to(device), labels


@pytest.fixture
def make_kd_inputs(device):
    """Factory for seeded KD inputs on the test's device; see `build_kd_inputs`."""

    def factory(leading_shape, vocab_size, **kwargs):
        return build_kd_inputs(leading_shape, vocab_size, device=device, **kwargs)

    return factory
