"""Row-by-row comparison of a loss against the float64 oracle, for inputs at the edges of float32.

Shared by tests/functional/test_nonfinite.py and tests/functional/test_fuzz.py. The rule, per
row of a `reduction="none"` loss and its student gradient:

- NaN exactly where the oracle is NaN, for the loss; a row whose loss is NaN has an all-NaN
  gradient (the oracle's too: `kdfast.reference.nan_rows_poison_gradient`).
- ±inf exactly where the oracle is ±inf or beyond the range of the loss's dtype (the rounding
  of the oracle to it); such a row's gradient has a NaN exactly where the oracle's row has one.
- Elsewhere "within float32 accuracy": |actual − expected| ≤ RTOL·|expected| + atol_row, with
  atol_row = K·ε·(size of the row's terms) (`row_tolerances`): ε = 2^−24, and the size of
  the terms is that of a float32 computation of the same formula, the logit spreads over T
  and log V, scaled by the weights of the divergence (τ(1−α)) and of the cross-entropy (α).
  A float32 implementation cannot be closer (its inputs to the cancelling sums carry that
  rounding); a wrong one is orders of magnitude further off.
- bfloat16 / float16 gradients additionally get that dtype's rounding, relative to the
  expected value. TVD's gradient, which jumps with sign(q − p), gets its full size where the
  logit spreads are far below T (p and q then agree beyond float32's resolution).
"""

from __future__ import annotations

import math

import torch

EPS32 = 2.0**-24
K = 256.0
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5
OUTPUT_RTOL = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
OUTPUT_ATOL = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 1e-38, torch.float16: 6e-8}


def finite_spread(values: torch.Tensor) -> torch.Tensor:
    """[N] max − min over the finite entries of each row of [N, K] (0 with fewer than two)."""
    values = values.detach().to(torch.float64)
    finite = torch.isfinite(values)
    high = torch.where(finite, values, -math.inf).amax(-1)
    low = torch.where(finite, values, math.inf).amin(-1)
    spread = high - low
    return torch.where(torch.isfinite(spread), spread, torch.zeros_like(spread)).cpu()


def row_tolerances(student_rows: torch.Tensor, teacher_spread_over_t: torch.Tensor, *, temperature: float,
                   alpha: float, t2_scale: bool, divergence: str, grad_weights: torch.Tensor, tvd_ties=None):
    """(loss atol [N], gradient atol [N]) for a row-wise loss with the contract of `kd_loss`.

    student_rows: [N, V] student logits; teacher_spread_over_t: [N] the spread of the teacher's
    log-probabilities (logits over T); grad_weights: [N] grad_output times the reduction's row
    weight; tvd_ties: None or [N] bool, rows where some p_i and q_i agree to float32's
    resolution (`tvd_ties`). The divergence's terms are of size m_kd = spread(s)/T + teacher
    spread + 2 log V, the cross-entropy's of size m_ce = spread(s) + 2 log V.
    """
    vocab = student_rows.shape[-1]
    log_v = math.log(max(vocab, 2))
    spread_s = finite_spread(student_rows)
    m_kd = 2.0 + 2.0 * log_v + spread_s / temperature + teacher_spread_over_t.to(torch.float64).cpu()
    m_ce = 2.0 + 2.0 * log_v + spread_s
    tau = temperature * temperature if t2_scale else 1.0
    loss_atol = K * EPS32 * ((1.0 - alpha) * tau * m_kd + alpha * m_ce)
    weights = grad_weights.detach().to(torch.float64).abs().cpu()
    kd_factor = weights * (1.0 - alpha) * tau / temperature
    kd_terms = m_kd if divergence in ("reverse_kl", "jsd") else torch.ones_like(m_kd)
    grad_atol = K * EPS32 * (kd_factor * kd_terms + weights * alpha)
    if divergence == "tvd":
        # TVD's gradient jumps with sign(q − p). Where the two distributions differ by less than
        # float32 resolves (logit spreads far below T), the sign of a float32 q − p is noise.
        unresolved = (spread_s / temperature + teacher_spread_over_t.to(torch.float64).cpu()) < 0.1
        if tvd_ties is not None:
            unresolved = unresolved | tvd_ties.cpu()
        grad_atol = grad_atol + kd_factor * unresolved
    return loss_atol, grad_atol


def tvd_ties(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[N] rows of two [N, K] distributions with an entry where p and q agree to float32's resolution
    (both nonzero, relative difference below 1e-4): there TVD's gradient, which jumps with
    sign(q − p), may take either side in float32."""
    p, q = p.detach().double().cpu(), q.detach().double().cpu()
    larger = torch.maximum(p, q)
    close = ((p - q).abs() <= 1e-4 * larger) & (larger > 0)
    return torch.where(torch.isnan(close), False, close).any(-1)


def sparse_tvd_ties(student_rows: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor, tail_logprob,
                    temperature: float, tail: str) -> torch.Tensor:
    """`tvd_ties` of the sparse loss's buckets: student [N, V], soft labels [N, k] / [N]."""
    q = torch.softmax(student_rows.detach().double().cpu() / temperature, -1)
    kept = q.gather(-1, indices.detach().cpu().to(torch.int32).to(torch.int64))
    teacher = logprobs.detach().double().cpu()
    if tail == "bucket":
        kept = torch.cat([kept, (1.0 - kept.sum(-1, keepdim=True)).clamp_min(0.0)], -1)
        teacher = torch.cat([teacher, tail_logprob.detach().double().cpu().reshape(-1, 1)], -1)
    else:
        kept = kept / kept.sum(-1, keepdim=True)
    return tvd_ties(torch.softmax(teacher, -1), kept)


def _overflow_threshold(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to ±inf in `dtype` (float32: FLT_MAX + half an ulp)."""
    if dtype == torch.float64:
        return math.inf
    finfo = torch.finfo(dtype)
    return float(finfo.max) * (1.0 + finfo.eps / 4.0)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float64).cpu().reshape(tensor.shape[0] if tensor.dim() else 1, -1)


def assert_loss_match(actual_loss, expected_loss, loss_atol, context: str, row_overflow: bool = False) -> None:
    """Losses (one per row, or one reduced value) against the oracle; see the module docstring.

    row_overflow: the value reduces row losses of which one is beyond the float32 range; the
    per-row losses are float32 values, so the reduced value may then be infinite as well.
    """
    actual = actual_loss.detach().to(torch.float64).cpu().reshape(-1)
    expected = expected_loss.detach().to(torch.float64).cpu().reshape(-1)
    if row_overflow and actual.numel() == 1 and bool(torch.isinf(actual).all()):
        expected = torch.where(torch.isfinite(expected), actual, expected)
    assert actual.shape == expected.shape, f"{context}: loss shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_expected = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan_expected), (
        f"{context}: NaN rows differ: actual {actual.tolist()} expected {expected.tolist()}")
    overflow = ~nan_expected & (expected.abs() >= _overflow_threshold(actual_loss.dtype))
    assert torch.equal(actual[overflow], torch.sign(expected[overflow]) * math.inf), (
        f"{context}: rows beyond the float32 range: actual {actual[overflow].tolist()} "
        f"expected {expected[overflow].tolist()}")
    finite = torch.isfinite(expected) & ~overflow
    difference = (actual[finite] - expected[finite]).abs()
    allowed = LOSS_RTOL * expected[finite].abs() + torch.as_tensor(loss_atol).reshape(-1).expand_as(expected)[finite]
    bad = difference > allowed
    assert not bool(bad.any()), (
        f"{context}: loss rows {torch.nonzero(finite).reshape(-1)[bad].tolist()} differ: actual "
        f"{actual[finite][bad].tolist()} expected {expected[finite][bad].tolist()} allowed {allowed[bad].tolist()}")


def assert_grad_match(actual_grad, expected_grad, expected_row_loss, grad_atol, context: str,
                      out_dtype=torch.float32, loss_dtype=torch.float32, roundings: int = 1) -> None:
    """Student gradients [N, ...] row by row, classified by the oracle's row losses [N] (rows whose
    loss is beyond the range of `loss_dtype` count as infinite); `roundings`: how many times the
    gradient may have been rounded to `out_dtype` (sums of separate losses' gradients)."""
    grad, expected = _rows(actual_grad), _rows(expected_grad)
    assert grad.shape == expected.shape, f"{context}: grad shape {tuple(grad.shape)} != {tuple(expected.shape)}"
    row_loss = expected_row_loss.detach().to(torch.float64).cpu().reshape(-1)
    nan_rows = torch.isnan(row_loss)
    assert bool(torch.isnan(expected[nan_rows]).all()), f"{context}: the oracle's NaN rows must have NaN gradients"
    assert bool(torch.isnan(grad[nan_rows]).all()), (
        f"{context}: rows {torch.nonzero(nan_rows).reshape(-1).tolist()} have a NaN loss but not an all-NaN gradient")
    finite = torch.isfinite(row_loss) & (row_loss.abs() < _overflow_threshold(loss_dtype))
    infinite_rows = ~nan_rows & ~finite
    assert torch.equal(torch.isnan(grad[infinite_rows]).any(-1), torch.isnan(expected[infinite_rows]).any(-1)), (
        f"{context}: rows with an infinite loss: NaN in the gradient differs from the oracle")
    g, e = grad[finite], expected[finite]
    allowed = ((GRAD_RTOL + roundings * OUTPUT_RTOL[out_dtype]) * e.abs() + roundings * OUTPUT_ATOL[out_dtype]
               + torch.as_tensor(grad_atol).reshape(-1).expand_as(row_loss)[finite].reshape(-1, 1))
    # An allowed value beyond the output dtype's range overflows there (±inf, or NaN where two
    # overflowed terms of opposite signs meet): float16 gradients of huge temperatures.
    beyond_range = (e.abs() + allowed >= torch.finfo(out_dtype).max) & ~torch.isfinite(g)
    assert bool((torch.isfinite(g) | beyond_range).all()), f"{context}: non-finite gradient in a row with a finite loss"
    difference = torch.where(beyond_range, 0.0, (g - e).abs())
    bad = difference > allowed
    if bool(bad.any()):
        worst = int((difference - allowed).argmax())
        row = int(torch.nonzero(finite).reshape(-1)[worst // max(e.shape[-1], 1)])
        raise AssertionError(f"{context}: gradient differs in row {row}: actual {float(g.reshape(-1)[worst])} "
                             f"expected {float(e.reshape(-1)[worst])} allowed {float(allowed.reshape(-1)[worst]):.3e}")


def assert_rows_match(actual_loss, expected_loss, actual_grad, expected_grad, loss_atol, grad_atol, context: str,
                      out_dtype=torch.float32) -> None:
    """Row losses [N] and (optionally) student gradients [N, ...]; see the module docstring."""
    assert_loss_match(actual_loss, expected_loss, loss_atol, context)
    if actual_grad is not None:
        assert_grad_match(actual_grad, expected_grad, expected_loss, grad_atol, context, out_dtype, actual_loss.dtype)


def with_grad(loss_function, student, device, grad_output, *args, **options):
    """(loss [N], student gradient) of loss_function(student leaf, *args) with reduction none."""
    leaf = student.detach().to(device).requires_grad_(True)
    loss = loss_function(leaf, *args, reduction="none", **options)
    loss.backward(grad_output.to(device=device, dtype=loss.dtype))
    return loss.detach().cpu(), leaf.grad.cpu()
