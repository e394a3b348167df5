"""NaN, ±inf and masked (−inf) rows in every loss: NaN in, NaN out, the other rows unharmed.

Each case puts one pattern into one row of the student or of a teacher — a NaN row, one
NaN, a row of −inf (fully masked), one −inf (a masked entry), all but one entry −inf, one
+inf — and NaN into an ignored row, then compares every row's loss and gradient with the
float64 oracle (`kdfast.reference`) under the rule of tests/fp32_rows.py: NaN exactly where
the oracle is NaN (loss, and then the whole gradient row), ±inf where it is ±inf, float32
accuracy elsewhere; the ignored row has loss 0 and gradient 0. Ops: `kd_loss` (every
divergence, with and without the cross-entropy and label smoothing), `sparse_kd_loss` (both
tails; NaN and −inf in the soft labels too), `compress_topk`, `multi_teacher_kd_loss` (dense
teachers and SoftLabels teachers, both combine modes) and `fused_linear_kd_loss`. The `cuda`
cases run where a GPU is visible.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdfast
from fp32_rows import assert_rows_match, finite_spread, row_tolerances, with_grad
from kd_checks import stable_seed
from kdfast import functional, reference
from kdfast.softlabels import SoftLabels

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
LOSS_TERMS = [(0.0, 0.0), (0.5, 0.1), (1.0, 0.2)]
PATTERNS = ("nan_row", "nan_one", "ninf_row", "ninf_one", "ninf_all_but_one", "pinf_one")
TEMPERATURE = 2.0
ROWS, VOCAB, AFFECTED, IGNORED = 5, 37, 1, 3


def apply_pattern(rows: torch.Tensor, row: int, pattern: str) -> None:
    """Writes `pattern` into rows[row] (in place)."""
    if pattern == "nan_row":
        rows[row] = math.nan
    elif pattern == "nan_one":
        rows[row, 3] = math.nan
    elif pattern == "ninf_row":
        rows[row] = -math.inf
    elif pattern == "ninf_one":
        rows[row, 3] = -math.inf
    elif pattern == "ninf_all_but_one":
        rows[row, 1:] = -math.inf
    elif pattern == "pinf_one":
        rows[row, 3] = math.inf
    else:
        raise AssertionError(pattern)


def make_rows(seed: int, teachers: int = 1):
    """float64 student [ROWS, VOCAB], teachers [teachers, ROWS, VOCAB], labels (row IGNORED ignored)."""
    generator = torch.Generator().manual_seed(seed)
    student = 3.0 * torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64)
    teacher = 3.0 * torch.randn(teachers, ROWS, VOCAB, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    labels[AFFECTED] = 3  # the label sits on the patterned entry
    labels[IGNORED] = -100
    student[IGNORED, 5] = math.nan
    teacher[:, IGNORED, 6] = math.nan
    grad_output = torch.rand(ROWS, generator=generator, dtype=torch.float64) + 0.5
    return student, teacher, labels, grad_output


def assert_ignored_row_untouched(loss, grad, context):
    assert float(loss[IGNORED]) == 0.0, f"{context}: ignored row loss {float(loss[IGNORED])}"
    assert bool((grad[IGNORED] == 0).all()), f"{context}: ignored row gradient is not zero"


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("target", ["student", "teacher"])
@pytest.mark.parametrize("alpha,label_smoothing", LOSS_TERMS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_rows(device, divergence, alpha, label_smoothing, target, pattern):
    context = f"kd_loss/{divergence}/alpha={alpha}/eps={label_smoothing}/{target}/{pattern}"
    student, teachers, labels, grad_output = make_rows(seed=stable_seed(context))
    teacher = teachers[0]
    apply_pattern(student if target == "student" else teacher, AFFECTED, pattern)
    options = dict(divergence=divergence, temperature=TEMPERATURE, alpha=alpha, label_smoothing=label_smoothing)
    loss, grad = with_grad(functional.kd_loss, student.float(), device, grad_output, teacher.float().to(device),
                           labels.to(device), **options)
    expected, expected_grad = with_grad(reference.kd_loss, student.float().double(), "cpu", grad_output,
                                        teacher.float().double(), labels, **options)
    loss_atol, grad_atol = row_tolerances(student, finite_spread(teacher) / TEMPERATURE, temperature=TEMPERATURE,
                                          alpha=alpha, t2_scale=True, divergence=divergence, grad_weights=grad_output)
    assert_rows_match(loss, expected, grad, expected_grad, loss_atol, grad_atol, context)
    assert_ignored_row_untouched(loss, grad, context)
    poisoned = target == "student" or alpha < 1.0
    if pattern in ("nan_row", "nan_one", "ninf_row", "pinf_one") and poisoned:
        assert math.isnan(float(loss[AFFECTED])), f"{context}: expected a NaN row loss, got {float(loss[AFFECTED])}"


SOFT_PATTERNS = PATTERNS + ("logprob_nan", "tail_nan", "all_masked")
SPARSE_CASES = [("student", p) for p in PATTERNS] + [("teacher", p) for p in SOFT_PATTERNS]


def soft_labels_of(teacher: torch.Tensor, k: int, pattern: str) -> SoftLabels:
    """Top-k soft labels of teacher [ROWS, VOCAB] (float64 oracle), with a soft-label `pattern`."""
    labels = reference.compress_topk(teacher, k, temperature=TEMPERATURE)
    logprobs, tail = labels.logprobs.clone(), labels.tail_logprob.clone()
    if pattern == "logprob_nan":
        logprobs[AFFECTED, 1] = math.nan
    elif pattern == "tail_nan":
        tail[AFFECTED] = math.nan
    elif pattern == "all_masked":
        logprobs[AFFECTED] = -math.inf
        tail[AFFECTED] = -math.inf
    return SoftLabels(indices=labels.indices, logprobs=logprobs, tail_logprob=tail, temperature=TEMPERATURE,
                      vocab_size=VOCAB)


@pytest.mark.parametrize("target,pattern", SPARSE_CASES)
@pytest.mark.parametrize("alpha,label_smoothing", LOSS_TERMS[:2])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_kd_loss_rows(device, divergence, tail, alpha, label_smoothing, target, pattern):
    context = f"sparse/{divergence}/{tail}/alpha={alpha}/{target}/{pattern}"
    student, teachers, labels, grad_output = make_rows(seed=stable_seed(context))
    teacher = teachers[0]
    if pattern in PATTERNS:
        apply_pattern(student if target == "student" else teacher, AFFECTED, pattern)
    soft = soft_labels_of(teacher, 6, pattern if target == "teacher" else "")
    options = dict(divergence=divergence, alpha=alpha, label_smoothing=label_smoothing, tail=tail)
    device_soft = SoftLabels(indices=soft.indices.to(device), logprobs=soft.logprobs.float().to(device),
                             tail_logprob=soft.tail_logprob.float().to(device), temperature=TEMPERATURE,
                             vocab_size=VOCAB)
    loss, grad = with_grad(functional.sparse_kd_loss, student.float(), device, grad_output, device_soft,
                           labels.to(device), **options)
    oracle_soft = SoftLabels(indices=soft.indices, logprobs=soft.logprobs.float().double(),
                             tail_logprob=soft.tail_logprob.float().double(), temperature=TEMPERATURE,
                             vocab_size=VOCAB)
    expected, expected_grad = with_grad(reference.sparse_kd_loss, student.float().double(), "cpu", grad_output,
                                        oracle_soft, labels, **options)
    teacher_spread = finite_spread(torch.cat([soft.logprobs, soft.tail_logprob[:, None]], -1))
    loss_atol, grad_atol = row_tolerances(student, teacher_spread, temperature=TEMPERATURE, alpha=alpha,
                                          t2_scale=True, divergence=divergence, grad_weights=grad_output)
    assert_rows_match(loss, expected, grad, expected_grad, loss_atol, grad_atol, context)
    assert_ignored_row_untouched(loss, grad, context)
    if pattern in ("nan_row", "logprob_nan", "all_masked") and alpha < 1.0:
        assert math.isnan(float(loss[AFFECTED])), f"{context}: expected a NaN row loss"


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k", [1, 6, VOCAB])
def test_compress_topk_rows(device, k, pattern):
    context = f"compress/k={k}/{pattern}"
    _, teachers, _, _ = make_rows(seed=stable_seed(context))
    teacher = teachers[0].float()
    apply_pattern(teacher, AFFECTED, pattern)
    result = kdfast.compress_topk(teacher.to(device), k, temperature=TEMPERATURE)
    expected = reference.compress_topk(teacher.double(), k, temperature=TEMPERATURE)
    values = torch.cat([result.logprobs.cpu().double(), result.tail_logprob.cpu().double()[:, None]], -1)
    expected_values = torch.cat([expected.logprobs, expected.tail_logprob[:, None]], -1)
    nan_rows = torch.isnan(expected_values).any(-1)
    assert torch.equal(torch.isnan(values).any(-1), nan_rows), f"{context}: NaN rows differ"
    assert bool(torch.isnan(values[nan_rows]).all()), f"{context}: a NaN row must be all NaN"
    good = ~nan_rows
    assert torch.equal(result.indices.cpu().long()[good], expected.indices.long()[good]), f"{context}: indices differ"
    atol = 64 * 2.0**-24 * (math.log(VOCAB) + finite_spread(teacher.double())[good, None] / TEMPERATURE)
    assert torch.equal(torch.isinf(values[good]), torch.isinf(expected_values[good])), f"{context}: -inf differ"
    finite = torch.isfinite(expected_values[good])
    difference = (values[good] - expected_values[good]).abs()
    allowed = 1e-6 * expected_values[good].abs() + atol.expand_as(difference)
    assert bool((difference[finite] <= allowed[finite]).all()), (
        f"{context}: log-probabilities differ by {float(difference[finite].max()):.3e}")
    if pattern in ("nan_row", "nan_one", "ninf_row", "pinf_one"):
        assert bool(nan_rows[AFFECTED]), f"{context}: the patterned row must be NaN"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_compress_topk_signed_zeros_tie(device, dtype):
    """−0.0 and +0.0 are equal logits: the lower index comes first, as between any equal logits."""
    teacher = torch.tensor([[-1.0, -0.0, 0.0, -0.0, -2.0, 0.0], [0.0, -0.0, -3.0, -0.0, 0.0, -5.0]], dtype=dtype)
    result = kdfast.compress_topk(teacher.to(device), 4, temperature=TEMPERATURE)
    expected = reference.compress_topk(teacher.double(), 4, temperature=TEMPERATURE)
    assert result.indices.cpu().tolist() == [[1, 2, 3, 5], [0, 1, 3, 4]] == expected.indices.tolist()


def teacher_spread_over_t(teachers: torch.Tensor) -> torch.Tensor:
    return torch.stack([finite_spread(t) for t in teachers]).amax(0) / TEMPERATURE


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("target", ["student", "teacher"])
@pytest.mark.parametrize("combine", ["sum", "mixture"])
@pytest.mark.parametrize("alpha,label_smoothing", LOSS_TERMS[:2])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_multi_teacher_rows(device, divergence, alpha, label_smoothing, combine, target, pattern):
    context = f"multi/{divergence}/{combine}/alpha={alpha}/{target}/{pattern}"
    student, teachers, labels, grad_output = make_rows(seed=stable_seed(context), teachers=3)
    apply_pattern(student if target == "student" else teachers[1], AFFECTED, pattern)
    weights = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    options = dict(divergence=divergence, temperature=TEMPERATURE, alpha=alpha, label_smoothing=label_smoothing,
                   combine=combine, weights=weights)
    loss, grad = with_grad(functional.multi_teacher_kd_loss, student.float(), device, grad_output,
                           [t.float().to(device) for t in teachers], labels.to(device),
                           **dict(options, weights=weights.to(device)))
    expected, expected_grad = with_grad(reference.multi_teacher_kd_loss, student.float().double(), "cpu",
                                        grad_output, [t.float().double() for t in teachers], labels, **options)
    loss_atol, grad_atol = row_tolerances(student, teacher_spread_over_t(teachers), temperature=TEMPERATURE,
                                          alpha=alpha, t2_scale=True, divergence=divergence, grad_weights=grad_output)
    assert_rows_match(loss, expected, grad, expected_grad, loss_atol, grad_atol, context)
    assert_ignored_row_untouched(loss, grad, context)


def shared_soft_labels(teachers: torch.Tensor, k: int):
    """SoftLabels of every teacher at teacher 0's top-k indices (float64; exact tails)."""
    indices = reference.compress_topk(teachers[0], k, temperature=TEMPERATURE).indices.long()
    result = []
    for teacher in teachers:
        log_probs = torch.log_softmax(teacher / TEMPERATURE, dim=-1)
        outside = log_probs.scatter(-1, indices, -math.inf)
        result.append(SoftLabels(indices=indices, logprobs=log_probs.gather(-1, indices),
                                 tail_logprob=outside.logsumexp(-1), temperature=TEMPERATURE, vocab_size=VOCAB))
    return result


def soft_multi_oracle(student, soft, labels, weights, combine, **options):
    """The float64 oracle of multi_teacher_kd_loss with SoftLabels teachers (reduction none)."""
    if combine == "sum":
        total = None
        for teacher, weight in zip(soft, weights):
            term = weight * reference.sparse_kd_loss(student, teacher, labels, reduction="none", **options)
            total = term if total is None else total + term
        return total
    log_w = weights.log()
    mixed = SoftLabels(indices=soft[0].indices,
                       logprobs=torch.stack([t.logprobs + lw for t, lw in zip(soft, log_w)]).logsumexp(0),
                       tail_logprob=torch.stack([t.tail_logprob + lw for t, lw in zip(soft, log_w)]).logsumexp(0),
                       temperature=TEMPERATURE, vocab_size=VOCAB)
    return reference.sparse_kd_loss(student, mixed, labels, reduction="none", **options)


@pytest.mark.parametrize("pattern", ["nan_row", "ninf_row", "logprob_nan", "all_masked", "student_nan_one"])
@pytest.mark.parametrize("combine", ["sum", "mixture"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_multi_teacher_soft_labels_rows(device, divergence, tail, combine, pattern):
    context = f"multi-soft/{divergence}/{tail}/{combine}/{pattern}"
    student, teachers, labels, grad_output = make_rows(seed=stable_seed(context), teachers=2)
    if pattern == "student_nan_one":
        apply_pattern(student, AFFECTED, "nan_one")
    elif pattern in PATTERNS:
        apply_pattern(teachers[1], AFFECTED, pattern)
    soft = shared_soft_labels(teachers, 6)
    if pattern == "logprob_nan":
        soft[1].logprobs[AFFECTED, 2] = math.nan
    elif pattern == "all_masked":
        soft[1].logprobs[AFFECTED] = -math.inf
        soft[1].tail_logprob[AFFECTED] = -math.inf
    weights = torch.tensor([0.75, 0.25], dtype=torch.float64)
    options = dict(divergence=divergence, tail=tail, alpha=0.5, label_smoothing=0.1)

    def stored(labels_64: SoftLabels) -> SoftLabels:
        return SoftLabels(indices=labels_64.indices.to(device), logprobs=labels_64.logprobs.float().to(device),
                          tail_logprob=labels_64.tail_logprob.float().to(device), temperature=TEMPERATURE,
                          vocab_size=VOCAB)

    loss, grad = with_grad(functional.multi_teacher_kd_loss, student.float(), device, grad_output,
                           [stored(t) for t in soft], labels.to(device), combine=combine, weights=weights.to(device),
                           temperature=TEMPERATURE, **options)
    rounded = [SoftLabels(indices=t.indices, logprobs=t.logprobs.float().double(),
                          tail_logprob=t.tail_logprob.float().double(), temperature=TEMPERATURE, vocab_size=VOCAB)
               for t in soft]
    leaf = student.float().double().requires_grad_(True)
    expected = soft_multi_oracle(leaf, rounded, labels, weights, combine, **options)
    expected.backward(grad_output)
    spread = torch.stack([finite_spread(torch.cat([t.logprobs, t.tail_logprob[:, None]], -1)) for t in soft]).amax(0)
    loss_atol, grad_atol = row_tolerances(student, spread, temperature=TEMPERATURE, alpha=0.5, t2_scale=True,
                                          divergence=divergence, grad_weights=grad_output)
    assert_rows_match(loss, expected.detach(), grad, leaf.grad, loss_atol, grad_atol, context)
    assert_ignored_row_untouched(loss, grad, context)


@pytest.mark.parametrize("pattern", ["hidden_nan", "teacher_nan_row", "teacher_ninf_row", "teacher_ninf_one"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_fused_linear_rows(device, divergence, pattern):
    context = f"fused/{divergence}/{pattern}"
    generator = torch.Generator().manual_seed(stable_seed(context))
    hidden = torch.randn(ROWS, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(VOCAB, 16, generator=generator, dtype=torch.float64) / 2
    _, teachers, labels, grad_output = make_rows(seed=stable_seed(context))
    teacher = teachers[0]
    if pattern == "hidden_nan":
        hidden[AFFECTED, 2] = math.nan
    else:
        apply_pattern(teacher, AFFECTED, pattern.removeprefix("teacher_"))
    options = dict(divergence=divergence, temperature=TEMPERATURE, alpha=0.5, label_smoothing=0.1)

    def run(loss_function, dtype, target_device):
        h = hidden.to(dtype).to(target_device).requires_grad_(True)
        w = weight.to(dtype).to(target_device).requires_grad_(True)
        loss = loss_function(h, w, teacher.float().to(dtype).to(target_device), labels.to(target_device))
        loss.backward(grad_output.to(device=target_device, dtype=loss.dtype))
        return loss.detach().cpu(), h.grad.cpu(), w.grad.cpu()

    loss, grad_hidden, grad_weight = run(
        lambda h, w, t, y: functional.fused_linear_kd_loss(h, w, t, y, reduction="none", chunk_size=2, **options),
        torch.float32, device)
    expected, expected_hidden, expected_weight = run(
        lambda h, w, t, y: reference.kd_loss(h @ w.T, t, y, reduction="none", **options), torch.float64, "cpu")
    logits = hidden.float().double() @ weight.float().double().T
    scale = (1.0 + hidden.float().double().nan_to_num().abs().amax(-1)) * (1.0 + weight.abs().max())
    loss_atol, grad_atol = row_tolerances(logits, finite_spread(teacher) / TEMPERATURE, temperature=TEMPERATURE,
                                          alpha=0.5, t2_scale=True, divergence=divergence, grad_weights=grad_output)
    assert_rows_match(loss, expected, grad_hidden, expected_hidden, loss_atol * scale, grad_atol * scale, context)
    assert float(loss[IGNORED]) == 0.0 and bool((grad_hidden[IGNORED] == 0).all())
    assert bool(torch.isnan(grad_weight).any()) == bool(torch.isnan(expected_weight).any()), (
        f"{context}: NaN in grad_weight differs from the oracle")
