"""Tests for the logit-level methods: `logit_mse_loss` and `dkd_loss` (decoupled KD).

Each loss is compared against a float64 NumPy implementation written row by row from the
papers' formulas, checked with `torch.autograd.gradcheck`, probed on edge cases (ignored
rows, masked vocabulary, large logits, mixed dtypes) and bad input, and used to train a
small student that must end up agreeing with its teacher.
"""

import math

import numpy as np
import pytest
import torch

from kdfast import reference
from kdfast.methods import dkd_loss, logit_mse_loss


@pytest.fixture(autouse=True)
def single_thread():
    # The tensors here are tiny: one thread is fastest and immune to a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def numpy_log_softmax(row):
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def numpy_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def numpy_dkd_row(student_row, teacher_row, label, alpha, beta, temperature):
    p = np.exp(numpy_log_softmax(teacher_row / temperature))
    q = np.exp(numpy_log_softmax(student_row / temperature))
    target_kd = numpy_kl([p[label], 1 - p[label]], [q[label], 1 - q[label]])
    others = [j for j in range(len(p)) if j != label]
    p_hat = p[others] / p[others].sum()
    q_hat = q[others] / q[others].sum()
    return temperature ** 2 * (alpha * target_kd + beta * numpy_kl(p_hat, q_hat))


def numpy_dkd(student, teacher, labels, alpha, beta, temperature, ignore_index, reduction):
    s = student.detach().double().reshape(-1, student.shape[-1]).numpy()
    t = teacher.detach().double().reshape(-1, teacher.shape[-1]).numpy()
    y = labels.reshape(-1).numpy()
    rows = np.array([0.0 if y[i] == ignore_index else numpy_dkd_row(s[i], t[i], y[i], alpha, beta, temperature)
                     for i in range(len(y))])
    valid = int((y != ignore_index).sum())
    if reduction == "none":
        return rows.reshape(tuple(labels.shape))
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / len(rows)
    return rows.sum() / max(valid, 1)


def make_inputs(shape, seed, dtype=torch.float64, ignore_fraction=0.3, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    teacher = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    ignored = torch.rand(shape[:-1], generator=generator) < ignore_fraction
    labels[ignored] = -100
    return student, teacher, labels


# ---------------------------------------------------------------- DKD against NumPy

@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 0.7)])
def test_dkd_matches_numpy(reduction, alpha, beta, temperature):
    student, teacher, labels = make_inputs((3, 5, 7), seed=1)
    loss = dkd_loss(student, teacher, labels, alpha=alpha, beta=beta, temperature=temperature, reduction=reduction)
    expected = numpy_dkd(student, teacher, labels, alpha, beta, temperature, -100, reduction)
    assert loss.dtype == torch.float64
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_dkd_defaults_are_the_papers_setting():
    student, teacher, labels = make_inputs((6, 11), seed=2)
    expected = numpy_dkd(student, teacher, labels, 1.0, 8.0, 4.0, -100, "mean")
    np.testing.assert_allclose(dkd_loss(student, teacher, labels).item(), expected, rtol=1e-10)


def test_dkd_with_beta_one_minus_teacher_target_prob_is_classic_kd():
    # Zhao et al.: KD = TCKD + (1 − p_y)·NCKD, per row.
    student, teacher, labels = make_inputs((5, 9), seed=3, ignore_fraction=0.0)
    temperature = 2.5
    for row in range(5):
        label = labels[row:row + 1]
        p_target = torch.softmax(teacher[row] / temperature, -1)[label].item()
        decoupled = dkd_loss(student[row:row + 1], teacher[row:row + 1], label, alpha=1.0,
                             beta=1.0 - p_target, temperature=temperature)
        classic = reference.kd_loss(student[row:row + 1], teacher[row:row + 1], temperature=temperature)
        torch.testing.assert_close(decoupled, classic, rtol=1e-10, atol=1e-12)


def test_dkd_custom_ignore_index_and_leading_shape_kept():
    student, teacher, labels = make_inputs((2, 3, 6), seed=4, ignore_fraction=0.0)
    labels[0, 1] = 5  # a real class
    labels[1, 2] = 7  # out of range for V=6, but it is the ignore_index
    loss = dkd_loss(student, teacher, labels, ignore_index=7, reduction="none")
    assert loss.shape == (2, 3)
    assert loss[1, 2].item() == 0.0
    expected = numpy_dkd(student, teacher, labels, 1.0, 8.0, 4.0, 7, "none")
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-10)


def test_dkd_gradcheck_float64():
    student, teacher, labels = make_inputs((4, 6), seed=5)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: dkd_loss(s, teacher, labels, alpha=0.7, beta=3.0, temperature=1.5, reduction="none"),
        (student,))
    assert torch.autograd.gradcheck(lambda s: dkd_loss(s, teacher, labels), (student,))


def test_dkd_gradient_goes_to_student_only_and_skips_ignored_rows():
    student, teacher, labels = make_inputs((6, 5), seed=6, ignore_fraction=0.0)
    labels[2] = -100
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    dkd_loss(student, teacher, labels).backward()
    assert teacher.grad is None
    assert torch.all(student.grad[2] == 0)
    assert torch.all(student.grad[[0, 1, 3, 4, 5]].abs().sum(-1) > 0)


def test_dkd_all_rows_ignored_gives_zero_and_zero_gradient():
    student, teacher, labels = make_inputs((4, 5), seed=7)
    labels[:] = -100
    student.requires_grad_(True)
    loss = dkd_loss(student, teacher, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(student.grad == 0)


def test_dkd_extreme_and_masked_logits_stay_finite():
    student, teacher, labels = make_inputs((4, 8), seed=8, ignore_fraction=0.0, scale=1e4)
    teacher[:, 3] = float("-inf")  # masked vocabulary entry (zero teacher probability)
    labels[:] = 0
    student.requires_grad_(True)
    loss = dkd_loss(student, teacher, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()


def test_dkd_mixed_precision_inputs_compute_in_float32():
    student, teacher, labels = make_inputs((5, 7), seed=9, dtype=torch.float32)
    student_bf16 = student.to(torch.bfloat16).requires_grad_(True)
    loss = dkd_loss(student_bf16, teacher.to(torch.float16), labels)
    assert loss.dtype == torch.float32
    expected = numpy_dkd(student_bf16.float(), teacher.to(torch.float16).float(), labels, 1.0, 8.0, 4.0, -100, "mean")
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
    loss.backward()
    assert student_bf16.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("call,exception,fragment", [
    (lambda s, t, y: dkd_loss(s, t[:, :-1], y), ValueError, "same shape"),
    (lambda s, t, y: dkd_loss(s, t, y.int()), TypeError, "int64"),
    (lambda s, t, y: dkd_loss(s, t, y[:-1]), ValueError, "labels must have shape"),
    (lambda s, t, y: dkd_loss(s, t, torch.full_like(y, 9)), ValueError, "labels must lie in [0, 7)"),
    (lambda s, t, y: dkd_loss(s[:, :1], t[:, :1], torch.zeros_like(y)), ValueError, "at least 2 classes"),
    (lambda s, t, y: dkd_loss(s, t, y, temperature=0.0), ValueError, "temperature"),
    (lambda s, t, y: dkd_loss(s, t, y, alpha=-1.0), ValueError, "alpha"),
    (lambda s, t, y: dkd_loss(s, t, y, beta=-0.5), ValueError, "beta"),
    (lambda s, t, y: dkd_loss(s, t, y, reduction="avg"), ValueError, "reduction"),
    (lambda s, t, y: dkd_loss(s.long(), t, y), TypeError, "student_logits"),
    (lambda s, t, y: dkd_loss(s, t.numpy(), y), TypeError, "teacher_logits"),
])
def test_dkd_rejects_bad_input(call, exception, fragment):
    student, teacher, labels = make_inputs((4, 7), seed=10, ignore_fraction=0.0)
    with pytest.raises(exception, match=None) as info:
        call(student, teacher, labels)
    assert fragment in str(info.value)


# ---------------------------------------------------------------- logit MSE

def numpy_logit_mse(student, teacher, temperature, center):
    s = student.detach().double().numpy() / temperature
    t = teacher.detach().double().numpy() / temperature
    if center:
        s = s - s.mean(-1, keepdims=True)
        t = t - t.mean(-1, keepdims=True)
    return (s - t) ** 2


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logit_mse_matches_numpy(center, reduction):
    student, teacher, _ = make_inputs((3, 4, 9), seed=11)
    loss = logit_mse_loss(student, teacher, temperature=3.0, center=center, reduction=reduction)
    elements = numpy_logit_mse(student, teacher, 3.0, center)
    expected = {"none": elements, "sum": elements.sum(), "mean": elements.mean()}[reduction]
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12)


def test_logit_mse_temperature_rescales_by_inverse_square_and_centering_ignores_row_shifts():
    student, teacher, _ = make_inputs((6, 10), seed=12)
    plain = logit_mse_loss(student, teacher)
    torch.testing.assert_close(logit_mse_loss(student, teacher, temperature=4.0), plain / 16.0)
    shifted = student + torch.randn(6, 1, dtype=torch.float64) * 5
    torch.testing.assert_close(logit_mse_loss(shifted, teacher, center=True),
                               logit_mse_loss(student, teacher, center=True))
    assert not torch.allclose(logit_mse_loss(shifted, teacher), plain)


def test_high_temperature_kd_tends_to_half_the_centred_logit_mse():
    student, teacher, _ = make_inputs((4, 6), seed=15)
    temperature = 1000.0
    kd = temperature ** 2 * reference.kd_loss(student, teacher, temperature=temperature, t2_scale=False,
                                              reduction="none")
    mse = logit_mse_loss(student, teacher, center=True, reduction="none").mean(-1)
    torch.testing.assert_close(kd, 0.5 * mse, rtol=1e-2, atol=0.0)


def test_logit_mse_gradcheck_and_teacher_constant():
    student, teacher, _ = make_inputs((3, 5), seed=13)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: logit_mse_loss(s, teacher, temperature=2.0, center=True), (student,))
    teacher.requires_grad_(True)
    logit_mse_loss(student, teacher).backward()
    assert teacher.grad is None


def test_logit_mse_rejects_bad_input():
    student, teacher, _ = make_inputs((3, 5), seed=14)
    with pytest.raises(ValueError, match=r"\(3, 5\) and \(3, 4\)"):
        logit_mse_loss(student, teacher[:, :4])
    with pytest.raises(ValueError, match="temperature"):
        logit_mse_loss(student, teacher, temperature=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        logit_mse_loss(student, teacher, reduction="batchmean")


# ---------------------------------------------------------------- training

def make_classification_problem(seed, num_samples=256, in_features=10, num_classes=4):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, in_features, generator=generator)
    first = torch.randn(in_features, 32, generator=generator)
    second = torch.randn(32, num_classes, generator=generator)
    teacher_logits = 4.0 * torch.tanh(inputs @ first / math.sqrt(in_features)) @ second / math.sqrt(32)
    return inputs, teacher_logits, teacher_logits.argmax(-1)


@pytest.mark.parametrize("method", ["dkd", "logit_mse"])
def test_student_trained_with_logit_method_learns_the_teacher(method):
    inputs, teacher_logits, labels = make_classification_problem(seed=15)
    torch.manual_seed(16)
    student = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)

    def loss_of(logits):
        if method == "dkd":
            return dkd_loss(logits, teacher_logits, labels, temperature=2.0)
        return logit_mse_loss(logits, teacher_logits)

    with torch.no_grad():
        initial_loss = loss_of(student(inputs)).item()
        initial_accuracy = (student(inputs).argmax(-1) == labels).float().mean().item()
    for _ in range(150):
        optimizer.zero_grad()
        loss_of(student(inputs)).backward()
        optimizer.step()
    with torch.no_grad():
        final_loss = loss_of(student(inputs)).item()
        accuracy = (student(inputs).argmax(-1) == labels).float().mean().item()
    assert final_loss < 0.3 * initial_loss
    assert initial_accuracy < 0.4 and accuracy > 0.8  # chance is 0.25
