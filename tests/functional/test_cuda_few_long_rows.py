"""CUDA kd_loss on few long rows, where the forward pass splits each row over a thread-block
cluster on sm_90 and newer (GPU only; the host replay of the split is test_cuda_indexing.py).

With fewer rows than multiprocessors and long rows (csrc/cuda/kd_loss_cuda_layout.cuh,
forward_clusters) every row's chunks are streamed by the blocks of one cluster, whose partials
meet in distributed shared memory; JSD and TVD sweep each chunk a second time. Below sm_90 the
same shapes take the one-block-per-row kernel, so these cases check both launches against the
float64 oracle (`kdfast.reference`) under the rule of tests/fp32_rows.py, for every divergence,
row counts 1, 8 and 64 (two to eight blocks per row on 132 multiprocessors, and one with
KDFAST_CUDA_CLUSTERS=never), ignored rows,
logits spread over ±1e4 (reverse_kl's offsets across the cluster's merge) and NaN inputs.
Skipped unless a GPU is visible and kdfast was built with its CUDA kernels.
"""

from __future__ import annotations

import math

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
from kdfast import functional, reference
from kdfast.ops._native import has_cuda_kernels

CUDA_READY = torch.cuda.is_available() and has_cuda_kernels()
pytestmark = pytest.mark.skipif(
    not CUDA_READY, reason="needs a visible GPU and kdfast built with CUDA kernels (kdfast.build_info()['cuda'])"
)

TEMPERATURE = 2.0
DEVICE = "cuda"


def check(student, teacher, labels, context, dtype, **options):
    """Row losses and gradient of the CUDA loss against the oracle on the rounded inputs."""
    options = dict(temperature=TEMPERATURE, **options)
    grad_output = make_grad_output((student.shape[0],), stable_seed(context, "grad"), "cpu")
    leaf = student.to(device=DEVICE, dtype=dtype).detach().clone().requires_grad_(True)
    loss = functional.kd_loss(leaf, teacher.to(device=DEVICE, dtype=dtype), labels.to(DEVICE), reduction="none",
                              **options)
    loss.backward(grad_output.to(device=DEVICE, dtype=loss.dtype))
    student64, teacher64 = student.to(dtype).double(), teacher.to(dtype).double()
    expected_leaf = student64.clone().requires_grad_(True)
    expected = reference.kd_loss(expected_leaf, teacher64, labels, reduction="none", **options)
    expected.backward(grad_output)
    loss_atol, grad_atol = row_tolerances(student64.float(), finite_spread(teacher64.float()) / TEMPERATURE,
                                          temperature=TEMPERATURE, alpha=options.get("alpha", 0.0), t2_scale=True,
                                          divergence=options["divergence"], grad_weights=grad_output)
    out_dtype = torch.float32 if dtype == torch.float32 else dtype
    assert_rows_match(loss.detach().cpu(), expected.detach(), leaf.grad.cpu().float(), expected_leaf.grad,
                      loss_atol, grad_atol, context, out_dtype=out_dtype)
    return loss.detach().cpu(), expected.detach()


def make_rows(rows, vocab, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    if rows > 1:
        labels[-1] = -100
    return student.float(), teacher.float(), labels


@pytest.mark.parametrize("clusters", ["auto", "never"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("rows, vocab", [(1, 256000), (8, 131077), (64, 256000), (8, 50257)])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_few_long_rows(monkeypatch, divergence, rows, vocab, dtype, clusters):
    """KDFAST_CUDA_CLUSTERS=never: the one-block-per-row kernel on the same shapes."""
    monkeypatch.setenv("KDFAST_CUDA_CLUSTERS", clusters)
    context = f"few-long/{divergence}/{rows}x{vocab}/{dtype}/{clusters}"
    student, teacher, labels = make_rows(rows, vocab, stable_seed(context))
    check(student, teacher, labels, context, dtype, divergence=divergence, alpha=0.3, label_smoothing=0.1)


@pytest.mark.parametrize("rows", [1, 8])
def test_few_long_rows_spread_logits(rows):
    """Logits spread over ±1e4 in float32, reverse_kl: the gradient by the rule of
    test_kd_loss.py::test_logits_near_ten_thousand (at most twice the error of PyTorch's fp32
    run of the reference, plus the fp32 allowance), which the dominant entry's cancellation needs."""
    context = f"few-long-spread/{rows}"
    student, teacher, labels = make_rows(rows, 131072, stable_seed(context), scale=1.0e4 / 3.0)
    options = dict(reduction="sum", divergence="reverse_kl", temperature=TEMPERATURE, alpha=0.5, label_smoothing=0.1)
    grad_output = make_grad_output((), stable_seed(context, "grad"), "cpu")
    loss, grad = run_with_student_grad(functional.kd_loss, student.to(DEVICE), teacher.to(DEVICE), labels.to(DEVICE),
                                       grad_output.to(DEVICE), **options)
    fp32_loss, fp32_grad = run_with_student_grad(reference.kd_loss, student, teacher, labels, grad_output, **options)
    expected_loss, expected_grad = run_reference_float64(student, teacher, labels, grad_output, **options)

    def max_error(result, expected):
        return float((result.double().cpu() - expected).abs().max())

    loss_allowed = 2.0 * max_error(fp32_loss, expected_loss) + LOSS_RTOL * float(expected_loss.abs())
    grad_allowed = 2.0 * max_error(fp32_grad, expected_grad) + GRAD_NORM_ATOL * float(expected_grad.abs().max())
    assert max_error(loss, expected_loss) <= loss_allowed, f"{context}: loss error {max_error(loss, expected_loss):.3e}"
    assert max_error(grad, expected_grad) <= grad_allowed, (
        f"{context}: grad error {max_error(grad, expected_grad):.3e} > allowed {grad_allowed:.3e}")


@pytest.mark.parametrize("position", [0, 70000, 131071])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_few_long_rows_nan_reaches_the_loss(divergence, position):
    """A NaN in any block's chunk (the first, a middle, the last) makes the row's loss NaN."""
    context = f"few-long-nan/{divergence}/{position}"
    student, teacher, labels = make_rows(4, 131072, stable_seed(context))
    teacher[1, position] = math.nan
    loss, expected = check(student, teacher, labels, context, torch.float32, divergence=divergence, alpha=0.0)
    assert math.isnan(float(expected[1])) and math.isnan(float(loss[1])), f"{context}: {float(loss[1])}"
