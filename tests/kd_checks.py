"""Shared checks of the dense KD loss tests: seeded inputs' helpers, tolerances and the float64 comparison.

`check_against_reference` runs a loss and `kdfast.reference.kd_loss` in float64 on the same
inputs and grad_output, and compares loss and gradient with tolerances scaled to the loss's
natural size (`natural_scales`), so that the CPU and CUDA suites apply one rule.
"""

from __future__ import annotations

import math
import zlib

import torch

from kdfast import functional, reference

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "none", "batchmean")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# fp32-accuracy allowance: elementwise |actual − expected| ≤ RTOL·|expected| + NORM_ATOL·scale,
# where scale is the largest expected magnitude, floored by the natural magnitude of the
# quantity's terms (which matters when terms cancel, e.g. TVD gradients of peaked rows).
LOSS_RTOL = 2e-5
LOSS_NORM_ATOL = 1e-6
GRAD_RTOL = 2e-5
GRAD_NORM_ATOL = 1e-5


def stable_seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make_grad_output(shape, seed: int, device) -> torch.Tensor:
    """Random grad_output in [0.25, 1.75) \\ {1}: a scalar or one value per row."""
    generator = torch.Generator().manual_seed(seed)
    grad_output = torch.rand(tuple(shape), generator=generator, dtype=torch.float64) * 1.5 + 0.25
    return grad_output.to(device)


def expected_loss_shape(leading_shape, reduction: str):
    return tuple(leading_shape) if reduction == "none" else ()


def run_with_student_grad(loss_function, student_logits, teacher_logits, labels, grad_output, **options):
    """Returns (loss, student gradient) of loss_function on a fresh leaf copy of the student."""
    student_leaf = student_logits.detach().clone().requires_grad_(True)
    loss = loss_function(student_leaf, teacher_logits, labels, **options)
    loss.backward(grad_output.to(loss.dtype))
    return loss.detach(), student_leaf.grad


def run_reference_float64(student_logits, teacher_logits, labels, grad_output, **options):
    """The oracle: the reference on exact float64 copies of the inputs."""
    student_leaf = student_logits.detach().to(torch.float64).requires_grad_(True)
    loss = reference.kd_loss(student_leaf, teacher_logits.detach().to(torch.float64), labels, **options)
    loss.backward(grad_output.to(torch.float64))
    return loss.detach(), student_leaf.grad


def reduction_row_weight(reduction: str, labels, row_count: int, ignore_index: int = -100) -> float:
    if reduction == "mean":
        valid_count = row_count if labels is None else int((labels != ignore_index).sum())
        return 1.0 / max(valid_count, 1)
    if reduction == "batchmean":
        return 1.0 / max(row_count, 1)
    return 1.0


def natural_scales(*, temperature, alpha, t2_scale=True, reduction="mean", labels=None, row_count=1, grad_output=None):
    """(loss scale, gradient scale): the magnitude of one row's loss terms and gradient terms."""
    tau = temperature * temperature if t2_scale else 1.0
    loss_scale = (1.0 - alpha) * tau + alpha
    grad_output_max = 1.0 if grad_output is None else float(grad_output.abs().max())
    weight = grad_output_max * reduction_row_weight(reduction, labels, row_count)
    grad_scale = weight * ((1.0 - alpha) * tau / temperature + alpha)
    return loss_scale, grad_scale


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor, *, loss_scale: float, context: str = "") -> None:
    assert actual.shape == expected.shape, f"{context}: loss shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{context}: loss has NaN: {actual}"
    actual64 = actual.detach().to(torch.float64).cpu()
    expected64 = expected.detach().to(torch.float64).cpu()
    scale = max(float(expected64.abs().max()) if expected64.numel() else 0.0, loss_scale)
    difference = (actual64 - expected64).abs()
    allowed = LOSS_RTOL * expected64.abs() + LOSS_NORM_ATOL * scale
    assert bool((difference <= allowed).all()), (
        f"{context}: loss max |diff|={float(difference.max()):.3e} (allowed {float(allowed.max()):.3e}); "
        f"actual={actual64.flatten()[:6].tolist()} expected={expected64.flatten()[:6].tolist()}"
    )


def assert_grad_close(actual: torch.Tensor, expected64: torch.Tensor, *, grad_scale: float, context: str = "") -> None:
    """fp32 gradients: elementwise fp32 accuracy. bf16/fp16: ≤ 2× the rounding error of the oracle."""
    assert actual is not None, f"{context}: student received no gradient"
    assert actual.shape == expected64.shape, f"{context}: grad shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual).all(), f"{context}: non-finite gradient"
    actual64 = actual.to(torch.float64).cpu()
    expected64 = expected64.to(torch.float64).cpu()
    difference = (actual64 - expected64).abs()
    scale = max(float(expected64.abs().max()), 0.1 * grad_scale)
    fp32_allowance = GRAD_NORM_ATOL * scale
    if actual.dtype in (torch.float32, torch.float64):
        allowed = GRAD_RTOL * expected64.abs() + fp32_allowance
        assert bool((difference <= allowed).all()), (
            f"{context}: grad max |diff|={float(difference.max()):.3e} "
            f"at {divmod(int(difference.argmax()), expected64.shape[-1])}, "
            f"max |expected|={float(expected64.abs().max()):.3e}"
        )
    else:
        rounding_error = float((expected64.to(actual.dtype).to(torch.float64) - expected64).abs().max())
        allowed = 2.0 * rounding_error + fp32_allowance
        assert float(difference.max()) <= allowed, (
            f"{context}: {actual.dtype} grad max |diff|={float(difference.max()):.3e} exceeds 2x the oracle's "
            f"rounding error {rounding_error:.3e} (+{fp32_allowance:.1e})"
        )


def check_against_reference(student, teacher, labels, *, reduction="mean", context="", loss_function=None, **options):
    """Runs the loss under test and the oracle, compares loss and gradient, returns both results."""
    loss_function = functional.kd_loss if loss_function is None else loss_function
    leading_shape = tuple(student.shape[:-1])
    grad_output = make_grad_output(expected_loss_shape(leading_shape, reduction), stable_seed(context, "grad"),
                                   student.device)
    loss, grad = run_with_student_grad(loss_function, student, teacher, labels, grad_output, reduction=reduction,
                                       **options)
    expected_loss, expected_grad = run_reference_float64(student, teacher, labels, grad_output, reduction=reduction,
                                                         **options)

    assert loss.dtype == reference.compute_dtype_for(student.dtype, teacher.dtype), (
        f"{context}: loss dtype {loss.dtype}"
    )
    assert grad.dtype == student.dtype, f"{context}: grad dtype {grad.dtype} != student dtype {student.dtype}"
    assert tuple(loss.shape) == expected_loss_shape(leading_shape, reduction), (
        f"{context}: loss shape {tuple(loss.shape)}"
    )
    loss_scale, grad_scale = natural_scales(
        temperature=options.get("temperature", 1.0),
        alpha=options.get("alpha", 0.0),
        t2_scale=options.get("t2_scale", True),
        reduction=reduction,
        labels=None if labels is None else labels.reshape(-1),
        row_count=math.prod(leading_shape),
        grad_output=grad_output,
    )
    assert_loss_close(loss, expected_loss, loss_scale=loss_scale, context=context)
    assert_grad_close(grad, expected_grad, grad_scale=grad_scale, context=context)
    return (loss, grad), (expected_loss, expected_grad)


def ignored_rows_mask(labels, ignore_index=-100):
    return labels == ignore_index


# --------------------------------------------------------------------------------------
# The main matrix: divergence × reduction × dtype × temperature × alpha × label_smoothing.
