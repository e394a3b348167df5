"""Pure-PyTorch implementations of the kdfast losses: the test oracle and the fallback.

Everything here is written with plain tensor operations and autograd, straight from the
loss contract in docs/design.md, so that it is easy to read and check. It is the oracle the
compiled kernels are tested against (run in float64) and the path used on devices that
`kdfast._C` has no kernels for: slower, never wrong. Conventions shared with the kernels:
inputs `[..., V]` are flattened to rows; terms with zero probability contribute exactly 0
(0·log 0 = 0, also when the other distribution's log-probability is −inf), implemented by
masking the log-difference so that gradients stay finite; rows whose label equals
`ignore_index` contribute 0 and receive no gradient; a row whose loss is NaN (a NaN or +inf
logit, or a row of only −inf logits, among the inputs it reads) gets an all-NaN gradient
(`nan_rows_poison_gradient`): NaN in, NaN out, never a finite update from a NaN loss; the
teacher is a constant. The
computation runs in float64 when either input is float64 and in float32 otherwise
(bfloat16/float16 inputs are upcast exactly); the loss has that dtype and the student
gradient has the student's dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from kdfast.contract.validation import check_kd_inputs, check_label_range

__all__ = ["compute_dtype_for", "divergence_from_log_probs", "kd_loss", "kd_loss_rows", "nan_rows_poison_gradient"]


def compute_dtype_for(student_dtype: torch.dtype, teacher_dtype: torch.dtype) -> torch.dtype:
    """Returns float64 if either logits dtype is float64, else float32."""
    if student_dtype == torch.float64 or teacher_dtype == torch.float64:
        return torch.float64
    return torch.float32


class _NaNRowsGradient(torch.autograd.Function):
    """Identity on the row losses; adds NaN to the gradient of every logits row whose loss is NaN."""

    @staticmethod
    def forward(ctx, row_loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(torch.isnan(row_loss.detach()))
        ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype
        return row_loss.view_as(row_loss)

    @staticmethod
    def backward(ctx, grad_row_loss: torch.Tensor):
        (nan_rows,) = ctx.saved_tensors
        poison = torch.zeros(ctx.logits_shape, dtype=ctx.logits_dtype, device=nan_rows.device)
        poison = poison.masked_fill(nan_rows.reshape(-1, 1), math.nan)
        return grad_row_loss, poison


def nan_rows_poison_gradient(row_loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Returns `row_loss` [N] unchanged; in the backward pass every row of `logits` [N, V] whose
    loss is NaN gets an all-NaN gradient (the gradient autograd finds elsewhere is kept).

    Autograd alone can give a NaN loss a finite gradient (e.g. a NaN teacher row under
    forward_kl, whose masked terms pass no gradient); the kernels, and this oracle, make the
    gradient of such a row NaN, so that a NaN loss never yields a finite update.
    """
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return row_loss
    return _NaNRowsGradient.apply(row_loss, logits)


def _weighted_log_ratio_sum(weight: torch.Tensor, log_numerator: torch.Tensor,
                            log_denominator: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i (log a_i − log b_i) over the last dim, where terms with w_i == 0 are exactly 0.

    The log-difference itself is masked (not the product), so a −inf or NaN difference in a
    masked position never reaches the forward value or the backward pass.
    """
    present = weight > 0
    log_difference = torch.where(present, log_numerator - log_denominator, 0.0)
    return (weight * log_difference).sum(-1)


def divergence_from_log_probs(
    teacher_log_probs: torch.Tensor,
    student_log_probs: torch.Tensor,
    divergence: str,
    beta: float = 0.5,
) -> torch.Tensor:
    """Row-wise divergence D(p, q) from the log-probabilities of two distributions.

    Args:
        teacher_log_probs: log p, shape [N, K]; may hold −inf (zero probability).
        student_log_probs: log q, shape [N, K]; may hold −inf (zero probability).
        divergence: "forward_kl" (Σ p(log p − log q)), "reverse_kl" (Σ q(log q − log p)),
            "jsd" (β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q) or "tvd" (½ Σ |p − q|).
        beta: JSD mixture weight in (0, 1); ignored by the other divergences.

    Returns:
        Tensor [N] with the dtype of the inputs.
    """
    teacher_probs = teacher_log_probs.exp()
    student_probs = student_log_probs.exp()
    if divergence == "forward_kl":
        return _weighted_log_ratio_sum(teacher_probs, teacher_log_probs, student_log_probs)
    if divergence == "reverse_kl":
        return _weighted_log_ratio_sum(student_probs, student_log_probs, teacher_log_probs)
    if divergence == "jsd":
        # log m = logaddexp(log β + log p, log(1−β) + log q). Where both p and q are 0 the
        # arguments are replaced by 0: logaddexp(−inf, −inf) has a NaN gradient, and those
        # positions are masked out of both KL terms anyway.
        either_present = (teacher_probs > 0) | (student_probs > 0)
        weighted_teacher = torch.where(either_present, teacher_log_probs + math.log(beta), 0.0)
        weighted_student = torch.where(either_present, student_log_probs + math.log1p(-beta), 0.0)
        mixture_log_probs = torch.logaddexp(weighted_teacher, weighted_student)
        teacher_to_mixture = _weighted_log_ratio_sum(teacher_probs, teacher_log_probs, mixture_log_probs)
        student_to_mixture = _weighted_log_ratio_sum(student_probs, student_log_probs, mixture_log_probs)
        return beta * teacher_to_mixture + (1.0 - beta) * student_to_mixture
    if divergence == "tvd":
        return 0.5 * (teacher_probs - student_probs).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def add_cross_entropy_and_mask(row_loss, student, labels_rows, valid_rows, alpha, label_smoothing, vocab_size):
    """row_loss (or None) + α·CE with label smoothing ε on the full student row at T = 1, then
    0 on ignored rows: CE = −(1−ε)·log r_y − (ε/V)·Σ log r_i. Not added at all when α = 0."""
    if alpha != 0:
        student_log_probs_at_1 = torch.log_softmax(student, dim=-1)
        safe_labels = torch.where(valid_rows, labels_rows, 0)
        label_log_probs = student_log_probs_at_1.gather(-1, safe_labels[:, None]).squeeze(-1)
        cross_entropy = -(1.0 - label_smoothing) * label_log_probs
        if label_smoothing != 0:
            cross_entropy = cross_entropy - (label_smoothing / vocab_size) * student_log_probs_at_1.sum(-1)
        row_loss = alpha * cross_entropy if row_loss is None else row_loss + alpha * cross_entropy
    if valid_rows is not None:
        row_loss = torch.where(valid_rows, row_loss, 0.0)
    return row_loss


def kd_loss_rows(
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    labels_rows: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    t2_scale: bool = True,
    teacher_entropy: bool = False,
    divergence_weight: float = 1.0,
) -> torch.Tensor:
    """Per-row KD loss ℓ = α·CE + (1−α)·τ·D on already-flattened, already-validated rows.

    Args:
        student_rows: student logits [N, V], any floating dtype; gradients flow to it.
        teacher_rows: teacher logits [N, V]; treated as a constant.
        labels_rows: int64 [N] or None (every row valid; alpha must then be 0).
        divergence, temperature, alpha, beta, ignore_index, label_smoothing, t2_scale:
            as in `kd_loss`.
        teacher_entropy: forward_kl only: D = −Σ p·log q = KL(p‖q) + H(p) (terms with p = 0
            are 0), the soft-target cross-entropy (`KDOptions.teacher_entropy`).
        divergence_weight: a factor on τ (`KDOptions.divergence_weight`).

    Returns:
        Tensor [N] in the compute dtype (float64 if either input is float64, else float32);
        0 for rows whose label equals `ignore_index`.
    """
    compute_dtype = compute_dtype_for(student_rows.dtype, teacher_rows.dtype)
    student = student_rows.to(compute_dtype)
    teacher = teacher_rows.detach().to(compute_dtype)
    vocab_size = student.shape[-1]

    valid_rows = None if labels_rows is None else labels_rows != ignore_index
    if valid_rows is not None:
        # Ignored rows are computed on zero logits (always finite) and then zeroed, so their
        # gradient is exactly 0 whatever their logits hold.
        student = torch.where(valid_rows[:, None], student, 0.0)
        teacher = torch.where(valid_rows[:, None], teacher, 0.0)

    row_loss = None
    if alpha != 1:
        teacher_log_probs = torch.log_softmax(teacher / temperature, dim=-1)
        student_log_probs = torch.log_softmax(student / temperature, dim=-1)
        if teacher_entropy and divergence == "forward_kl":
            present = teacher_log_probs > -math.inf
            divergence_rows = -(teacher_log_probs.exp() * torch.where(present, student_log_probs, 0.0)).sum(-1)
        else:
            divergence_rows = divergence_from_log_probs(teacher_log_probs, student_log_probs, divergence, beta)
        divergence_scale = (1.0 - alpha) * (temperature * temperature if t2_scale else 1.0) * divergence_weight
        row_loss = divergence_scale * divergence_rows
    row_loss = add_cross_entropy_and_mask(row_loss, student, labels_rows, valid_rows, alpha, label_smoothing,
                                          vocab_size)
    return nan_rows_poison_gradient(row_loss, student_rows)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    t2_scale: bool = True,
    teacher_entropy: bool = False,
    divergence_weight: float = 1.0,
) -> torch.Tensor:
    """Knowledge-distillation loss, written in plain PyTorch (oracle and fallback).

    Per row with student logits s, teacher logits t, label y and temperature T:
    p = softmax(t/T), q = softmax(s/T), r = softmax(s);
    CE = −(1−ε)·log r_y − (ε/V)·Σ_i log r_i; ℓ = α·CE + (1−α)·τ·D(p, q) with τ = T² if
    `t2_scale` else 1. When α == 0 the CE term is not computed, when α == 1 the D term is not.

    Args:
        student_logits: [..., V] float32, bfloat16, float16 or float64. Gradients flow here.
        teacher_logits: [..., V] (same shape; dtype may differ). Treated as a constant.
        labels: int64 [...] (the leading shape of the logits) or None. Rows whose label
            equals `ignore_index` contribute 0 and get no gradient; with None every row is
            valid and `alpha` must be 0.
        divergence: "forward_kl" (default) Σ p(log p − log q); "reverse_kl" Σ q(log q − log p);
            "jsd" β·KL(p‖m) + (1−β)·KL(q‖m) with m = βp + (1−β)q; "tvd" ½ Σ |p − q|.
        temperature: T in [1e-20, 1e20] (default 1.0), applied to the divergence only.
        alpha: weight of the hard-label cross-entropy, in [0, 1] (default 0.0).
        beta: JSD mixture weight in (0, 1) (default 0.5); used by "jsd" only.
        ignore_index: label value of rows to skip (default -100).
        reduction: "mean" (default): sum over valid rows / number of valid rows, and 0 (with
            zero gradient) when no row is valid; "sum": sum over rows; "batchmean": sum /
            number of rows, ignored rows included; "none": per-row losses with the leading
            shape of the logits (a 0-dim tensor for a 1-D [V] input).
        label_smoothing: ε in [0, 1) for the cross-entropy (default 0.0).
        t2_scale: multiply the divergence by T² (default True).
        teacher_entropy, divergence_weight: as in `kd_loss_rows` (`KDOptions`' dense-only
            options; defaults False and 1).

    Returns:
        A 0-dim tensor, or [...] for reduction="none". Its dtype is float64 if either logits
        tensor is float64, else float32.

    Raises:
        TypeError: wrong logits or label dtype.
        ValueError: mismatched shapes or devices, labels out of range, or an invalid option.
    """
    check_kd_inputs(
        student_logits,
        teacher_logits,
        labels,
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    vocab_size = student_logits.shape[-1]
    check_label_range(labels, vocab_size, ignore_index)

    leading_shape = student_logits.shape[:-1]
    labels_rows = None if labels is None else labels.reshape(-1)
    row_loss = kd_loss_rows(
        student_logits.reshape(-1, vocab_size),
        teacher_logits.reshape(-1, vocab_size),
        labels_rows,
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        t2_scale=t2_scale,
        teacher_entropy=teacher_entropy,
        divergence_weight=divergence_weight,
    )

    if reduction == "none":
        return row_loss.reshape(leading_shape)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    row_count = row_loss.shape[0]
    if reduction == "batchmean":
        return total / max(row_count, 1)
    # "mean": divide by the number of valid rows; with none valid the sum is already 0.
    if labels_rows is None:
        return total / max(row_count, 1)
    valid_count = (labels_rows != ignore_index).sum().clamp(min=1).to(total.dtype)
    return total / valid_count
