"""Checks of the oracle itself: `kdfast.reference.kd_loss` in float64.

The reference is compared with an independent computation written as plain Python loops
over rows and vocabulary entries (math.exp/math.log/math.fsum on floats, probabilities
formed explicitly, zero-probability terms skipped), with closed-form values of tiny
cases, with `torch.nn.functional` where it expresses the same quantity, and with its own
closed-form gradient; `gradcheck` confirms its autograd. Its conventions (dtype rules,
zero-probability terms, ignored rows, reductions) are pinned here as well.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from kdfast import reference

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "none", "batchmean")
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------
# The loop oracle.


def loop_log_softmax(values):
    finite = [value for value in values if value != NEG_INF]
    largest = max(finite)
    log_total = math.log(math.fsum(math.exp(value - largest) for value in finite))
    return [value - largest - log_total if value != NEG_INF else NEG_INF for value in values]


def loop_divergence(teacher_row, student_row, temperature, divergence, beta):
    log_p = loop_log_softmax([value / temperature for value in teacher_row])
    log_q = loop_log_softmax([value / temperature for value in student_row])
    p = [math.exp(value) for value in log_p]
    q = [math.exp(value) for value in log_q]
    if divergence == "forward_kl":
        return math.fsum(p_i * (lp_i - lq_i) for p_i, lp_i, lq_i in zip(p, log_p, log_q) if p_i > 0)
    if divergence == "reverse_kl":
        return math.fsum(q_i * (lq_i - lp_i) for q_i, lp_i, lq_i in zip(q, log_p, log_q) if q_i > 0)
    if divergence == "jsd":
        mixture = [beta * p_i + (1 - beta) * q_i for p_i, q_i in zip(p, q)]
        teacher_part = math.fsum(p_i * math.log(p_i / m_i) for p_i, m_i in zip(p, mixture) if p_i > 0)
        student_part = math.fsum(q_i * math.log(q_i / m_i) for q_i, m_i in zip(q, mixture) if q_i > 0)
        return beta * teacher_part + (1 - beta) * student_part
    if divergence == "tvd":
        return 0.5 * math.fsum(abs(p_i - q_i) for p_i, q_i in zip(p, q))
    raise AssertionError(divergence)


def loop_cross_entropy(student_row, label, label_smoothing):
    log_r = loop_log_softmax(student_row)
    value = -(1 - label_smoothing) * log_r[label]
    if label_smoothing > 0:
        value -= label_smoothing / len(student_row) * math.fsum(log_r)
    return value


def loop_kd_loss(student, teacher, labels, *, divergence="forward_kl", temperature=1.0, alpha=0.0, beta=0.5,
                 ignore_index=-100, reduction="mean", label_smoothing=0.0, t2_scale=True):
    """Row losses and their reduction, from nested Python lists; returns a float or a list."""
    tau = temperature**2 if t2_scale else 1.0
    row_losses, valid_count = [], 0
    for row_index, (student_row, teacher_row) in enumerate(zip(student, teacher)):
        label = None if labels is None else labels[row_index]
        if label == ignore_index:
            row_losses.append(0.0)
            continue
        valid_count += 1
        loss = 0.0
        if alpha < 1:
            loss += (1 - alpha) * tau * loop_divergence(teacher_row, student_row, temperature, divergence, beta)
        if alpha > 0:
            loss += alpha * loop_cross_entropy(student_row, label, label_smoothing)
        row_losses.append(loss)
    if reduction == "none":
        return row_losses
    total = math.fsum(row_losses)
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / len(row_losses)
    return total / valid_count if valid_count else 0.0


def random_case(rows, vocab_size, seed, *, scale=2.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab_size, generator=generator, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(rows, vocab_size, generator=generator, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, vocab_size, (rows,), generator=generator)
    return student, teacher, labels


def assert_matches_loop(loss, student, teacher, labels, **options):
    expected = loop_kd_loss(student.tolist(), teacher.tolist(), None if labels is None else labels.tolist(), **options)
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(loss.to(torch.float64), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Against the loop oracle.


@pytest.mark.parametrize("t2_scale", [True, False], ids=["t2", "no-t2"])
@pytest.mark.parametrize("temperature", [0.7, 2.0], ids=lambda value: f"T{value}")
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2], ids=lambda value: f"eps{value}")
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0], ids=lambda value: f"alpha{value}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_loop_oracle(divergence, reduction, alpha, label_smoothing, temperature, t2_scale):
    student, teacher, labels = random_case(5, 6, seed=zlib.crc32(f"{divergence}/{reduction}".encode()))
    labels[3] = -100
    options = dict(divergence=divergence, reduction=reduction, alpha=alpha, label_smoothing=label_smoothing,
                   temperature=temperature, t2_scale=t2_scale, beta=0.3)
    loss = reference.kd_loss(student, teacher, labels, **options)
    assert loss.dtype == torch.float64
    assert_matches_loop(loss, student, teacher, labels, **options)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_loop_oracle_with_masked_vocab(divergence):
    """−inf on both sides, and on the side whose zero probabilities keep D finite."""
    student, teacher, labels = random_case(4, 7, seed=3)
    teacher[:, [1, 5]] = NEG_INF
    student[:, [1, 5]] = NEG_INF
    if divergence != "forward_kl":
        student[:, 2] = NEG_INF  # q = 0 where p > 0: finite for reverse_kl, jsd, tvd
    else:
        teacher[:, 2] = NEG_INF  # p = 0 where q > 0: finite for forward_kl
    labels[:] = torch.tensor([0, 3, 4, 6])
    options = dict(divergence=divergence, reduction="none", alpha=0.4, temperature=1.5)
    loss = reference.kd_loss(student, teacher, labels, **options)
    assert bool(torch.isfinite(loss).all())
    assert_matches_loop(loss, student, teacher, labels, **options)


# --------------------------------------------------------------------------------------
# Closed-form values.

P_HALF = [0.0, 0.0]            # teacher logits: p = (1/2, 1/2)
Q_THREE_QUARTERS = [math.log(3.0), 0.0]  # student logits: q = (3/4, 1/4)

HAND_VALUES = {
    "forward_kl": 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25),
    "reverse_kl": 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5),
    # m = (5/8, 3/8)
    "jsd": 0.5 * (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375))
    + 0.5 * (0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)),
    "tvd": 0.25,
}


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_two_class_closed_form(divergence):
    student = torch.tensor([Q_THREE_QUARTERS], dtype=torch.float64)
    teacher = torch.tensor([P_HALF], dtype=torch.float64)
    loss = reference.kd_loss(student, teacher, divergence=divergence)
    assert math.isclose(float(loss), HAND_VALUES[divergence], rel_tol=1e-13)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_temperature_and_t2_scale_closed_form(divergence):
    """Student logits doubled at T = 2 give the same q, so the loss is T² times the T = 1 value."""
    student = torch.tensor([[2 * math.log(3.0), 0.0]], dtype=torch.float64)
    teacher = torch.tensor([P_HALF], dtype=torch.float64)
    scaled = reference.kd_loss(student, teacher, divergence=divergence, temperature=2.0)
    unscaled = reference.kd_loss(student, teacher, divergence=divergence, temperature=2.0, t2_scale=False)
    assert math.isclose(float(scaled), 4.0 * HAND_VALUES[divergence], rel_tol=1e-13)
    assert math.isclose(float(unscaled), HAND_VALUES[divergence], rel_tol=1e-13)


def test_cross_entropy_closed_form():
    student = torch.tensor([Q_THREE_QUARTERS, Q_THREE_QUARTERS], dtype=torch.float64)
    teacher = torch.randn(2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1])
    plain = reference.kd_loss(student, teacher, labels, alpha=1.0, reduction="none")
    torch.testing.assert_close(plain, torch.tensor([-math.log(0.75), -math.log(0.25)], dtype=torch.float64))
    smoothed = reference.kd_loss(student, teacher, labels, alpha=1.0, label_smoothing=0.2, reduction="none")
    smoothing_part = 0.1 * (math.log(0.75) + math.log(0.25))
    expected = torch.tensor([-0.8 * math.log(0.75) - smoothing_part, -0.8 * math.log(0.25) - smoothing_part],
                            dtype=torch.float64)
    torch.testing.assert_close(smoothed, expected)
    # CE is taken at temperature 1 whatever T is.
    at_temperature = reference.kd_loss(student, teacher, labels, alpha=1.0, temperature=3.0, reduction="none")
    torch.testing.assert_close(at_temperature, plain)


def test_alpha_mixes_the_two_terms():
    student, teacher, labels = random_case(4, 9, seed=8)
    options = dict(divergence="jsd", temperature=1.5, label_smoothing=0.1, reduction="none")
    divergence_only = reference.kd_loss(student, teacher, labels, alpha=0.0, **options)
    cross_entropy_only = reference.kd_loss(student, teacher, labels, alpha=1.0, **options)
    mixed = reference.kd_loss(student, teacher, labels, alpha=0.25, **options)
    torch.testing.assert_close(mixed, 0.25 * cross_entropy_only + 0.75 * divergence_only)


# --------------------------------------------------------------------------------------
# Against torch.nn.functional.


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_forward_kl_equals_torch_kl_div(temperature):
    student, teacher, _ = random_case(6, 11, seed=4)
    loss = reference.kd_loss(student, teacher, temperature=temperature, reduction="batchmean")
    expected = F.kl_div(
        F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
        log_target=True, reduction="batchmean",
    ) * temperature**2
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_equals_torch_cross_entropy(reduction, label_smoothing):
    student, teacher, labels = random_case(7, 13, seed=5)
    labels[[1, 4]] = -100
    loss = reference.kd_loss(student, teacher, labels, alpha=1.0, reduction=reduction, label_smoothing=label_smoothing)
    expected = F.cross_entropy(student, labels, reduction=reduction, label_smoothing=label_smoothing, ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_forward_kl_gradient_closed_form(reduction):
    """d loss / d s = w_row·g·[(1−α)·τ/T·(q − p) + α·(r − (1−ε)·onehot(y) − ε/V)]."""
    rows, vocab_size, temperature, alpha, label_smoothing = 5, 8, 2.0, 0.4, 0.1
    student, teacher, labels = random_case(rows, vocab_size, seed=6)
    labels[2] = -100
    student.requires_grad_(True)
    loss = reference.kd_loss(student, teacher, labels, temperature=temperature, alpha=alpha,
                             label_smoothing=label_smoothing, reduction=reduction)
    grad_output = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    loss.backward(grad_output)

    valid = labels != -100
    row_weight = {"mean": 1.0 / int(valid.sum()), "batchmean": 1.0 / rows, "sum": 1.0, "none": 1.0}[reduction]
    per_row_grad_output = grad_output.expand(rows)
    p = torch.softmax(teacher / temperature, -1)
    q = torch.softmax(student.detach() / temperature, -1)
    r = torch.softmax(student.detach(), -1)
    target = F.one_hot(labels.clamp(min=0), vocab_size).double() * (1 - label_smoothing) + label_smoothing / vocab_size
    per_row = (1 - alpha) * temperature**2 / temperature * (q - p) + alpha * (r - target)
    expected = per_row * (row_weight * per_row_grad_output * valid)[:, None]
    torch.testing.assert_close(student.grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(divergence, reduction):
    student, teacher, labels = random_case(4, 6, seed=7)
    labels[0] = -100
    student.requires_grad_(True)

    def loss_of_student(student_logits):
        return reference.kd_loss(student_logits, teacher, labels, divergence=divergence, reduction=reduction,
                                 temperature=1.3, alpha=0.5, beta=0.35, label_smoothing=0.1)

    assert torch.autograd.gradcheck(loss_of_student, (student,))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_with_masked_vocab(divergence):
    student, teacher, labels = random_case(3, 6, seed=9)
    student[:, 4] = NEG_INF
    teacher[:, 4] = NEG_INF
    if divergence != "forward_kl":
        student[:, 1] = NEG_INF
    labels[:] = torch.tensor([0, 2, 5])
    student.requires_grad_(True)

    def loss_of_student(student_logits):
        return reference.kd_loss(student_logits, teacher, labels, divergence=divergence, alpha=0.5, temperature=0.8)

    assert torch.autograd.gradcheck(loss_of_student, (student,))
    loss_of_student(student).backward()
    assert bool(torch.isfinite(student.grad).all())
    assert bool((student.grad[:, 4] == 0).all())


# --------------------------------------------------------------------------------------
# Conventions.


@pytest.mark.parametrize(
    "student_dtype, teacher_dtype, loss_dtype",
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16, torch.float32),
        (torch.float32, torch.float64, torch.float64),
        (torch.float16, torch.float64, torch.float64),
        (torch.float64, torch.bfloat16, torch.float64),
    ],
)
def test_dtype_rules(student_dtype, teacher_dtype, loss_dtype):
    student, teacher, labels = random_case(3, 5, seed=10)
    student = student.to(student_dtype).requires_grad_(True)
    teacher = teacher.to(teacher_dtype)
    loss = reference.kd_loss(student, teacher, labels, alpha=0.5)
    assert loss.dtype == loss_dtype
    loss.backward()
    assert student.grad.dtype == student_dtype


def test_low_precision_inputs_are_upcast_exactly():
    student, teacher, labels = random_case(4, 9, seed=11, dtype=torch.bfloat16)
    options = dict(divergence="jsd", alpha=0.3, temperature=2.0, reduction="none")
    from_bfloat16 = reference.kd_loss(student, teacher, labels, **options)
    from_float32 = reference.kd_loss(student.float(), teacher.float(), labels, **options)
    assert torch.equal(from_bfloat16, from_float32)


def test_teacher_is_a_constant():
    student, teacher, labels = random_case(3, 5, seed=12)
    teacher.requires_grad_(True)
    loss = reference.kd_loss(student, teacher, labels, divergence="reverse_kl")
    assert not loss.requires_grad


def test_alpha_one_ignores_an_infinite_divergence():
    """α = 1: D is not computed, so an infinite D (q = 0 where p > 0) cannot leak a NaN."""
    student, teacher, labels = random_case(3, 6, seed=13)
    student[:, 2] = NEG_INF
    labels[:] = 0
    student.requires_grad_(True)
    loss = reference.kd_loss(student, teacher, labels, alpha=1.0, divergence="forward_kl")
    assert math.isfinite(float(loss.detach()))
    torch.testing.assert_close(loss, F.cross_entropy(student, labels))
    loss.backward()
    assert bool(torch.isfinite(student.grad).all())


def test_alpha_zero_ignores_an_infinite_cross_entropy():
    """α = 0: CE is not computed, so −inf at the label's logit cannot leak a NaN."""
    student, teacher, labels = random_case(3, 6, seed=14)
    student[:, 2] = NEG_INF
    labels[:] = 2
    loss = reference.kd_loss(student, teacher, labels, alpha=0.0, divergence="reverse_kl")
    assert math.isfinite(float(loss))


def test_no_label_smoothing_with_masked_student_is_finite():
    """ε = 0: the smoothing term Σ log r_i (−inf here) is not added, so CE stays finite."""
    student, teacher, labels = random_case(3, 6, seed=15)
    student[:, 2] = NEG_INF
    labels[:] = 1
    finite = reference.kd_loss(student, teacher, labels, alpha=1.0, label_smoothing=0.0)
    smoothed = reference.kd_loss(student, teacher, labels, alpha=1.0, label_smoothing=0.1)
    assert math.isfinite(float(finite)) and float(smoothed) == math.inf


def test_ignored_rows_get_zero_gradient_even_when_their_loss_would_be_infinite():
    student, teacher, labels = random_case(4, 6, seed=16)
    student[1, :3] = NEG_INF  # forward_kl of row 1 would be +inf
    labels[1] = -100
    student.requires_grad_(True)
    loss = reference.kd_loss(student, teacher, labels, alpha=0.5, reduction="none")
    assert float(loss[1].detach()) == 0.0 and bool(torch.isfinite(loss).all())
    loss.sum().backward()
    assert bool((student.grad[1] == 0).all()) and bool(torch.isfinite(student.grad).all())


def test_reductions_relate_to_row_losses():
    student, teacher, labels = random_case(6, 7, seed=17)
    labels[[0, 4]] = -100
    options = dict(divergence="tvd", alpha=0.5, temperature=2.0)
    rows = reference.kd_loss(student, teacher, labels, reduction="none", **options)
    assert rows.shape == (6,) and float(rows[0]) == 0.0 and float(rows[4]) == 0.0
    torch.testing.assert_close(reference.kd_loss(student, teacher, labels, reduction="sum", **options), rows.sum())
    torch.testing.assert_close(reference.kd_loss(student, teacher, labels, reduction="mean", **options), rows.sum() / 4)
    torch.testing.assert_close(reference.kd_loss(student, teacher, labels, reduction="batchmean", **options),
                               rows.sum() / 6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(reduction):
    student, teacher, labels = random_case(3, 5, seed=18)
    labels[:] = -100
    student.requires_grad_(True)
    loss = reference.kd_loss(student, teacher, labels, alpha=0.5, reduction=reduction)
    assert bool((loss == 0).all())
    loss.sum().backward()
    assert bool((student.grad == 0).all())


def test_labels_none_equals_all_rows_valid():
    student, teacher, _ = random_case(5, 7, seed=19)
    all_valid = torch.zeros(5, dtype=torch.long)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(
            reference.kd_loss(student, teacher, None, divergence="jsd", reduction=reduction),
            reference.kd_loss(student, teacher, all_valid, divergence="jsd", reduction=reduction),
        )


def test_shapes_of_none_reduction():
    student, teacher, labels = random_case(6, 5, seed=20)
    assert reference.kd_loss(student.reshape(2, 3, 5), teacher.reshape(2, 3, 5), labels.reshape(2, 3),
                             reduction="none").shape == (2, 3)
    single = reference.kd_loss(student[0], teacher[0], labels[0], reduction="none", alpha=0.5)
    assert single.dim() == 0
    torch.testing.assert_close(single, reference.kd_loss(student[:1], teacher[:1], labels[:1], reduction="none",
                                                         alpha=0.5)[0])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_properties(divergence):
    """D ≥ 0, D(p, p) = 0, TVD ≤ 1, JSD ≤ log 2 at β = 1/2 and symmetric there."""
    student, teacher, _ = random_case(8, 10, seed=21, scale=4.0)
    values = reference.kd_loss(student, teacher, divergence=divergence, reduction="none")
    assert bool((values >= 0).all())
    same = reference.kd_loss(student, student.clone(), divergence=divergence, reduction="none")
    assert float(same.abs().max()) < 1e-14
    if divergence == "tvd":
        assert bool((values <= 1).all())
    if divergence == "jsd":
        assert bool((values <= math.log(2)).all())
        swapped = reference.kd_loss(teacher, student, divergence="jsd", reduction="none")
        torch.testing.assert_close(values, swapped, rtol=1e-12, atol=1e-14)


def test_divergence_from_log_probs_rejects_unknown_names():
    log_probs = torch.log_softmax(torch.randn(2, 3, dtype=torch.float64), -1)
    with pytest.raises(ValueError, match="divergence"):
        reference.divergence_from_log_probs(log_probs, log_probs, "hellinger")
