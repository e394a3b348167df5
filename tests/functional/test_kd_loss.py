"""Tests of `kdfast.functional.kd_loss` (and `kdfast.KDLoss`) against the float64 oracle.

Every case runs the loss under test on the given inputs and `kdfast.reference.kd_loss` on
float64 copies of the same (already rounded) values, with a backward pass whose
grad_output is not 1, and compares the loss and the student gradient. Tolerances follow
docs/design.md: the loss is computed in fp32 for every input dtype, so it must be fp32-accurate
(relative error ≲ 1e-5); the student gradient of float32 inputs likewise; the gradient of
bfloat16/float16 inputs is written in that dtype, so its max error may be at most twice
the max error of the float64 gradient rounded to that dtype, plus the fp32 allowance.
Cases are device-generic: the CUDA variants run wherever a GPU is visible.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdfast
from kd_checks import (  # noqa: F401  (tests/ holds the shared checks; conftest puts it on sys.path)
    DIVERGENCES,
    DTYPE_IDS,
    GRAD_NORM_ATOL,
    INPUT_DTYPES,
    LOSS_RTOL,
    REDUCTIONS,
    assert_grad_close,
    assert_loss_close,
    check_against_reference,
    expected_loss_shape,
    ignored_rows_mask,
    make_grad_output,
    natural_scales,
    run_reference_float64,
    run_with_student_grad,
    stable_seed,
)
from kdfast import functional, reference


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=lambda value: f"eps{value}")
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0], ids=lambda value: f"alpha{value}")
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0], ids=lambda value: f"T{value}")
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=lambda dtype: DTYPE_IDS[dtype])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_reference(make_kd_inputs, divergence, reduction, dtype, temperature, alpha, label_smoothing):
    context = f"{divergence}/{reduction}/{DTYPE_IDS[dtype]}/T={temperature}/alpha={alpha}/eps={label_smoothing}"
    student, teacher, labels = make_kd_inputs(
        (6,), 37, seed=stable_seed(context), student_dtype=dtype, ignored_fraction=0.3
    )
    (loss, grad), _ = check_against_reference(
        student,
        teacher,
        labels,
        reduction=reduction,
        context=context,
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        label_smoothing=label_smoothing,
    )
    ignored = ignored_rows_mask(labels)
    assert bool(ignored.any()) and not bool(ignored.all())
    assert bool((grad[ignored] == 0).all()), f"{context}: ignored rows received a gradient"
    if reduction == "none":
        assert bool((loss[ignored] == 0).all()), f"{context}: ignored rows have a nonzero loss"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_module_equals_functional(make_kd_inputs, divergence, reduction):
    options = dict(divergence=divergence, temperature=2.0, alpha=0.3, beta=0.4, label_smoothing=0.05,
                   reduction=reduction)
    student, teacher, labels = make_kd_inputs((5,), 131, seed=stable_seed("module", divergence, reduction),
                                              ignored_fraction=0.2)
    grad_output = make_grad_output(expected_loss_shape((5,), reduction), 7, student.device)
    module = kdfast.KDLoss(**options)
    module_loss, module_grad = run_with_student_grad(module, student, teacher, labels, grad_output)
    functional_loss, functional_grad = run_with_student_grad(functional.kd_loss, student, teacher, labels, grad_output,
                                                             **options)
    torch.testing.assert_close(module_loss, functional_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(module_grad, functional_grad, rtol=1e-6, atol=1e-8)
    assert f"divergence={divergence!r}" in repr(module)


# --------------------------------------------------------------------------------------
# Dtypes.


@pytest.mark.parametrize(
    "student_dtype, teacher_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.bfloat16),
    ],
    ids=lambda dtype: DTYPE_IDS[dtype],
)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_mixed_student_teacher_dtypes(make_kd_inputs, divergence, student_dtype, teacher_dtype):
    context = f"mixed/{divergence}/{DTYPE_IDS[student_dtype]}-{DTYPE_IDS[teacher_dtype]}"
    student, teacher, labels = make_kd_inputs(
        (6,), 131, seed=stable_seed(context), student_dtype=student_dtype, teacher_dtype=teacher_dtype,
        ignored_fraction=0.2,
    )
    (loss, grad), _ = check_against_reference(
        student, teacher, labels, context=context, divergence=divergence, temperature=2.0, alpha=0.5,
        label_smoothing=0.1,
    )
    assert loss.dtype == torch.float32
    assert grad.dtype == student_dtype


def test_teacher_receives_no_gradient(make_kd_inputs):
    student, teacher, labels = make_kd_inputs((4,), 37, seed=11)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    functional.kd_loss(student, teacher, labels, divergence="jsd", alpha=0.5, temperature=2.0).backward()
    assert student.grad is not None and bool((student.grad != 0).any())
    assert teacher.grad is None or bool((teacher.grad == 0).all())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_float64(make_kd_inputs, divergence, reduction):
    student, teacher, labels = make_kd_inputs((4,), 5, seed=stable_seed("gradcheck", divergence, reduction),
                                              student_dtype=torch.float64)
    labels[1] = -100
    student.requires_grad_(True)

    def loss_of_student(student_logits):
        return functional.kd_loss(
            student_logits, teacher, labels, divergence=divergence, reduction=reduction,
            temperature=1.5, alpha=0.5, beta=0.3, label_smoothing=0.1,
        )

    assert torch.autograd.gradcheck(loss_of_student, (student,), eps=1e-6, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------
# ignore_index and labels=None.


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_rows_ignored(make_kd_inputs, divergence, reduction, alpha):
    student, teacher, labels = make_kd_inputs((2, 3), 37, seed=stable_seed("all-ignored", divergence),
                                              ignored_fraction=1.0)
    assert bool((labels == -100).all())
    grad_output = make_grad_output(expected_loss_shape((2, 3), reduction), 3, student.device)
    loss, grad = run_with_student_grad(
        functional.kd_loss, student, teacher, labels, grad_output, divergence=divergence, reduction=reduction,
        alpha=alpha,
    )
    assert tuple(loss.shape) == expected_loss_shape((2, 3), reduction)
    assert bool((loss == 0).all()), f"all rows ignored must give 0, got {loss}"
    assert bool((grad == 0).all()), "all rows ignored must give a zero gradient"


@pytest.mark.parametrize("ignore_index", [-100, 0, 5])
def test_custom_ignore_index(make_kd_inputs, ignore_index):
    student, teacher, labels = make_kd_inputs((8,), 37, seed=stable_seed("ignore_index", ignore_index))
    labels[::3] = ignore_index
    context = f"ignore_index={ignore_index}"
    (loss, grad), _ = check_against_reference(
        student, teacher, labels, reduction="none", context=context, alpha=0.5, ignore_index=ignore_index
    )
    ignored = labels == ignore_index
    assert bool((loss[ignored] == 0).all()) and bool((loss[~ignored] != 0).all())
    assert bool((grad[ignored] == 0).all())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_labels_none_with_alpha_zero(make_kd_inputs, divergence, reduction):
    context = f"labels-none/{divergence}/{reduction}"
    student, teacher, _ = make_kd_inputs((5,), 37, seed=stable_seed(context), with_labels=False)
    (loss_without_labels, grad_without_labels), _ = check_against_reference(
        student, teacher, None, reduction=reduction, context=context, divergence=divergence, temperature=2.0
    )
    all_valid_labels = torch.zeros(5, dtype=torch.long, device=student.device)
    grad_output = make_grad_output(expected_loss_shape((5,), reduction), stable_seed(context, "grad"), student.device)
    loss_with_labels, grad_with_labels = run_with_student_grad(
        functional.kd_loss, student, teacher, all_valid_labels, grad_output, divergence=divergence, reduction=reduction,
        temperature=2.0,
    )
    torch.testing.assert_close(loss_without_labels, loss_with_labels, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_without_labels, grad_with_labels, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------
# −inf entries (masked vocabulary).

MASKED_COLUMNS = [0, 3, 4, 20, 36]


def mask_columns(logits: torch.Tensor, rows=slice(None)) -> torch.Tensor:
    masked = logits.clone()
    masked[rows, MASKED_COLUMNS] = float("-inf")
    return masked


def labels_avoiding_masked_columns(labels: torch.Tensor) -> torch.Tensor:
    unmasked = [column for column in range(37) if column not in MASKED_COLUMNS]
    generator = torch.Generator().manual_seed(5)
    replacement = torch.tensor(unmasked)[torch.randint(0, len(unmasked), labels.shape, generator=generator)]
    return torch.where(labels == -100, labels, replacement.to(labels.device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda dtype: DTYPE_IDS[dtype])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_teacher_only_masked_vocab(make_kd_inputs, divergence, alpha, dtype):
    context = f"teacher-masked/{divergence}/alpha={alpha}/{DTYPE_IDS[dtype]}"
    student, teacher, labels = make_kd_inputs((6,), 37, seed=stable_seed(context), student_dtype=dtype,
                                              ignored_fraction=0.2)
    check_against_reference(
        student, mask_columns(teacher), labels, reduction="sum", context=context,
        divergence=divergence, alpha=alpha, temperature=2.0, label_smoothing=0.1,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda dtype: DTYPE_IDS[dtype])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_student_and_teacher_masked_vocab(make_kd_inputs, divergence, alpha, dtype):
    context = f"both-masked/{divergence}/alpha={alpha}/{DTYPE_IDS[dtype]}"
    student, teacher, labels = make_kd_inputs((6,), 37, seed=stable_seed(context), student_dtype=dtype,
                                              ignored_fraction=0.2)
    (loss, grad), _ = check_against_reference(
        mask_columns(student), mask_columns(teacher), labels_avoiding_masked_columns(labels), reduction="mean",
        context=context, divergence=divergence, alpha=alpha, temperature=0.5,
    )
    assert torch.isfinite(loss)
    assert bool((grad[:, MASKED_COLUMNS] == 0).all()), f"{context}: masked vocab entries received a gradient"


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd"])
def test_student_only_masked_vocab(make_kd_inputs, divergence, alpha):
    context = f"student-masked/{divergence}/alpha={alpha}"
    student, teacher, labels = make_kd_inputs((6,), 37, seed=stable_seed(context), ignored_fraction=0.2)
    (loss, grad), _ = check_against_reference(
        mask_columns(student), teacher, labels_avoiding_masked_columns(labels), reduction="none",
        context=context, divergence=divergence, alpha=alpha, temperature=2.0,
    )
    assert bool(torch.isfinite(loss).all())
    assert bool((grad[:, MASKED_COLUMNS] == 0).all()), f"{context}: masked vocab entries received a gradient"


@pytest.mark.parametrize(
    "divergence, masked_side", [("forward_kl", "student"), ("reverse_kl", "teacher")]
)
def test_divergence_is_infinite_outside_support(make_kd_inputs, divergence, masked_side):
    """KL(a‖b) is +inf when b is 0 where a is not; only the masked rows are affected."""
    student, teacher, labels = make_kd_inputs((6,), 37, seed=stable_seed("infinite", divergence))
    masked_rows = slice(0, 3)
    if masked_side == "student":
        student = mask_columns(student, masked_rows)
    else:
        teacher = mask_columns(teacher, masked_rows)
    loss = functional.kd_loss(student, teacher, labels, divergence=divergence, reduction="none")
    expected = reference.kd_loss(student.double(), teacher.double(), labels, divergence=divergence, reduction="none")
    assert bool((expected[masked_rows] == float("inf")).all())
    assert bool((loss[masked_rows] == float("inf")).all()), f"expected +inf in the masked rows, got {loss}"
    assert_loss_close(loss[3:], expected[3:], loss_scale=1.0, context=f"infinite/{divergence}")


# --------------------------------------------------------------------------------------
# Large logits, vocabulary sizes, shapes and layouts.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda dtype: DTYPE_IDS[dtype])
@pytest.mark.parametrize("layout", ["shifted", "spread"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_logits_near_ten_thousand(make_kd_inputs, divergence, layout, dtype):
    """Logits of magnitude ~1e4: a ±1e4 shift of every entry, or entries spread over ±1e4.

    At this magnitude one fp32 spacing is ~1e-3, and PyTorch's own fp32 log_softmax (which
    forms max + log Σ as one fp32 number) is off by that much. These cases therefore use
    docs/design.md's same-precision rule: the max error of the loss under test and of its
    gradient may be at most twice that of PyTorch computing the same formula in fp32 (the
    reference run on the inputs as given), plus the usual fp32 allowance.
    """
    context = f"large/{divergence}/{layout}/{DTYPE_IDS[dtype]}"
    student, teacher, labels = make_kd_inputs((6,), 131, seed=stable_seed(context), student_dtype=torch.float64,
                                              ignored_fraction=0.2)
    if layout == "shifted":
        student = student + 1.0e4
        teacher = teacher - 1.0e4
    else:
        student = student * (1.0e4 / 3.0)
        teacher = teacher * (1.0e4 / 3.0)
    student, teacher = student.to(dtype), teacher.to(dtype)
    assert float(student.abs().max()) > 5e3
    options = dict(reduction="sum", divergence=divergence, alpha=0.5, temperature=2.0, label_smoothing=0.1)
    grad_output = make_grad_output((), stable_seed(context, "grad"), student.device)

    loss, grad = run_with_student_grad(functional.kd_loss, student, teacher, labels, grad_output, **options)
    fp32_loss, fp32_grad = run_with_student_grad(reference.kd_loss, student, teacher, labels, grad_output, **options)
    expected_loss, expected_grad = run_reference_float64(student, teacher, labels, grad_output, **options)

    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())
    expected_loss, expected_grad = expected_loss.cpu(), expected_grad.cpu()

    def max_error(result, expected):
        return float((result.to(torch.float64).cpu() - expected).abs().max())

    loss_allowed = 2.0 * max_error(fp32_loss, expected_loss) + LOSS_RTOL * float(expected_loss.abs())
    assert max_error(loss, expected_loss) <= loss_allowed, (
        f"{context}: loss error {max_error(loss, expected_loss):.3e} > allowed {loss_allowed:.3e} "
        f"(loss={float(loss)}, expected={float(expected_loss)})"
    )
    grad_allowed = 2.0 * max_error(fp32_grad, expected_grad) + GRAD_NORM_ATOL * float(expected_grad.abs().max())
    assert max_error(grad, expected_grad) <= grad_allowed, (
        f"{context}: grad error {max_error(grad, expected_grad):.3e} > allowed {grad_allowed:.3e}"
    )
    assert bool((grad[labels == -100] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda dtype: DTYPE_IDS[dtype])
@pytest.mark.parametrize("vocab_size", [1, 7, 1271, 50257])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_vocab_sizes(make_kd_inputs, divergence, vocab_size, dtype):
    context = f"vocab/{divergence}/V={vocab_size}/{DTYPE_IDS[dtype]}"
    row_count = 3 if vocab_size > 2000 else 5
    student, teacher, labels = make_kd_inputs((row_count,), vocab_size, seed=stable_seed(context), student_dtype=dtype)
    labels[-1] = -100
    (loss, grad), _ = check_against_reference(
        student, teacher, labels, reduction="mean", context=context,
        divergence=divergence, alpha=0.5, temperature=2.0, label_smoothing=0.1,
    )
    if vocab_size == 1:
        # One class: p = q = r = 1, so every term vanishes (up to fp32 rounding of exp/log).
        assert abs(float(loss)) <= 1e-6
        assert float(grad.abs().max()) <= 1e-6


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_three_dim_inputs(make_kd_inputs, divergence, reduction):
    context = f"3d/{divergence}/{reduction}"
    student, teacher, labels = make_kd_inputs((2, 4), 37, seed=stable_seed(context), ignored_fraction=0.25)
    (loss, _), _ = check_against_reference(
        student, teacher, labels, reduction=reduction, context=context, divergence=divergence, alpha=0.5,
        temperature=2.0,
    )
    flat_loss = functional.kd_loss(
        student.reshape(8, 37), teacher.reshape(8, 37), labels.reshape(8), reduction=reduction,
        divergence=divergence, alpha=0.5, temperature=2.0,
    )
    expected_flat = flat_loss.reshape(2, 4) if reduction == "none" else flat_loss
    torch.testing.assert_close(loss, expected_flat, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_row_one_dim_input(make_kd_inputs, reduction):
    student, teacher, labels = make_kd_inputs((), 37, seed=stable_seed("1d", reduction))
    assert student.dim() == 1 and labels.dim() == 0
    (loss, grad), _ = check_against_reference(
        student, teacher, labels, reduction=reduction, context=f"1d/{reduction}", alpha=0.5, temperature=2.0
    )
    assert loss.dim() == 0 and grad.shape == (37,)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("leading_shape", [(6,), (2, 3), (1, 2, 3)], ids=lambda shape: "x".join(map(str, shape)))
def test_reduction_output_shapes(make_kd_inputs, leading_shape, reduction):
    student, teacher, labels = make_kd_inputs(leading_shape, 7, seed=3)
    loss = functional.kd_loss(student, teacher, labels, reduction=reduction, alpha=0.5)
    assert tuple(loss.shape) == expected_loss_shape(leading_shape, reduction)
    assert loss.dtype == torch.float32


def make_non_contiguous_case(layout: str, device, seed: int):
    """Returns (student, teacher, labels) views on `device` that are not contiguous in the given way."""
    generator = torch.Generator().manual_seed(seed)
    vocab_size = 37

    def random_logits(*shape):
        return (torch.randn(*shape, generator=generator) * 3.0).to(device)

    if layout == "row_slice":  # [B, 2T, V][:, ::2]: rows 2V apart, vocab contiguous
        student = random_logits(2, 8, vocab_size)[:, ::2]
        teacher = random_logits(2, 8, vocab_size)[:, ::2]
        labels = torch.randint(0, vocab_size, (2, 8), generator=generator).to(device)[:, ::2]
    elif layout == "vocab_stride":  # [N, 2V][:, ::2]: vocab stride 2
        student = random_logits(5, 2 * vocab_size)[:, ::2]
        teacher = random_logits(5, 2 * vocab_size)[:, ::2]
        labels = torch.randint(0, vocab_size, (5,), generator=generator).to(device)
    elif layout == "transposed":  # [V, N].t(): vocab stride N
        student = random_logits(vocab_size, 5).t()
        teacher = random_logits(vocab_size, 5).t()
        labels = torch.randint(0, vocab_size, (10,), generator=generator).to(device)[::2]
    else:
        raise AssertionError(layout)
    assert not student.is_contiguous() and not teacher.is_contiguous()
    return student, teacher, labels


@pytest.mark.parametrize("layout", ["row_slice", "vocab_stride", "transposed"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_contiguous_inputs(device, divergence, layout):
    context = f"noncontiguous/{divergence}/{layout}"
    student, teacher, labels = make_non_contiguous_case(layout, device, stable_seed(context))
    (loss, grad), _ = check_against_reference(
        student, teacher, labels, reduction="none", context=context, divergence=divergence, alpha=0.5, temperature=2.0,
        label_smoothing=0.1,
    )
    grad_output = make_grad_output(expected_loss_shape(student.shape[:-1], "none"), stable_seed(context, "grad"),
                                   student.device)
    contiguous_loss, contiguous_grad = run_with_student_grad(
        functional.kd_loss, student.contiguous(), teacher.contiguous(), labels.contiguous(), grad_output,
        reduction="none", divergence=divergence, alpha=0.5, temperature=2.0, label_smoothing=0.1,
    )
    torch.testing.assert_close(loss, contiguous_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, contiguous_grad, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------
# Options beyond the matrix.


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_t2_scale_off(make_kd_inputs, divergence):
    context = f"t2off/{divergence}"
    student, teacher, labels = make_kd_inputs((6,), 37, seed=stable_seed(context))
    options = dict(divergence=divergence, temperature=3.0, alpha=0.25)
    (scaled, _), _ = check_against_reference(student, teacher, labels, context=context + "/on", t2_scale=True,
                                             **options)
    (unscaled, _), _ = check_against_reference(student, teacher, labels, context=context + "/off", t2_scale=False,
                                               **options)
    assert not math.isclose(float(scaled), float(unscaled), rel_tol=1e-3)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta(make_kd_inputs, beta):
    context = f"jsd-beta/{beta}"
    student, teacher, labels = make_kd_inputs((6,), 131, seed=stable_seed(context), ignored_fraction=0.2)
    check_against_reference(
        student, teacher, labels, reduction="none", context=context, divergence="jsd", beta=beta, temperature=2.0,
        alpha=0.2,
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_distributions_give_zero_divergence(make_kd_inputs, divergence):
    student, _, labels = make_kd_inputs((6,), 37, seed=stable_seed("identical", divergence))
    grad_output = make_grad_output((6,), 1, student.device)
    loss, grad = run_with_student_grad(
        functional.kd_loss, student, student.clone(), labels, grad_output, divergence=divergence,
        temperature=2.0, reduction="none",
    )
    assert float(loss.abs().max()) < 1e-5
    assert float(grad.abs().max()) < 1e-5


def test_options_are_independent_of_call_order(make_kd_inputs):
    """Consecutive calls with different options do not leak state into each other."""
    student, teacher, labels = make_kd_inputs((6,), 37, seed=21)
    first = functional.kd_loss(student, teacher, labels, divergence="tvd", temperature=4.0)
    functional.kd_loss(student, teacher, labels, divergence="jsd", temperature=0.5, alpha=1.0, beta=0.2)
    again = functional.kd_loss(student, teacher, labels, divergence="tvd", temperature=4.0)
    torch.testing.assert_close(first, again, rtol=1e-6, atol=1e-7)



@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_views_reach_the_kernel_uncopied(device, divergence, student_dtype):
    """Rows taken with a step and an offset (row stride != V, last dimension contiguous) are
    passed to the kernels as they are; the gradient lands in the right rows of the base."""
    generator = torch.Generator().manual_seed(stable_seed("strided", divergence))
    rows, vocab = 5, 67
    student_base = torch.randn(2 * rows + 1, vocab + 9, generator=generator).to(device=device, dtype=student_dtype)
    teacher_base = torch.randn(3 * rows, vocab + 4, generator=generator).to(device)
    student_base.requires_grad_(True)
    student = student_base[1::2, 3 : 3 + vocab]  # row stride 2 * (vocab + 9), offset 1 row + 3
    teacher = teacher_base[::3, 4:]  # row stride 3 * (vocab + 4)
    assert student.stride() == (2 * (vocab + 9), 1) and teacher.stride() == (3 * (vocab + 4), 1)
    labels = torch.randint(0, vocab, (rows,), generator=generator).to(device)
    labels[2] = -100
    options = dict(divergence=divergence, alpha=0.5, temperature=2.0, label_smoothing=0.1, reduction="sum")
    loss = functional.kd_loss(student, teacher, labels, **options)
    loss.backward()

    student64 = student.detach().to(torch.float64).requires_grad_(True)
    expected = reference.kd_loss(student64, teacher.to(torch.float64), labels, **options)
    expected.backward()
    assert_loss_close(loss, expected, loss_scale=rows, context="strided")
    grad_in_view = student_base.grad[1::2, 3 : 3 + vocab]
    tolerance = 2e-5 if student_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad_in_view.to(torch.float64), student64.grad, rtol=tolerance,
                               atol=tolerance * float(student64.grad.abs().max()))
    untouched = student_base.grad.clone()
    untouched[1::2, 3 : 3 + vocab] = 0
    assert torch.count_nonzero(untouched) == 0  # nothing written outside the view
