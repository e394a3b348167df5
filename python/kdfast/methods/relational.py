"""Relational knowledge distillation (RKD) in plain PyTorch: distance-wise and angle-wise.

Inputs are batch-first embeddings `[N, ...]` of student and teacher (flattened to
`[N, D_s]` and `[N, D_t]`; the widths may differ because only relations between the N
samples are compared). The math runs in float32 (float64 when an input is float64), losses
are 0-dim tensors in that dtype, gradients flow to the student only; a bfloat16/float16
student's gradient is computed in float32 and rounded once (`relational_kd_loss` converts the
student once, so its distance and angle parts add up before the rounding). Bad input raises
TypeError/ValueError naming the argument and the shapes seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdfast.contract.options import compute_dtype
from kdfast.contract.validation import (
    require_float_tensor,
    require_non_negative,
    require_same_device,
)

__all__ = ["rkd_distance_loss", "rkd_angle_loss", "relational_kd_loss"]

_SQUARED_DISTANCE_EPS = 1e-12


def _check_embedding_pair(student_embeddings, teacher_embeddings, minimum_batch: int) -> None:
    require_float_tensor("student_embeddings", student_embeddings)
    require_float_tensor("teacher_embeddings", teacher_embeddings)
    require_same_device(student_embeddings=student_embeddings, teacher_embeddings=teacher_embeddings)
    shapes = f"got shapes {tuple(student_embeddings.shape)} and {tuple(teacher_embeddings.shape)}"
    if student_embeddings.dim() < 2 or teacher_embeddings.dim() < 2:
        raise ValueError(f"student_embeddings and teacher_embeddings must be batch-first [N, ...] "
                         f"with at least 2 dimensions, {shapes}")
    if student_embeddings.shape[0] != teacher_embeddings.shape[0]:
        raise ValueError(f"student_embeddings and teacher_embeddings must have the same batch size N, {shapes}")
    if student_embeddings.shape[0] < minimum_batch:
        raise ValueError(f"this relational loss needs a batch of at least {minimum_batch} samples, {shapes}")


def _centred_gram_and_distances(embeddings: torch.Tensor):
    """Gram matrix of the centred rows and the pairwise Euclidean distances `[N, N]`.

    Centring changes neither distances nor angles and keeps the Gram-based formulas well
    conditioned; squared distances are clamped at a tiny ε so the square root has a finite
    gradient when two embeddings coincide (the diagonal is never used).
    """
    flat = embeddings.flatten(1)
    flat = flat - flat.mean(dim=0, keepdim=True)
    gram = flat @ flat.transpose(0, 1)
    squared_norms = gram.diagonal()
    squared_distances = squared_norms.unsqueeze(0) + squared_norms.unsqueeze(1) - 2.0 * gram
    distances = squared_distances.clamp_min(_SQUARED_DISTANCE_EPS).sqrt()
    return gram, distances


def _normalised_distances(embeddings: torch.Tensor, off_diagonal: torch.Tensor) -> torch.Tensor:
    """Pairwise distances divided by their mean over i ≠ j; the diagonal is set to 0."""
    _, distances = _centred_gram_and_distances(embeddings)
    distances = torch.where(off_diagonal, distances, 0.0)
    num_pairs = off_diagonal.shape[0] * (off_diagonal.shape[0] - 1)
    mean_distance = (distances.sum() / num_pairs).clamp_min(_SQUARED_DISTANCE_EPS)
    return distances / mean_distance


def _masked_huber_mean(student_values: torch.Tensor, teacher_values: torch.Tensor,
                       mask: torch.Tensor, count: int) -> torch.Tensor:
    """Mean Huber loss (δ = 1) over the `count` positions where `mask` holds.

    Masked-out positions are replaced by 0 on both sides (no boolean indexing, which
    would cost a device synchronisation and dominate the run time).
    """
    student_values = torch.where(mask, student_values, 0.0)
    teacher_values = torch.where(mask, teacher_values, 0.0)
    return F.huber_loss(student_values, teacher_values, reduction="sum", delta=1.0) / count


def _triplet_cosines(embeddings: torch.Tensor) -> torch.Tensor:
    """cos[j, i, k] = ⟨e_i − e_j, e_k − e_j⟩ / (‖e_i − e_j‖ ‖e_k − e_j‖), angle at vertex j."""
    gram, distances = _centred_gram_and_distances(embeddings)
    inner = (gram.unsqueeze(0) - gram.unsqueeze(2) - gram.unsqueeze(1)
             + gram.diagonal().view(-1, 1, 1))
    return inner / (distances.unsqueeze(2) * distances.unsqueeze(1))


def rkd_distance_loss(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    """Distance-wise RKD loss.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019. With the
    distance potential ψ_D(x_i, x_j) = ‖x_i − x_j‖₂ / μ, μ = mean of ‖x_i − x_j‖₂ over the
    N(N−1) ordered pairs i ≠ j of the batch,

        L_D = mean over i ≠ j of  l_δ(ψ_D(s_i, s_j) − ψ_D(t_i, t_j)),

    where l_δ is the Huber loss with δ = 1: ½x² for |x| ≤ 1, |x| − ½ otherwise.

    Args:
        student_embeddings: `[N, ...]` floating tensor, N ≥ 2.
        teacher_embeddings: `[N, ...]` (width may differ); treated as constant.

    Returns:
        0-dim tensor in float32 (float64 when an input is float64).
    """
    _check_embedding_pair(student_embeddings, teacher_embeddings, minimum_batch=2)
    dtype = compute_dtype(student_embeddings, teacher_embeddings)
    batch_size = student_embeddings.shape[0]
    off_diagonal = ~torch.eye(batch_size, dtype=torch.bool, device=student_embeddings.device)
    student_potential = _normalised_distances(student_embeddings.to(dtype), off_diagonal)
    teacher_potential = _normalised_distances(teacher_embeddings.detach().to(dtype), off_diagonal)
    return _masked_huber_mean(student_potential, teacher_potential, off_diagonal, batch_size * (batch_size - 1))


def rkd_angle_loss(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    """Angle-wise RKD loss.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019. With the angle
    potential ψ_A(x_i, x_j, x_k) = cos ∠x_i x_j x_k = ⟨e_ij, e_kj⟩, e_ij = (x_i − x_j)/‖x_i − x_j‖₂,

        L_A = mean over ordered triples of distinct i, j, k of  l_δ(ψ_A(s) − ψ_A(t)),

    with the Huber loss l_δ, δ = 1. Cost O(N³) time and memory, independent of the width.

    Args:
        student_embeddings: `[N, ...]` floating tensor, N ≥ 3.
        teacher_embeddings: `[N, ...]` (width may differ); treated as constant.

    Returns:
        0-dim tensor in float32 (float64 when an input is float64).
    """
    _check_embedding_pair(student_embeddings, teacher_embeddings, minimum_batch=3)
    dtype = compute_dtype(student_embeddings, teacher_embeddings)
    batch_size = student_embeddings.shape[0]
    index = torch.arange(batch_size, device=student_embeddings.device)
    vertex, first, second = index.view(-1, 1, 1), index.view(1, -1, 1), index.view(1, 1, -1)
    distinct = (vertex != first) & (vertex != second) & (first != second)
    student_cosines = _triplet_cosines(student_embeddings.to(dtype))
    teacher_cosines = _triplet_cosines(teacher_embeddings.detach().to(dtype))
    return _masked_huber_mean(student_cosines, teacher_cosines, distinct,
                              batch_size * (batch_size - 1) * (batch_size - 2))


def relational_kd_loss(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor, *,
                       distance_weight: float = 1.0, angle_weight: float = 2.0) -> torch.Tensor:
    """Weighted RKD loss  λ_D·L_D + λ_A·L_A  (Park et al., "Relational Knowledge Distillation", CVPR 2019).

    See `rkd_distance_loss` and `rkd_angle_loss`. The default weights λ_D = 1, λ_A = 2 are
    the ratio of the authors' metric-learning runs; a term with weight 0 is not computed.

    Args:
        student_embeddings: `[N, ...]` floating tensor (N ≥ 3 when angle_weight > 0, else N ≥ 2).
        teacher_embeddings: `[N, ...]` (width may differ); treated as constant.
        distance_weight: λ_D ≥ 0 (default 1.0).
        angle_weight: λ_A ≥ 0 (default 2.0).

    Returns:
        0-dim tensor in float32 (float64 when an input is float64).
    """
    distance_weight = require_non_negative("distance_weight", distance_weight)
    angle_weight = require_non_negative("angle_weight", angle_weight)
    _check_embedding_pair(student_embeddings, teacher_embeddings,
                          minimum_batch=3 if angle_weight > 0 else 2)
    dtype = compute_dtype(student_embeddings, teacher_embeddings)
    # one conversion: both parts' gradients add up in `dtype` and are rounded to the student's dtype once
    student, teacher = student_embeddings.to(dtype), teacher_embeddings.detach().to(dtype)
    total = student.new_zeros(())
    if distance_weight > 0:
        total = total + distance_weight * rkd_distance_loss(student, teacher)
    if angle_weight > 0:
        total = total + angle_weight * rkd_angle_loss(student, teacher)
    return total
