"""Host replay of the dense CUDA kernels' element split; runs on the CPU, needs only nvcc.

`cuda_indexing_replay.cu` includes csrc/cuda/kd_loss_cuda_layout.cuh and walks every thread of
a row through the kernels' own ThreadBatches, forward_team_size, backward_chunks and
rows_share_pad (host code, no GPU): scalar head up to the row's first 16-byte boundary, vector
body, scalar tail, for vocabulary sizes 1 to 256000 (among them the odd 30522, 50257, 131077)
and every pad a row can have, in the forward split (one team per row) and the backward split
(rows cut into chunks; the gradient path and the zero/NaN path), and the forward split of few
long rows over sm_90 thread-block clusters (forward_clusters). It checks that every element
is visited exactly once and nothing outside the row, that full batches lie inside the row on
the 16-byte grid, and that offset views (element offsets 0-7, padded row strides, mixed float32
and bfloat16 rows) get the vector path exactly when it is safe; and that the sparse kernels'
kept_bits (csrc/cuda/sparse_bitmap.cuh) reads each group's bits of the kept-token bitmap right,
for head groups and groups straddling two bitmap words. Skipped when nvcc is not on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("cuda_indexing_replay.cu")

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (host code only, no GPU)")


@pytest.fixture(scope="module")
def replay_binary(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("cuda_indexing") / "replay"
    command = ["nvcc", "-std=c++17", "-O1", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc' / 'include'}",
               f"-I{ROOT / 'csrc' / 'cuda'}", "-o", str(binary), str(SOURCE)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"nvcc failed:\n{result.stdout}\n{result.stderr}"
    return binary


def test_every_element_visited_exactly_once(replay_binary):
    result = subprocess.run([str(replay_binary)], capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    checked = int(summary.split()[1])
    assert checked > 650 and summary.endswith(" 0 failures"), summary
