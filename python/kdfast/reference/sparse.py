"""Top-k soft labels in plain PyTorch: compression and the sparse KD loss (oracle and fallback).

`compress_topk` and `sparse_kd_loss` follow the contracts of `kdfast.compress_topk` and
`kdfast.functional.sparse_kd_loss` with a stable sort and float64 arithmetic. The student's
tail bucket is the log-sum-exp over the non-kept logits, never 1 − Σ q, and every divergence
term comes from `kdfast.reference.dense.divergence_from_log_probs`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from kdfast.contract.options import TAIL_MODES
from kdfast.contract.softlabels import SoftLabels
from kdfast.contract.validation import check_compress_inputs, check_label_range, check_sparse_kd_inputs
from kdfast.reference.dense import (
    add_cross_entropy_and_mask,
    compute_dtype_for,
    divergence_from_log_probs,
    nan_rows_poison_gradient,
)

__all__ = ["compress_topk", "sparse_kd_loss", "sparse_kd_loss_rows"]


def compress_topk(
    teacher_logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    index_dtype: torch.dtype = torch.int32,
):
    """Top-k soft labels in plain PyTorch; see `kdfast.compress_topk` for the contract.

    Selection is a stable descending sort of the raw logits, so equal logits keep the lower
    vocabulary index first (−inf entries come last, also in index order). Everything is
    computed in float64 and rounded to the output dtype at the end. The tail is the
    log-sum-exp over the entries that were not kept, never log(1 − Σ kept). A row with a NaN
    or +inf logit, or of only −inf, has no distribution: its log-probabilities and tail are NaN.

    Returns:
        SoftLabels: indices [..., k] (index_dtype), logprobs [..., k] and tail_logprob [...]
        in float64 for float64 input, else float32.
    """
    check_compress_inputs(teacher_logits, k, temperature, index_dtype)
    vocab_size = teacher_logits.shape[-1]
    out_dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    logits = teacher_logits.detach().to(torch.float64)
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    kept, rest = order[..., :k], order[..., k:]
    scaled = logits / temperature
    log_normaliser = torch.logsumexp(scaled, dim=-1, keepdim=True)
    logprobs = scaled.gather(-1, kept) - log_normaliser
    if k < vocab_size:
        tail = torch.logsumexp(scaled.gather(-1, rest), dim=-1) - log_normaliser.squeeze(-1)
    else:
        tail = torch.full(logits.shape[:-1], -math.inf, dtype=torch.float64, device=logits.device)
    undefined = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)
    logprobs = logprobs.masked_fill(undefined[..., None], math.nan)
    tail = tail.masked_fill(undefined, math.nan)
    indices = kept.to(torch.int32) if index_dtype == torch.uint16 else kept
    return SoftLabels(
        indices=indices.to(index_dtype),
        logprobs=logprobs.to(out_dtype),
        tail_logprob=tail.to(out_dtype),
        temperature=float(temperature),
        vocab_size=vocab_size,
    )


def _safe_masked_logsumexp(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log Σ_{keep} exp(values) over the last dim; −inf (with zero, not NaN, gradient) when empty."""
    masked = values.masked_fill(~keep, -math.inf)
    row_max = masked.amax(-1, keepdim=True).detach()
    empty = row_max == -math.inf
    shift = torch.where(empty, 0.0, row_max)
    total = torch.exp(masked - shift).sum(-1, keepdim=True)
    safe_total = torch.where(empty, 1.0, total)
    return torch.where(empty, -math.inf, shift + torch.log(safe_total)).squeeze(-1)


def sparse_kd_loss_rows(
    student_rows: torch.Tensor,
    indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_tail_logprob: torch.Tensor,
    labels_rows: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    tail: str = "bucket",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    t2_scale: bool = True,
) -> torch.Tensor:
    """Per-row sparse KD loss on flattened, validated rows; see `sparse_kd_loss`.

    Args:
        student_rows: [N, V] floating student logits; gradients flow to it.
        indices: [N, k] integer kept-token ids (any integer dtype).
        teacher_logprobs: [N, k] teacher log-probabilities at `indices`.
        teacher_tail_logprob: [N] teacher log-mass outside the kept tokens.
        labels_rows: int64 [N] or None.

    Returns:
        [N] row losses in float64 if the student or the teacher log-probabilities are
        float64, else float32; 0 for ignored rows.
    """
    compute_dtype = compute_dtype_for(student_rows.dtype, teacher_logprobs.dtype)
    student = student_rows.to(compute_dtype)
    kept_indices = indices.to(torch.int32).to(torch.int64) if indices.dtype == torch.uint16 else indices.to(torch.int64)
    teacher_kept = teacher_logprobs.detach().to(compute_dtype)
    teacher_tail = teacher_tail_logprob.detach().to(compute_dtype)
    vocab_size = student.shape[-1]
    k = kept_indices.shape[-1]

    valid_rows = None if labels_rows is None else labels_rows != ignore_index
    if valid_rows is not None:
        student = torch.where(valid_rows[:, None], student, 0.0)
        teacher_kept = torch.where(valid_rows[:, None], teacher_kept, 0.0)
        teacher_tail = torch.where(valid_rows, teacher_tail, 0.0)

    row_loss = None
    if alpha != 1:
        # Log-probabilities come from log_softmax (it subtracts the maximum first), never as a
        # value minus an absolute log-sum-exp: with logits near ±3e38 the latter cancels away
        # everything below one spacing of the log-sum-exp (log 2 between two tied logits).
        scaled = student / temperature
        if tail == "bucket":
            teacher_buckets = torch.cat([teacher_kept, teacher_tail[:, None]], -1)
            row_log_probs = torch.log_softmax(scaled, dim=-1)
            kept_log_probs = row_log_probs.gather(-1, kept_indices)
            if k < vocab_size:
                not_kept = torch.ones_like(scaled, dtype=torch.bool).scatter(-1, kept_indices, False)
                student_tail = _safe_masked_logsumexp(row_log_probs, not_kept)
            else:
                student_tail = torch.full_like(kept_log_probs[:, 0], -math.inf)
            student_buckets = torch.cat([kept_log_probs, student_tail[:, None]], -1)
            if k == vocab_size:  # no tail entries: drop the (empty) bucket on both sides
                teacher_buckets, student_buckets = teacher_buckets[:, :k], student_buckets[:, :k]
        elif tail == "renormalize":
            teacher_buckets, student_buckets = teacher_kept, scaled.gather(-1, kept_indices)
        else:
            raise ValueError(f"unknown tail mode {tail!r}; expected one of {TAIL_MODES}")
        teacher_log_probs = torch.log_softmax(teacher_buckets, dim=-1)
        student_log_probs = torch.log_softmax(student_buckets, dim=-1)
        divergence_rows = divergence_from_log_probs(teacher_log_probs, student_log_probs, divergence, beta)
        row_loss = (1.0 - alpha) * (temperature * temperature if t2_scale else 1.0) * divergence_rows
    row_loss = add_cross_entropy_and_mask(row_loss, student, labels_rows, valid_rows, alpha, label_smoothing,
                                          vocab_size)
    return nan_rows_poison_gradient(row_loss, student_rows)


def sparse_kd_loss(
    student_logits: torch.Tensor,
    soft_labels,
    labels: Optional[torch.Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: Optional[float] = None,
    alpha: float = 0.0,
    beta: float = 0.5,
    tail: str = "bucket",
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    t2_scale: bool = True,
) -> torch.Tensor:
    """Sparse KD loss against top-k soft labels, in plain PyTorch (oracle and fallback).

    Same contract, arguments and errors as `kdfast.functional.sparse_kd_loss`. The
    student's tail bucket is the log-sum-exp over the non-kept logits (never 1 − Σ q).
    """
    temperature = check_sparse_kd_inputs(
        student_logits, soft_labels, labels, divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
        tail=tail, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )
    vocab_size = student_logits.shape[-1]
    check_label_range(labels, vocab_size, ignore_index)
    flat = soft_labels.flatten()
    indices = (flat.indices.to(torch.int32).to(torch.int64) if flat.indices.dtype == torch.uint16
               else flat.indices.to(torch.int64))
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab_size):
        raise ValueError(f"sparse_kd_loss: soft_labels.indices must lie in [0, {vocab_size})")
    leading_shape = student_logits.shape[:-1]
    labels_rows = None if labels is None else labels.reshape(-1)
    row_loss = sparse_kd_loss_rows(
        student_logits.reshape(-1, vocab_size), indices, flat.logprobs, flat.tail_logprob, labels_rows,
        divergence=divergence, temperature=temperature, alpha=alpha, beta=beta, tail=tail,
        ignore_index=ignore_index, label_smoothing=label_smoothing, t2_scale=t2_scale,
    )
    if reduction == "none":
        return row_loss.reshape(leading_shape)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    row_count = row_loss.shape[0]
    if reduction == "batchmean" or labels_rows is None:
        return total / max(row_count, 1)
    valid_count = (labels_rows != ignore_index).sum().clamp(min=1).to(total.dtype)
    return total / valid_count
