"""Tests for `kdfast.methods.multi_teacher_kd_loss`.

Properties checked: with one teacher it is `kdfast.reference.kd_loss`; `combine="sum"`
is the normalised-weight sum of single-teacher losses; `combine="mixture"` equals the
divergence to the teachers' mixture computed directly in float64 NumPy (every divergence,
per-teacher and per-row weights); the weight normalisation rule; sequence and stacked
teacher inputs agree; the dense loss contract (ignored rows, reductions, dtypes, teacher
constant); gradcheck; clear errors; and a student distilled from two noisy teachers
learns the task.
"""

import math

import numpy as np
import pytest
import torch

from kdfast import reference
from kdfast.methods import multi_teacher_kd_loss

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd"]
REDUCTIONS = ["mean", "sum", "batchmean", "none"]


@pytest.fixture(autouse=True)
def single_thread():
    # The tensors here are tiny: one thread is fastest and immune to a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_inputs(num_teachers, shape, seed, dtype=torch.float64, ignore_fraction=0.3):
    generator = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(shape, generator=generator, dtype=torch.float64)
    teachers = 2.0 * torch.randn((num_teachers,) + shape, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    labels[torch.rand(shape[:-1], generator=generator) < ignore_fraction] = -100
    return student.to(dtype), teachers.to(dtype), labels


def numpy_softmax(row):
    e = np.exp(row - row.max())
    return e / e.sum()


def numpy_divergence(p, q, divergence, beta=0.5):
    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)
    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    return 0.5 * np.abs(p - q).sum()


def numpy_mixture_loss(student, teachers, labels, row_weights, divergence, temperature, alpha,
                       label_smoothing=0.0, beta=0.5, reduction="mean"):
    """ℓ = α·CE + (1−α)·T²·D(Σ_m w̄_m p_m, q) row by row; `row_weights` is [M, rows]."""
    vocab = student.shape[-1]
    s = student.detach().double().reshape(-1, vocab).numpy()
    t = teachers.detach().double().reshape(teachers.shape[0], -1, vocab).numpy()
    y = labels.reshape(-1).numpy()
    w = np.asarray(row_weights, dtype=np.float64)
    rows = []
    for i in range(s.shape[0]):
        if y[i] == -100:
            rows.append(0.0)
            continue
        weights = w[:, i] / w[:, i].sum()
        mixture = sum(weights[m] * numpy_softmax(t[m, i] / temperature) for m in range(t.shape[0]))
        q = numpy_softmax(s[i] / temperature)
        log_r = np.log(numpy_softmax(s[i]))
        ce = -(1 - label_smoothing) * log_r[y[i]] - label_smoothing / vocab * log_r.sum()
        rows.append(alpha * ce + (1 - alpha) * temperature ** 2 * numpy_divergence(mixture, q, divergence, beta))
    rows = np.array(rows)
    valid = int((y != -100).sum())
    return {"none": rows.reshape(tuple(labels.shape)), "sum": rows.sum(), "batchmean": rows.sum() / len(rows),
            "mean": rows.sum() / max(valid, 1)}[reduction]


# ---------------------------------------------------------------- agreement with kd_loss

@pytest.mark.parametrize("combine", ["sum", "mixture"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_teacher_equals_reference_kd_loss(combine, divergence, reduction):
    student, teachers, labels = make_inputs(1, (3, 4, 7), seed=1)
    options = dict(divergence=divergence, temperature=1.7, alpha=0.3, beta=0.3, reduction=reduction,
                   label_smoothing=0.1)
    expected = reference.kd_loss(student, teachers[0], labels, **options)
    for weights in (None, [1.0], [3.5]):
        loss = multi_teacher_kd_loss(student, [teachers[0]], labels, weights=weights, combine=combine, **options)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sum_is_the_normalised_weighted_sum_of_single_teacher_losses(divergence):
    student, teachers, labels = make_inputs(3, (5, 6), seed=2)
    weights = [0.5, 2.0, 1.5]
    options = dict(divergence=divergence, temperature=2.0, alpha=0.4, reduction="none")
    loss = multi_teacher_kd_loss(student, teachers, labels, weights=weights, **options)
    # The weights sum to 4, so each single-teacher loss counts w/4; with normalised weights
    # the α·CE term is shared and appears exactly once.
    expected = sum(w / 4.0 * reference.kd_loss(student, teacher, labels, **options)
                   for w, teacher in zip(weights, teachers))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mixture_matches_numpy_mixture_divergence(divergence, reduction):
    student, teachers, labels = make_inputs(3, (2, 4, 9), seed=3)
    weights = [1.0, 0.0, 3.0]  # a zero weight drops that teacher from the mixture
    loss = multi_teacher_kd_loss(student, teachers, labels, weights=weights, combine="mixture",
                                 divergence=divergence, temperature=1.5, alpha=0.2, beta=0.7,
                                 label_smoothing=0.05, reduction=reduction)
    row_weights = np.repeat(np.array(weights)[:, None], 8, axis=1)
    expected = numpy_mixture_loss(student, teachers, labels, row_weights, divergence, 1.5, 0.2,
                                  label_smoothing=0.05, beta=0.7, reduction=reduction)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-10, atol=1e-13)


def test_mixture_and_sum_differ_and_order_as_convexity_predicts():
    # KL(·‖q) is convex, so D(mixture) ≤ Σ w̄ D(p_m): strictly for distinct teachers.
    student, teachers, _ = make_inputs(4, (6, 8), seed=4)
    sum_rows = multi_teacher_kd_loss(student, teachers, reduction="none")
    mixture_rows = multi_teacher_kd_loss(student, teachers, combine="mixture", reduction="none")
    assert torch.all(mixture_rows < sum_rows - 1e-6)
    identical = teachers[:1].expand(4, 6, 8)
    torch.testing.assert_close(multi_teacher_kd_loss(student, identical, combine="mixture"),
                               multi_teacher_kd_loss(student, identical, combine="sum"))


# ---------------------------------------------------------------- weights

@pytest.mark.parametrize("combine", ["sum", "mixture"])
def test_per_row_weights_match_numpy_and_extend_per_teacher_weights(combine):
    student, teachers, labels = make_inputs(3, (2, 3, 5), seed=5, ignore_fraction=0.0)
    generator = torch.Generator().manual_seed(6)
    row_weights = torch.rand(3, 2, 3, generator=generator, dtype=torch.float64)
    loss = multi_teacher_kd_loss(student, teachers, labels, weights=row_weights, combine=combine,
                                 temperature=2.0, reduction="none")
    if combine == "mixture":
        expected = numpy_mixture_loss(student, teachers, labels, row_weights.reshape(3, -1).numpy(),
                                      "forward_kl", 2.0, 0.0, reduction="none")
    else:
        per_teacher = torch.stack([reference.kd_loss(student, t, labels, temperature=2.0, reduction="none")
                                   for t in teachers])
        expected = (row_weights / row_weights.sum(0) * per_teacher).sum(0).numpy()
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-10)
    constant = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    torch.testing.assert_close(
        multi_teacher_kd_loss(student, teachers, labels, weights=constant[:, None, None].expand(3, 2, 3),
                              combine=combine),
        multi_teacher_kd_loss(student, teachers, labels, weights=constant, combine=combine))


@pytest.mark.parametrize("combine", ["sum", "mixture"])
def test_weights_are_normalised_and_default_to_uniform(combine):
    student, teachers, labels = make_inputs(3, (4, 6), seed=7)
    base = multi_teacher_kd_loss(student, teachers, labels, weights=[1.0, 2.0, 3.0], combine=combine)
    scaled = multi_teacher_kd_loss(student, teachers, labels, weights=torch.tensor([10.0, 20.0, 30.0]),
                                   combine=combine)
    torch.testing.assert_close(base, scaled)
    torch.testing.assert_close(multi_teacher_kd_loss(student, teachers, labels, combine=combine),
                               multi_teacher_kd_loss(student, teachers, labels, weights=[7.0] * 3, combine=combine))


def test_zero_weight_sum_is_allowed_only_on_ignored_rows():
    student, teachers, labels = make_inputs(2, (4, 5), seed=8, ignore_fraction=0.0)
    row_weights = torch.rand(2, 4, dtype=torch.float64) + 0.1
    row_weights[:, 1] = 0.0
    with pytest.raises(ValueError, match="positive sum"):
        multi_teacher_kd_loss(student, teachers, labels, weights=row_weights)
    labels[1] = -100
    loss = multi_teacher_kd_loss(student, teachers, labels, weights=row_weights, reduction="none")
    assert loss[1].item() == 0.0 and torch.isfinite(loss).all()


# ---------------------------------------------------------------- inputs and contract

@pytest.mark.parametrize("combine", ["sum", "mixture"])
def test_sequence_and_stacked_teachers_agree_and_dtypes_may_differ(combine):
    student, teachers, labels = make_inputs(3, (5, 7), seed=9, dtype=torch.float32)
    stacked = multi_teacher_kd_loss(student, teachers, labels, combine=combine)
    mixed = [teachers[0].to(torch.bfloat16), teachers[1].half(), teachers[2]]
    torch.testing.assert_close(multi_teacher_kd_loss(student, list(teachers), labels, combine=combine), stacked)
    assert stacked.dtype == torch.float32
    student_bf16 = student.to(torch.bfloat16).requires_grad_(True)
    loss = multi_teacher_kd_loss(student_bf16, mixed, labels, combine=combine)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student_bf16.grad.dtype == torch.bfloat16
    assert multi_teacher_kd_loss(student.double(), list(teachers), labels, combine=combine).dtype == torch.float64


@pytest.mark.parametrize("combine", ["sum", "mixture"])
def test_gradcheck_float64(combine):
    student, teachers, labels = make_inputs(3, (3, 6), seed=10)
    student.requires_grad_(True)
    weights = torch.tensor([[0.2, 1.0, 0.5], [1.0, 0.0, 0.5], [0.3, 2.0, 0.0]], dtype=torch.float64)
    for divergence in ("forward_kl", "jsd"):
        assert torch.autograd.gradcheck(
            lambda s: multi_teacher_kd_loss(s, teachers, labels, weights=weights, combine=combine,
                                            divergence=divergence, temperature=1.3, alpha=0.25,
                                            reduction="none"),
            (student,))


@pytest.mark.parametrize("combine", ["sum", "mixture"])
def test_teachers_and_weights_are_constants_and_ignored_rows_get_no_gradient(combine):
    student, teachers, labels = make_inputs(2, (5, 4), seed=11, ignore_fraction=0.0)
    labels[3] = -100
    student.requires_grad_(True)
    teachers.requires_grad_(True)
    weights = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    multi_teacher_kd_loss(student, teachers, labels, weights=weights, combine=combine, alpha=0.5).backward()
    assert teachers.grad is None and weights.grad is None
    assert torch.all(student.grad[3] == 0) and student.grad[[0, 1, 2, 4]].abs().sum() > 0


def test_all_rows_ignored_gives_zero():
    student, teachers, labels = make_inputs(2, (3, 4), seed=12)
    labels[:] = -100
    student.requires_grad_(True)
    loss = multi_teacher_kd_loss(student, teachers, labels, combine="mixture")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(student.grad == 0)


def test_masked_vocabulary_entries_stay_finite():
    student, teachers, labels = make_inputs(2, (4, 6), seed=13)
    teachers[:, :, 2] = float("-inf")
    student.requires_grad_(True)
    for combine in ("sum", "mixture"):
        loss = multi_teacher_kd_loss(student, teachers, labels, combine=combine, divergence="jsd")
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_rejects_bad_input():
    student, teachers, labels = make_inputs(2, (4, 5), seed=14)
    cases = [
        (dict(teacher_logits=[teachers[0], teachers[1][:, :4]]), ValueError, r"teacher_logits\[1\] has shape \(4, 4\)"),
        (dict(teacher_logits=teachers[0]), ValueError, r"\[M, 4, 5\].*\[teacher_logits\]"),
        (dict(teacher_logits=[]), ValueError, "at least one teacher"),
        (dict(teacher_logits=[teachers[0], "x"]), TypeError, r"teacher_logits\[1\]"),
        (dict(teacher_logits=3), TypeError, "teacher_logits must be"),
        (dict(weights=[1.0, -1.0]), ValueError, "non-negative"),
        (dict(weights=[1.0, 2.0, 3.0]), ValueError, r"\(2,\).*\(2, 4\).*got \(3,\)"),
        (dict(weights=torch.ones(2, 5)), ValueError, r"got \(2, 5\)"),
        (dict(weights=[0.0, 0.0]), ValueError, "positive sum"),
        (dict(weights=["a", 1]), TypeError, "weights"),
        (dict(combine="average"), ValueError, "combine"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(labels=None, alpha=0.5), ValueError, "alpha"),
        (dict(labels=labels.int()), TypeError, "int64"),
        (dict(labels=torch.full_like(labels, 5)), ValueError, "5"),
    ]
    for overrides, exception, pattern in cases:
        arguments = dict(student_logits=student, teacher_logits=teachers, labels=labels)
        arguments.update(overrides)
        with pytest.raises(exception, match=pattern):
            multi_teacher_kd_loss(arguments.pop("student_logits"), arguments.pop("teacher_logits"),
                                  arguments.pop("labels"), **arguments)


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("combine", ["sum", "mixture"])
def test_student_distilled_from_two_noisy_teachers_learns_the_task(combine):
    generator = torch.Generator().manual_seed(20)
    inputs = torch.randn(256, 10, generator=generator)
    true_logits = 4.0 * torch.tanh(inputs @ torch.randn(10, 32, generator=generator) / math.sqrt(10)) \
        @ torch.randn(32, 4, generator=generator) / math.sqrt(32)
    labels = true_logits.argmax(-1)
    # Each teacher is right on average but wrong on about a third of the samples, with
    # independent errors; confidence weights favour the more certain teacher on each sample.
    teachers = torch.stack([true_logits + 1.5 * torch.randn(256, 4, generator=generator) for _ in range(2)])
    teacher_accuracies = (teachers.argmax(-1) == labels).float().mean(1)
    confidence = torch.softmax(teachers, -1).amax(-1)
    torch.manual_seed(21)
    student = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)

    def loss_fn():
        return multi_teacher_kd_loss(student(inputs), teachers, weights=confidence, combine=combine, temperature=2.0)

    with torch.no_grad():
        initial = loss_fn().item()
    for _ in range(150):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (student(inputs).argmax(-1) == labels).float().mean().item()
    assert loss.item() < 0.5 * initial
    # The smooth student averages the teachers' independent errors away and beats both.
    assert accuracy > 0.75 and accuracy > teacher_accuracies.max().item() + 0.05  # chance is 0.25
