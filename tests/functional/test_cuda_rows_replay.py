"""Host replay of the dense CUDA kernels' float32 row arithmetic; runs on the CPU, needs only nvcc.

`cuda_rows_replay.cu` runs the functions of csrc/cuda/kd_loss_cuda_rows.cuh that
kd_forward_rows_kernel and kd_backward_kernel run (each thread's batches folded into running
statistics, the team's merge in the order of its reductions, the row's finishing, the
per-element gradient), as host code, for forward_kl (also with teacher_entropy) and reverse_kl. Its results are compared
with the float64 oracle `kdfast.reference` by the rules of the GPU tests:

- logits of magnitude 1e4 (shifted by ±1e4, or spread over ±1e4), the rule of
  test_kd_loss.py::test_logits_near_ten_thousand (at most twice the error of PyTorch's fp32
  run of the reference, plus the fp32 allowance). reverse_kl's weighted sum relative to the
  threads' running maxima (the kernels before its offsets) fails the spread rows by ~1e-3, as
  the H200 run did; the test checks that it still does, so that the replay can tell;
- the same for the sm_90 forward of few long rows (forward_clusters' chunks, one 1024-thread
  block each, merged in rank order), for plain, shifted and spread logits;
- every temperature from 1e-20 to 1e20 and logits at the ends of the float32 range, the rule
  of test_extremes.py; NaN and −inf against the CPU kernel's pattern.

Skipped when nvcc is not on PATH. The replay uses exp2f for the hardware exp2 and no FMA
contraction, so it shows the formulation, not the device's last bits.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fp32_rows import assert_rows_match, finite_spread, row_tolerances
from kd_checks import (
    GRAD_NORM_ATOL,
    LOSS_RTOL,
    make_grad_output,
    run_reference_float64,
    run_with_student_grad,
    stable_seed,
)
from kd_inputs import build_kd_inputs
from kdfast import functional, reference

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("cuda_rows_replay.cu")
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1}

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (host code only, no GPU)")


@pytest.fixture(scope="module")
def replay_binary(tmp_path_factory) -> Path:
    binary = tmp_path_factory.mktemp("cuda_rows") / "replay"
    command = ["nvcc", "-std=c++17", "-O1", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc' / 'include'}",
               f"-I{ROOT / 'csrc' / 'cuda'}", "-o", str(binary), str(SOURCE)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"nvcc failed:\n{result.stdout}\n{result.stderr}"
    return binary


def replay(binary: Path, workdir: Path, student, teacher, labels, grad_scale, *, divergence: str, temperature: float,
           alpha: float, label_smoothing: float, offsets: bool, clusters: bool = False, teacher_entropy: bool = False):
    """(row losses [N] float64, gradient [N, V] float32) of the replayed kernels (t2_scale on);
    `clusters`: the sm_90 forward of few long rows (chunks per block, merged in rank order);
    `teacher_entropy`: forward_kl as the soft-target cross-entropy (KDOptions.teacher_entropy)."""
    rows, vocab = student.shape
    source, target = workdir / "input.bin", workdir / "output.bin"
    scales = torch.as_tensor(grad_scale, dtype=torch.float64).expand(rows).contiguous()
    with open(source, "wb") as handle:
        handle.write(struct.pack("=qqi", rows, vocab, 2 if teacher_entropy else DIVERGENCE_CODES[divergence]))
        handle.write(struct.pack("=4d", temperature, alpha, label_smoothing, temperature * temperature))
        handle.write(labels.to(torch.int64).numpy().tobytes())
        handle.write(scales.numpy().tobytes())
        handle.write(student.to(torch.float32).contiguous().numpy().tobytes())
        handle.write(teacher.to(torch.float32).contiguous().numpy().tobytes())
    result = subprocess.run([str(binary), str(source), str(target), "1" if offsets else "0", "1" if clusters else "0"],
                            capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    raw = target.read_bytes()
    losses = torch.from_numpy(np.frombuffer(raw[: 8 * rows], dtype=np.float64).copy())
    grad = torch.from_numpy(np.frombuffer(raw[8 * rows:], dtype=np.float32).copy()).reshape(rows, vocab)
    return losses, grad


def near_ten_thousand(layout: str, divergence: str, vocab: int, rows: int = 6):
    context = f"replay/{divergence}/{layout}/V={vocab}" + (f"/N={rows}" if rows != 6 else "")
    student, teacher, labels = build_kd_inputs((rows,), vocab, seed=stable_seed(context), student_dtype=torch.float64,
                                               ignored_fraction=0.2)
    if layout == "shifted":
        student, teacher = student + 1.0e4, teacher - 1.0e4
    else:
        student, teacher = student * (1.0e4 / 3.0), teacher * (1.0e4 / 3.0)
    grad_output = make_grad_output((), stable_seed(context, "grad"), "cpu")
    return context, student.float(), teacher.float(), labels, grad_output


def errors_and_allowances(student, teacher, labels, grad_output, losses, grad, options):
    """(loss error, loss allowance, gradient error, gradient allowance), test_logits_near_ten_thousand's rule."""
    fp32_loss, fp32_grad = run_with_student_grad(reference.kd_loss, student, teacher, labels, grad_output, **options)
    expected_loss, expected_grad = run_reference_float64(student, teacher, labels, grad_output, **options)

    def max_error(result, expected):
        return float((result.to(torch.float64) - expected).abs().max())

    loss = losses.sum()
    loss_allowed = 2.0 * max_error(fp32_loss, expected_loss) + LOSS_RTOL * float(expected_loss.abs())
    grad_allowed = 2.0 * max_error(fp32_grad, expected_grad) + GRAD_NORM_ATOL * float(expected_grad.abs().max())
    return max_error(loss, expected_loss), loss_allowed, max_error(grad, expected_grad), grad_allowed


@pytest.mark.parametrize("vocab", [131, 4099, 50257])
@pytest.mark.parametrize("layout", ["shifted", "spread"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_logits_near_ten_thousand_replayed(replay_binary, tmp_path, divergence, layout, vocab):
    context, student, teacher, labels, grad_output = near_ten_thousand(layout, divergence, vocab)
    options = dict(divergence=divergence, temperature=2.0, alpha=0.5, label_smoothing=0.1)
    losses, grad = replay(replay_binary, tmp_path, student, teacher, labels, grad_output, offsets=True, **options)
    assert bool(torch.isfinite(losses).all()) and bool(torch.isfinite(grad).all()), context
    assert bool((grad[labels == -100] == 0).all()) and bool((losses[labels == -100] == 0).all()), context
    loss_error, loss_allowed, grad_error, grad_allowed = errors_and_allowances(
        student, teacher, labels, grad_output, losses, grad, dict(reduction="sum", **options))
    assert loss_error <= loss_allowed, f"{context}: loss error {loss_error:.3e} > allowed {loss_allowed:.3e}"
    assert grad_error <= grad_allowed, f"{context}: grad error {grad_error:.3e} > allowed {grad_allowed:.3e}"


@pytest.mark.parametrize("rows, vocab", [(3, 50257), (2, 131077)])
@pytest.mark.parametrize("layout", ["shifted", "spread", "plain"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_cluster_split_replayed(replay_binary, tmp_path, divergence, layout, rows, vocab):
    """Few long rows on sm_90: the chunks' partials merged across the cluster, same rule."""
    if layout == "plain":
        context = f"replay-plain/{divergence}/V={vocab}/N={rows}"
        student, teacher, labels = build_kd_inputs((rows,), vocab, seed=stable_seed(context), ignored_fraction=0.2)
        grad_output = make_grad_output((), stable_seed(context, "grad"), "cpu")
    else:
        context, student, teacher, labels, grad_output = near_ten_thousand(layout, divergence, vocab, rows)
    options = dict(divergence=divergence, temperature=2.0, alpha=0.5, label_smoothing=0.1)
    losses, grad = replay(replay_binary, tmp_path, student, teacher, labels, grad_output, offsets=True, clusters=True,
                          **options)
    loss_error, loss_allowed, grad_error, grad_allowed = errors_and_allowances(
        student, teacher, labels, grad_output, losses, grad, dict(reduction="sum", **options))
    assert loss_error <= loss_allowed, f"{context}: loss error {loss_error:.3e} > allowed {loss_allowed:.3e}"
    assert grad_error <= grad_allowed, f"{context}: grad error {grad_error:.3e} > allowed {grad_allowed:.3e}"


@pytest.mark.parametrize("clusters", [False, True])
@pytest.mark.parametrize("layout", ["shifted", "spread"])
def test_soft_cross_entropy_replayed(replay_binary, tmp_path, layout, clusters):
    """forward_kl with teacher_entropy (the compat losses' −Σ p·log q), same rule."""
    context, student, teacher, labels, grad_output = near_ten_thousand(layout, "forward_kl", 4099)
    options = dict(divergence="forward_kl", temperature=2.0, alpha=0.5, label_smoothing=0.1)
    losses, grad = replay(replay_binary, tmp_path, student, teacher, labels, grad_output, offsets=True,
                          clusters=clusters, teacher_entropy=True, **options)
    loss_error, loss_allowed, grad_error, grad_allowed = errors_and_allowances(
        student, teacher, labels, grad_output, losses, grad, dict(reduction="sum", teacher_entropy=True, **options))
    assert loss_error <= loss_allowed, f"{context}: loss error {loss_error:.3e} > allowed {loss_allowed:.3e}"
    assert grad_error <= grad_allowed, f"{context}: grad error {grad_error:.3e} > allowed {grad_allowed:.3e}"


@pytest.mark.parametrize("vocab", [131, 4099])
def test_reverse_kl_without_offsets_fails_spread_rows(replay_binary, tmp_path, vocab):
    """The weighted sum relative to the threads' running maxima: the H200's failure, replayed."""
    context, student, teacher, labels, grad_output = near_ten_thousand("spread", "reverse_kl", vocab)
    options = dict(divergence="reverse_kl", temperature=2.0, alpha=0.5, label_smoothing=0.1)
    losses, grad = replay(replay_binary, tmp_path, student, teacher, labels, grad_output, offsets=False, **options)
    _, _, grad_error, grad_allowed = errors_and_allowances(student, teacher, labels, grad_output, losses, grad,
                                                           dict(reduction="sum", **options))
    assert grad_error > 10.0 * grad_allowed, f"{context}: grad error {grad_error:.3e}, allowed {grad_allowed:.3e}"


ROWS, VOCAB = 4, 301


def extreme_rows(seed: int, scale: float):
    generator = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64)).float()
    teacher = (scale * torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64)).float()
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    grad_output = torch.rand(ROWS, generator=generator, dtype=torch.float64) + 0.5
    return student, teacher, labels, grad_output


def check_rows(binary, workdir, student, teacher, labels, grad_output, context, **options):
    losses, grad = replay(binary, workdir, student, teacher, labels, grad_output, offsets=True, **options)
    leaf = student.double().requires_grad_(True)
    expected = reference.kd_loss(leaf, teacher.double(), labels, reduction="none", **options)
    expected.backward(grad_output)
    loss_atol, grad_atol = row_tolerances(student, finite_spread(teacher) / options["temperature"],
                                          temperature=options["temperature"], alpha=options["alpha"], t2_scale=True,
                                          divergence=options["divergence"], grad_weights=grad_output)
    assert_rows_match(losses.float(), expected.detach(), grad, leaf.grad, loss_atol, grad_atol, context)


@pytest.mark.parametrize("temperature", [1e-20, 1e-7, 0.7, 3.0, 1e7, 1e20], ids=lambda t: f"T={t:g}")
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_every_temperature_replayed(replay_binary, tmp_path, divergence, temperature):
    context = f"replay/{divergence}/T={temperature:g}"
    student, teacher, labels, grad_output = extreme_rows(stable_seed(context), 3.0)
    check_rows(replay_binary, tmp_path, student, teacher, labels, grad_output, context, divergence=divergence,
               temperature=temperature, alpha=0.5, label_smoothing=0.1)


@pytest.mark.parametrize("temperature", [1e-3, 1.0, 100.0], ids=lambda t: f"T={t:g}")
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_ends_of_the_float32_range_replayed(replay_binary, tmp_path, divergence, temperature):
    """Opposite logits at ±FLT_MAX, also as the row's first (reference) logits."""
    context = f"replay-range/{divergence}/T={temperature:g}"
    student, teacher, labels, grad_output = extreme_rows(stable_seed(context), 1e37)
    top = torch.finfo(torch.float32).max
    student[0, 0], student[0, 1], teacher[0, 2] = top, -top, -top
    teacher[1, 0], teacher[1, 6] = top, -top
    student[2, 0], teacher[2, 0] = -top, top
    student[3, 0], student[3, 1], teacher[3, 0] = -top, top, top
    check_rows(replay_binary, tmp_path, student, teacher, labels, grad_output, context, divergence=divergence,
               temperature=temperature, alpha=0.5, label_smoothing=0.1)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_non_finite_logits_replayed(replay_binary, tmp_path, divergence):
    """NaN in, NaN out; a teacher −inf where q > 0 gives reverse_kl +inf; masked (−inf) first
    logits, where the references fall back to 0: the same non-finite pattern as the CPU kernel,
    and its finite values."""
    context = f"replay-nonfinite/{divergence}"
    student, teacher, labels, grad_output = extreme_rows(stable_seed(context), 3.0)
    student[0, 7] = float("nan")
    teacher[1, 3] = float("-inf")
    student[2, 0], teacher[2, 0] = float("-inf"), float("-inf")
    teacher[3, 0] = float("-inf")
    student[3, 0] = -40.0  # q ≈ 0 where p = 0: finite
    options = dict(divergence=divergence, temperature=2.0, alpha=0.5, label_smoothing=0.1)
    losses, grad = replay(replay_binary, tmp_path, student, teacher, labels, grad_output, offsets=True, **options)
    leaf = student.clone().requires_grad_(True)
    expected = functional.kd_loss(leaf, teacher, labels, reduction="none", **options)
    expected.backward(grad_output.float())
    expected_grad = leaf.grad
    for actual, wanted in ((losses.float(), expected.detach()), (grad, expected_grad)):
        assert torch.equal(torch.isnan(actual), torch.isnan(wanted)), f"{context}: NaN pattern {actual} {wanted}"
        assert torch.equal(torch.isinf(actual), torch.isinf(wanted)), f"{context}: inf pattern"
        finite = torch.isfinite(wanted)
        assert torch.equal(actual[torch.isinf(wanted)], wanted[torch.isinf(wanted)]), context
        assert torch.allclose(actual[finite], wanted[finite], rtol=1e-4, atol=1e-6), context
