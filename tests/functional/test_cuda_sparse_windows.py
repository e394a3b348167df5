"""Host replay of the sparse CUDA forward kernel's bitmap windows; runs on the CPU, needs only nvcc.

Where a device's shared memory per block cannot hold the kept-token bitmap of a whole row
(99 KiB on sm_86 / sm_89: vocabularies above about 790K), the sparse forward kernel marks and
streams the row window by window (shared_memory_plan.cuh, row_split.cuh). The replay
(`cuda_multi_sparse_replay.cu`, mode "sparse") takes the plan for 48, 99 and 227 KiB, blocks of
128 to 512 threads, every pad and vocabulary sizes 1 to 2^20, and checks with the kernels' own
row_window, ThreadBatches and kept_bits that every row element is streamed exactly once, inside
its window; that every kept index is marked in exactly one window and within the bitmap; that
kept_bits gives every group's kept flags; and that the whole row keeps one bitmap wherever it
fits (128256 at 99 KiB, 2^20 at 227 KiB). The same checks cover the sm_90 cluster path, where
2 to 8 blocks of a row take windows r, r + cluster, ..., and the cluster sizes chosen (none with
as many rows as multiprocessors, 8 for 3 rows of 256000). Skipped when nvcc is not on PATH.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_cuda_multi_split import build_replay, run_mode

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (host code only, no GPU)")


@pytest.fixture(scope="module")
def replay_binary(tmp_path_factory) -> Path:
    return build_replay(tmp_path_factory.mktemp("cuda_sparse_windows"))


def test_sparse_windows_cover_the_row_once(replay_binary):
    assert run_mode(replay_binary, "sparse") > 600
