"""Logit-level distillation losses in plain PyTorch: logit MSE and decoupled KD (DKD).

Both take student and teacher logits of shape `[..., V]` (any leading shape; the two
dtypes may differ), compute in float32 (float64 when an input is float64), return a loss
in that compute dtype, and send gradients to the student logits only: the teacher
logits are treated as constants. Bad input raises TypeError/ValueError naming the
argument and the shapes or dtypes seen.
"""

from __future__ import annotations

import torch

from kdfast.contract.options import compute_dtype
from kdfast.contract.reductions import ROW_REDUCTIONS, reduce_rows
from kdfast.contract.validation import (
    check_labels,
    require_choice,
    require_float_tensor,
    require_non_negative,
    require_positive,
    require_same_device,
)

__all__ = ["logit_mse_loss", "dkd_loss"]


def _check_logit_pair(student_logits, teacher_logits) -> None:
    require_float_tensor("student_logits", student_logits)
    require_float_tensor("teacher_logits", teacher_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension [..., V], got a scalar")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must have the same shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    require_same_device(student_logits=student_logits, teacher_logits=teacher_logits)


def logit_mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                   temperature: float = 1.0, center: bool = False,
                   reduction: str = "mean") -> torch.Tensor:
    """Mean squared error between temperature-scaled student and teacher logits.

    Logit regression: Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014.
    Per element

        ℓ_i = (s_i / T − t_i / T)²,   with s, t first centred per row when center=True
                                      (s ← s − mean(s), t ← t − mean(t)).

    Since ℓ_i = (s_i − t_i)² / T², the temperature only rescales the loss by 1/T². Link to
    soft-target KD (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    2015): for zero-mean logits, T²·KL(p‖q) tends to ½·mean_i (s_i − t_i)² as T grows,
    i.e. half this loss with T = 1 and center=True.

    Args:
        student_logits: `[..., V]` floating tensor (fp32, bf16, fp16 or fp64).
        teacher_logits: `[..., V]`, same shape as the student's; treated as constant.
        temperature: T > 0 (default 1.0).
        center: subtract each row's mean logit from both inputs first (default False).
        reduction: as `torch.nn.functional.mse_loss`: "mean" (default) averages all
            elements, "sum" sums them, "none" returns the element losses `[..., V]`.

    Returns:
        The loss in float32 (float64 when an input is float64).
    """
    _check_logit_pair(student_logits, teacher_logits)
    temperature = require_positive("temperature", temperature)
    require_choice("reduction", reduction, ("none", "sum", "mean"))
    dtype = compute_dtype(student_logits, teacher_logits)
    student = student_logits.to(dtype)
    teacher = teacher_logits.detach().to(dtype)
    if center:
        student = student - student.mean(dim=-1, keepdim=True)
        teacher = teacher - teacher.mean(dim=-1, keepdim=True)
    squared_error = ((student - teacher) / temperature).square()
    if reduction == "none":
        return squared_error
    return squared_error.sum() if reduction == "sum" else squared_error.mean()


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Σ p (log p − log q) along `dim`, with 0·log 0 = 0 where p = 0."""
    terms = torch.where(log_p > float("-inf"), log_p.exp() * (log_p - log_q), log_p.new_zeros(()))
    return terms.sum(dim=dim)


def _binary_and_non_target_log_probs(scaled_logits: torch.Tensor, target_mask: torch.Tensor,
                                     target_index: torch.Tensor):
    """Split a softmax into (log p_t, log(1 − p_t)) and the log-softmax over non-targets.

    Computed from log-sum-exps, so neither p_t → 1 nor p_t → 0 loses precision.
    """
    minus_inf = scaled_logits.new_full((), float("-inf"))
    log_total = torch.logsumexp(scaled_logits, dim=-1)
    non_target_logits = torch.where(target_mask, minus_inf, scaled_logits)
    log_non_target_total = torch.logsumexp(non_target_logits, dim=-1)
    target_logit = scaled_logits.gather(-1, target_index.unsqueeze(-1)).squeeze(-1)
    log_binary = torch.stack([target_logit - log_total, log_non_target_total - log_total], dim=-1)
    # Log-probabilities within the non-target classes; the target slot is set to -inf.
    log_non_target = non_target_logits - log_non_target_total.unsqueeze(-1)
    return log_binary, log_non_target


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
             ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Decoupled knowledge distillation (DKD).

    Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022. The
    temperature-T KD divergence is split at the target class y into a target-class term
    (TCKD) and a non-target-class term (NCKD), which are re-weighted independently:

        p = softmax(t / T),  q = softmax(s / T)
        b^p = [p_y, 1 − p_y],  b^q = [q_y, 1 − q_y]                (binary target split)
        p̂_j = p_j / (1 − p_y),  q̂_j = q_j / (1 − q_y)  for j ≠ y   (non-target classes)
        TCKD = KL(b^p ‖ b^q),  NCKD = KL(p̂ ‖ q̂)
        ℓ = T² · (α · TCKD + β · NCKD)

    Classic KD equals TCKD + (1 − p_y)·NCKD, i.e. α = 1 with a per-row β = 1 − p_y; DKD
    uses a fixed β instead. Defaults α = 1, β = 8, T = 4 are the paper's CIFAR-100 setting.

    Args:
        student_logits: `[..., V]` floating tensor, V ≥ 2.
        teacher_logits: `[..., V]`, same shape; treated as constant.
        labels: integer tensor of the leading shape `[...]`, values in [0, V) or
            `ignore_index`.
        alpha: weight α ≥ 0 of TCKD (default 1.0).
        beta: weight β ≥ 0 of NCKD (default 8.0).
        temperature: T > 0 (default 4.0).
        ignore_index: label value whose rows contribute 0 and no gradient (default -100).
        reduction: "mean" (default; sum over valid rows / number of valid rows, 0 when
            none is valid), "sum", "batchmean" (sum / number of rows) or "none"
            (per-row losses of the leading shape, 0 on ignored rows).

    Returns:
        The loss in float32 (float64 when an input is float64).
    """
    _check_logit_pair(student_logits, teacher_logits)
    vocab_size = student_logits.shape[-1]
    if vocab_size < 2:
        raise ValueError(f"dkd_loss needs at least 2 classes, got student_logits of shape "
                         f"{tuple(student_logits.shape)}")
    check_labels(labels, student_logits.shape[:-1], vocab_size, ignore_index, student_logits.device)
    alpha = require_non_negative("alpha", alpha)
    beta = require_non_negative("beta", beta)
    temperature = require_positive("temperature", temperature)
    require_choice("reduction", reduction, ROW_REDUCTIONS)

    dtype = compute_dtype(student_logits, teacher_logits)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    classes = torch.arange(vocab_size, device=student_logits.device)
    target_mask = classes == safe_labels.unsqueeze(-1)

    student_binary, student_non_target = _binary_and_non_target_log_probs(
        student_logits.to(dtype) / temperature, target_mask, safe_labels)
    teacher_binary, teacher_non_target = _binary_and_non_target_log_probs(
        teacher_logits.detach().to(dtype) / temperature, target_mask, safe_labels)

    target_class_kd = _kl_from_log_probs(teacher_binary, student_binary)
    non_target_class_kd = _kl_from_log_probs(teacher_non_target, student_non_target)
    row_losses = (temperature ** 2) * (alpha * target_class_kd + beta * non_target_class_kd)
    row_losses = torch.where(valid, row_losses, row_losses.new_zeros(()))
    return reduce_rows(row_losses, reduction, valid)
