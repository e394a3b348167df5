"""Host replay of the multi-teacher CUDA kernels' row split and of the CUDA kernels' shared-memory plans.

Runs on the CPU and needs only nvcc: `cuda_multi_sparse_replay.cu` is built as host code and
calls the kernels' own ThreadBatches, rows_share_pad, batch_is_partial (row_split.cuh) and the
plan functions (shared_memory_plan.cuh). "multi": a student row, 1, 3 or 16 teacher rows and the
gradient row at every element offset (same grid, one teacher off the grid, padded strides), for
blocks of 32 to 256 threads and vocabulary sizes 1 to 131077: every element visited exactly
once and nothing outside the row, 16-byte loads only for groups wholly inside the row and
aligned in every tensor, element-wise loads only at the head and the tail, the vector path
whenever the rows share a pad. "plans": the top-k compression's buffers for k up to 4096 in
float32 and float64 at 48, 99, 163 and 227 KiB (within the limit, the fastest layout whenever it
fits, k = 4096 fitting at 99 KiB in both dtypes), the in-place compaction of one kept buffer
against compaction into a second one, and the multi-teacher forward's block for 0 to 16
teachers. "math": the multi-teacher forward's own per-thread arithmetic (multi_teacher_runs.cuh:
running maxima, rescaled sums, the weighted sums over u = h s - h t, the merge onto the row's
maxima, D in double, and reverse_kl's mean of u for the backward pass) on rows of 37 to 50257
logits of scale 1, 30 and 1e4/3 (spread, and student and teachers shifted apart), T = 1 and 2,
blocks of 32 and 256 threads: D of forward_kl and reverse_kl against float64 within float32
sums plus the inputs' float32 resolution, and the reverse_kl gradient q κ (u_i - mean_u) against
q (log q - log p - D) per element within a few roundings of the terms it cancels, tight where
the teacher is close to the student, so that an error at the logits' scale at the q ≈ 1
entries fails. Skipped when nvcc is not on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("cuda_multi_sparse_replay.cu")

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (host code only, no GPU)")


def build_replay(directory: Path) -> Path:
    """Builds the replay binary into `directory` (host code only)."""
    binary = directory / "replay"
    command = ["nvcc", "-std=c++17", "-O1", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc' / 'include'}",
               f"-I{ROOT / 'csrc' / 'cuda'}", "-o", str(binary), str(SOURCE)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"nvcc failed:\n{result.stdout}\n{result.stderr}"
    return binary


def run_mode(binary: Path, mode: str) -> int:
    """Runs one replay mode; returns the number of cases checked (asserts no failure)."""
    result = subprocess.run([str(binary), mode], capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.endswith(" 0 failures"), summary
    return int(summary.split()[1])


@pytest.fixture(scope="module")
def replay_binary(tmp_path_factory) -> Path:
    return build_replay(tmp_path_factory.mktemp("cuda_multi_split"))


def test_multi_teacher_split_visits_every_element_once(replay_binary):
    assert run_mode(replay_binary, "multi") > 10000


def test_shared_memory_plans(replay_binary):
    assert run_mode(replay_binary, "plans") > 250


def test_multi_teacher_one_pass_arithmetic(replay_binary):
    assert run_mode(replay_binary, "math") >= 144
