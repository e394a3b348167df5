"""Tests of `kdfast.functional.uld_loss` against the float64 oracle `kdfast.reference.uld_loss`.

Exact form (k=None): loss and student gradient over leading shapes × vocabulary pairs (the
student's larger, smaller, equal; V = 1) × dtypes × temperatures × reductions, float32 to
≲ 2e-5 relative, 16-bit gradients within twice the rounding error of the float64 gradient
plus an fp32 allowance; float64 gradcheck. Top-k form: the same comparison with the oracle's
top-k form, the bound exact − 2·min(A, B) ≤ approximate ≤ exact, equality where one side is
complete, `SoftLabels` teachers equal to the logits path. Also masks, NaN rows, layouts, the
error messages, and equality with TRL's `ULDLoss` (plain path) on the same inputs.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import kdfast
from kdfast import functional, reference
from trl_gold import plain_uld_module

REDUCTIONS = ("mean", "sum", "none", "batchmean")
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
VOCAB_PAIRS = ((50, 70), (70, 50), (64, 64), (1, 7), (7, 1), (1271, 300))
TEMPERATURES = ((1.0, 1.0), (2.0, 0.5))


def make_inputs(leading, student_vocab, teacher_vocab, *, seed, dtype=torch.float32, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(*leading, student_vocab, generator=generator, dtype=torch.float64) * scale).to(dtype)
    teacher = torch.randn(*leading, teacher_vocab, generator=generator, dtype=torch.float64) * scale
    grad_output = torch.rand(leading, generator=generator, dtype=torch.float64) + 0.5
    return student, teacher.to(torch.float32), grad_output


def run(loss_fn, student, teacher, grad_output, dtype_out=None, **options):
    """(loss, gradient) of loss_fn at a fresh leaf copy of `student`, backpropagating grad_output."""
    leaf = student.detach().clone().requires_grad_(True)
    loss = loss_fn(leaf, teacher, **options)
    weight = grad_output.to(loss.dtype) if options.get("reduction") == "none" else torch.tensor(0.75, dtype=loss.dtype)
    (loss * weight).sum().backward()
    return loss.detach(), leaf.grad


def check_against_reference(student, teacher, grad_output, **options):
    loss, grad = run(functional.uld_loss, student, teacher, grad_output, **options)
    reference_teacher = teacher if isinstance(teacher, kdfast.SoftLabels) else teacher.to(torch.float64)
    expected_loss, expected_grad = run(reference.uld_loss, student.to(torch.float64), reference_teacher,
                                       grad_output, **options)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    torch.testing.assert_close(loss.double(), expected_loss, rtol=2e-5, atol=1e-6)
    grad_scale = expected_grad.abs().max().item() + 1e-30
    fp32_allowance = 2e-5 * expected_grad.abs() + 1e-5 * grad_scale
    if student.dtype in (torch.bfloat16, torch.float16):
        rounding = (expected_grad.to(student.dtype).double() - expected_grad).abs().max()
        assert (grad.double() - expected_grad).abs().max() <= 2 * rounding + fp32_allowance.max()
    else:
        assert ((grad.double() - expected_grad).abs() <= fp32_allowance).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperatures", TEMPERATURES, ids=lambda t: f"Ts{t[0]}-Tt{t[1]}")
@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
@pytest.mark.parametrize("vocabs", VOCAB_PAIRS, ids=lambda v: f"Vs{v[0]}-Vt{v[1]}")
@pytest.mark.parametrize("leading", [(9,), (2, 3)], ids=["rows9", "2x3"])
def test_exact_matches_reference(leading, vocabs, dtype, temperatures, reduction):
    seed = zlib.crc32(repr((leading, vocabs, DTYPE_IDS[dtype], temperatures, reduction)).encode())
    student, teacher, grad_output = make_inputs(leading, *vocabs, seed=seed, dtype=dtype)
    check_against_reference(student, teacher, grad_output, student_temperature=temperatures[0],
                            teacher_temperature=temperatures[1], reduction=reduction)


@pytest.mark.parametrize("k", [1, 5, 40, 69, 100])
@pytest.mark.parametrize("vocabs", [(50, 70), (70, 50), (300, 1271)], ids=lambda v: f"Vs{v[0]}-Vt{v[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
def test_topk_matches_reference(vocabs, k, dtype):
    student, teacher, grad_output = make_inputs((11,), *vocabs, seed=k * 7 + vocabs[0], dtype=dtype)
    for reduction in ("none", "mean"):
        check_against_reference(student, teacher, grad_output, k=k, student_temperature=1.5,
                                teacher_temperature=0.8, reduction=reduction)


def remaining_masses(student, teacher, sizes, student_temperature, teacher_temperature):
    a = torch.sort(torch.softmax(student.double() / student_temperature, -1), -1, descending=True).values
    b = torch.sort(torch.softmax(teacher.double() / teacher_temperature, -1), -1, descending=True).values
    return a[..., sizes.compared:].sum(-1), b[..., sizes.compared:].sum(-1)


@pytest.mark.parametrize("k", [1, 3, 16, 64])
@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])
@pytest.mark.parametrize("vocabs", [(200, 300), (300, 200)], ids=lambda v: f"Vs{v[0]}-Vt{v[1]}")
def test_topk_is_a_lower_bound_within_twice_the_smaller_remainder(vocabs, scale, k):
    student, teacher, _ = make_inputs((32,), *vocabs, seed=int(scale * 10) + k, scale=scale)
    exact = reference.uld_loss(student.double(), teacher.double(), reduction="none")
    approximate = functional.uld_loss(student, teacher, k=k, reduction="none").double()
    sizes = reference.uld.uld_sizes(*vocabs, k)
    assert not sizes.exact and sizes.compared == k
    student_rest, teacher_rest = remaining_masses(student, teacher, sizes, 1.0, 1.0)
    slack = 1e-5 * exact.abs().max()
    assert (approximate <= exact + slack).all()
    assert (approximate >= exact - 2 * torch.minimum(student_rest, teacher_rest) - slack).all()
    # the bound is informative: the gap shrinks as k grows and vanishes at k = V
    if k == 64 and scale == 8.0:
        assert (exact - approximate).max() < 1e-2


@pytest.mark.parametrize("k", [20, 64])
def test_topk_is_exact_when_one_side_keeps_its_whole_vocabulary(k):
    student, teacher, _ = make_inputs((10,), 16, 500, seed=k)
    sizes = reference.uld.uld_sizes(16, 500, k)
    assert sizes.student_k == 16 and sizes.compared == k
    exact = reference.uld_loss(student.double(), teacher.double(), reduction="none")
    torch.testing.assert_close(functional.uld_loss(student, teacher, k=k, reduction="none").double(), exact,
                               rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("k", [60, 80, 1000])
def test_k_at_least_the_vocabularies_is_exact(k):
    student, teacher, grad_output = make_inputs((5,), 50, 60, seed=k)
    exact_loss, exact_grad = run(functional.uld_loss, student, teacher, grad_output, reduction="none")
    loss, grad = run(functional.uld_loss, student, teacher, grad_output, k=k, reduction="none")
    assert reference.uld.uld_sizes(50, 60, k).exact == (k >= 60)
    if k >= 60:
        torch.testing.assert_close(loss, exact_loss)
        torch.testing.assert_close(grad, exact_grad)


@pytest.mark.parametrize("teacher_k", [4, 32, 60])
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
def test_soft_labels_teacher_equals_logits_teacher(teacher_k, student_dtype):
    student, teacher, grad_output = make_inputs((3, 4), 45, 60, seed=teacher_k, dtype=student_dtype)
    soft = kdfast.compress_topk(teacher.to(student_dtype), teacher_k, temperature=0.7)
    from_soft = run(functional.uld_loss, student, soft, grad_output, student_temperature=1.3, reduction="none")
    from_logits = run(functional.uld_loss, student, teacher.to(student_dtype), grad_output, k=teacher_k,
                      student_temperature=1.3, teacher_temperature=0.7, reduction="none")
    torch.testing.assert_close(from_soft, from_logits, rtol=1e-5, atol=1e-6)
    check_against_reference(student, soft, grad_output, student_temperature=1.3, reduction="sum")
    check_against_reference(student, soft.for_storage(), grad_output, k=3, reduction="none")


@pytest.mark.parametrize("k", [None, 6])
@pytest.mark.parametrize("vocabs", [(9, 13), (13, 9)], ids=lambda v: f"Vs{v[0]}-Vt{v[1]}")
def test_gradcheck_float64(vocabs, k):
    student, teacher, _ = make_inputs((4,), *vocabs, seed=3)
    leaf = student.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: functional.uld_loss(s, teacher.double(), k=k, student_temperature=1.7, reduction="none"), (leaf,))
    soft = kdfast.compress_topk(teacher.double(), 5)
    assert torch.autograd.gradcheck(lambda s: functional.uld_loss(s, soft, k=k, reduction="sum"), (leaf,))


def test_mask_rows_add_zero_and_get_no_gradient_even_when_not_finite():
    student, teacher, grad_output = make_inputs((8,), 30, 40, seed=1)
    mask = torch.tensor([True, False, True, True, False, True, True, False])
    student[1, 3] = float("nan")
    student[4] = float("-inf")
    for reduction in REDUCTIONS:
        loss, grad = run(functional.uld_loss, student, teacher, grad_output, mask=mask, reduction=reduction)
        expected, expected_grad = run(reference.uld_loss, student.double(), teacher.double(), grad_output,
                                      mask=mask, reduction=reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all()
        torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=2e-5, atol=1e-6)
    rows = functional.uld_loss(student, teacher, mask=mask, reduction="none")
    assert (rows[~mask] == 0).all()
    mean = functional.uld_loss(student, teacher, mask=mask, reduction="mean")
    torch.testing.assert_close(mean, rows.sum() / mask.sum())
    nothing = torch.zeros(8, dtype=torch.bool)
    leaf = student.clone().requires_grad_(True)
    loss = functional.uld_loss(leaf, teacher, mask=nothing)
    loss.backward()
    assert loss.item() == 0 and (leaf.grad == 0).all()


@pytest.mark.parametrize("k", [None, 4])
def test_nan_row_gives_nan_loss_and_gradient(k):
    student, teacher, grad_output = make_inputs((4,), 20, 30, seed=2)
    student[2, 5] = float("nan")
    loss, grad = run(functional.uld_loss, student, teacher, grad_output, k=k, reduction="none")
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    assert torch.isfinite(loss[[0, 1, 3]]).all() and torch.isfinite(grad[[0, 1, 3]]).all()


@pytest.mark.parametrize(("student_temperature", "teacher_temperature", "scale"), [
    (1e-3, 1e3, 3.0), (1e-20, 1e20, 3.0), (1.0, 1.0, 1e4), (0.5, 2.0, 3e37),
])
@pytest.mark.parametrize("k", [None, 7])
def test_extreme_temperatures_and_logits(student_temperature, teacher_temperature, scale, k):
    student, teacher, grad_output = make_inputs((5,), 40, 60, seed=int(scale) % 1000, scale=scale)
    assert torch.isfinite(student).all() and torch.isfinite(teacher).all()
    loss, grad = run(functional.uld_loss, student, teacher, grad_output, k=k, student_temperature=student_temperature,
                     teacher_temperature=teacher_temperature, reduction="none")
    expected, expected_grad = run(reference.uld_loss, student.double(), teacher.double(), grad_output, k=k,
                                  student_temperature=student_temperature, teacher_temperature=teacher_temperature,
                                  reduction="none")
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=1e-6)
    assert ((grad.double() - expected_grad).abs() <= 2e-5 * expected_grad.abs() + 1e-6).all()


def test_non_contiguous_student_and_teacher():
    student, teacher, grad_output = make_inputs((6,), 80, 50, seed=4)
    wide_student = torch.stack([student, student + 1], dim=-1).reshape(6, 160)[:, ::2]
    wide_teacher = teacher.t().contiguous().t()
    assert not wide_student.is_contiguous() and not wide_teacher.is_contiguous()
    check_against_reference(wide_student, wide_teacher, grad_output, k=7, reduction="sum")
    check_against_reference(wide_student, wide_teacher, grad_output, reduction="none")


@pytest.mark.parametrize(("arguments", "error", "message"), [
    (dict(student=torch.ones(3, 4, dtype=torch.long)), TypeError, "student_logits must be a floating"),
    (dict(teacher=torch.randn(2, 9)), ValueError, "teacher has leading shape"),
    (dict(teacher=[1.0]), TypeError, "teacher must be a torch.Tensor"),
    (dict(k=0), ValueError, "k must be at least 1"),
    (dict(k=2.5), TypeError, "k must be an int"),
    (dict(student_temperature=0.0), ValueError, "temperature must be finite"),
    (dict(teacher_temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(mask=torch.ones(3, dtype=torch.long)), TypeError, "mask must have dtype torch.bool"),
    (dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask must have the leading shape"),
    (dict(soft_temperature=2.0), ValueError, "differs from the soft labels' temperature"),
    (dict(soft_rows=4), ValueError, "teacher soft labels have leading shape"),
])
def test_errors_name_the_argument(arguments, error, message):
    student = arguments.pop("student", torch.randn(3, 4))
    teacher = arguments.pop("teacher", torch.randn(3, 9))
    if "soft_temperature" in arguments:
        teacher = kdfast.compress_topk(teacher, 2, temperature=arguments.pop("soft_temperature"))
        arguments["teacher_temperature"] = 1.0
    if "soft_rows" in arguments:
        teacher = kdfast.compress_topk(torch.randn(arguments.pop("soft_rows"), 9), 2)
    for loss_fn in (functional.uld_loss, reference.uld_loss):
        with pytest.raises(error, match=message) as raised:
            loss_fn(student, teacher, **arguments)
        assert str(raised.value).startswith("uld_loss:")


def test_public_names():
    assert kdfast.uld_loss is functional.uld_loss
    assert reference.uld_loss is reference.uld.uld_loss


# ---------------------------------------------------------------------------------- TRL
# TRL's ULDLoss (plain path: use_extended_uld=False) takes, per batch item, the first
# min(L_s, L_t) positions, sorts each side's softmax at its own temperature, pads with zeros,
# sums |a − b| over positions and vocabulary, divides by the number of positions, then averages
# over the batch and multiplies by uld_distillation_weight. kdfast's rows are already aligned
# (one row per position or span), so that is uld_loss(reduction="none").mean(-1).mean().

@pytest.mark.parametrize(("batch", "length"), [(1, 1), (2, 5), (3, 8)])
@pytest.mark.parametrize("vocabs", [(40, 60), (60, 40), (32, 32)], ids=lambda v: f"Vs{v[0]}-Vt{v[1]}")
@pytest.mark.parametrize("temperatures", TEMPERATURES, ids=lambda t: f"Ts{t[0]}-Tt{t[1]}")
def test_equals_trl_uld_loss(batch, length, vocabs, temperatures):
    trl_loss = plain_uld_module(*temperatures)
    if trl_loss is None:
        pytest.skip("TRL's ULDLoss cannot be loaded")
    student, teacher, _ = make_inputs((batch, length), *vocabs, seed=batch * 100 + length, dtype=torch.float64)
    teacher = teacher.double()
    labels = torch.zeros(batch, length, dtype=torch.long)
    ids = torch.zeros(batch, length, dtype=torch.long)
    trl_student = student.clone().requires_grad_(True)
    expected = trl_loss(trl_student, teacher, labels, labels, ids, ids)
    expected.backward()
    ours_student = student.clone().requires_grad_(True)
    ours = functional.uld_loss(ours_student, teacher, student_temperature=temperatures[0],
                               teacher_temperature=temperatures[1], reduction="none").mean(-1).mean()
    ours.backward()
    torch.testing.assert_close(ours, expected.reshape(()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_student.grad, trl_student.grad, rtol=1e-10, atol=1e-12)


def test_trl_adapter_loads_the_installed_class():
    module = plain_uld_module()
    if module is None:
        pytest.skip("TRL's ULDLoss cannot be loaded")
    assert type(module).__name__ == "ULDLoss"
    assert not module.use_extended_uld and module.crossentropy_weight == 0


def test_sizes_rule():
    sizes = reference.uld.uld_sizes
    for student_vocab, teacher_vocab, k in itertools.product((5, 50), (7, 70), (None, 1, 6, 60, 100)):
        result = sizes(student_vocab, teacher_vocab, k)
        assert result.student_k <= student_vocab and result.teacher_k <= teacher_vocab
        assert result.student_k <= result.compared
        assert result.exact == (k is None or k >= max(student_vocab, teacher_vocab))
        if result.exact:
            assert result.compared == max(student_vocab, teacher_vocab)
