"""`multi_teacher_kd_loss`: one student distilled from M teachers in the functional API.

Dense teachers run the fused multi-teacher kernel (`kdfast.ops.multi_teacher`) on the CPU, and
on CUDA when the core has CUDA kernels and M is within their limit; elsewhere the float64
oracle `kdfast.reference.multi_teacher` computes the same contract. SoftLabels teachers are
combined from `sparse_kd_loss` terms. Argument checks read metadata only, except the eager
check of the teacher weights' values.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from kdfast.contract.options import COMBINE_MODES, REDUCTIONS, KDOptions, compute_dtype
from kdfast.contract.reductions import reduce_rows
from kdfast.contract.softlabels import SoftLabels
from kdfast.contract.validation import MULTI_TEACHER_NAMES, check_kd_inputs, require_choice
from kdfast.functional._rows import as_rows
from kdfast.functional.sparse import sparse_kd_loss
from kdfast.ops import multi_teacher as multi_teacher_ops
from kdfast.ops._native import cuda_limit, has_cuda_kernels, native_available
from kdfast.reference import multi_teacher as multi_teacher_reference

__all__ = ["multi_teacher_kd_loss"]


def _unchecked_teacher_weights(weights, num_teachers: int, leading_shape: torch.Size, dtype: torch.dtype,
                               device: torch.device) -> Tensor:
    """Teacher weights as `[M, rows]` (possibly expanded) normalised to sum 1 per row, traceable.

    The value checks (finite, non-negative, positive sums on valid rows) read tensor data;
    eager calls make them through `kdfast.reference.multi_teacher.normalised_weights`, and
    this metadata-only version serves `torch.compile`.
    """
    rows = leading_shape.numel()
    if weights is None:
        return torch.full((num_teachers, 1), 1.0 / num_teachers, dtype=dtype, device=device).expand(num_teachers, rows)
    if isinstance(weights, Tensor):
        weight_tensor = weights.detach().to(device=device, dtype=dtype)
    else:
        weight_tensor = torch.tensor([float(w) for w in weights], dtype=dtype, device=device)
    per_row_shape = (num_teachers,) + tuple(leading_shape)
    if tuple(weight_tensor.shape) == (num_teachers,):
        weight_tensor = weight_tensor.reshape(num_teachers, 1)
    elif tuple(weight_tensor.shape) == per_row_shape:
        weight_tensor = weight_tensor.reshape(num_teachers, rows)
    else:
        raise ValueError(f"weights must have shape [M] = ({num_teachers},) (per teacher) or [M, *leading shape] = "
                         f"{per_row_shape} (per row), got {tuple(weight_tensor.shape)}")
    totals = weight_tensor.sum(dim=0, keepdim=True)
    normalised = torch.where(totals > 0, weight_tensor / totals.clamp_min(torch.finfo(dtype).tiny),
                             torch.full_like(weight_tensor, 1.0 / num_teachers))
    return normalised.expand(num_teachers, rows)


def _multi_teacher_count(teacher_logits) -> int:
    if isinstance(teacher_logits, Tensor):
        return teacher_logits.shape[0] if teacher_logits.dim() > 0 else 0
    return len(teacher_logits) if isinstance(teacher_logits, (list, tuple)) else 0


def _is_soft_label_sequence(teacher_logits) -> bool:
    return isinstance(teacher_logits, (list, tuple)) and any(isinstance(t, SoftLabels) for t in teacher_logits)


def _multi_teacher_soft_labels(student_logits: Tensor, teachers, labels: Optional[Tensor], *, weights, combine: str,
                               divergence: str, temperature: float, alpha: float, beta: float, tail: str,
                               ignore_index: int, reduction: str, label_smoothing: float, t2_scale: bool) -> Tensor:
    """`multi_teacher_kd_loss` with M `SoftLabels` teachers (see its docstring).

    "sum": Σ_m w̄_m·ℓ_m with ℓ_m the per-row `sparse_kd_loss` against teacher m (its α·CE part
    is the same for every m and the weights sum to 1, so the CE is counted once), then
    reduced. "mixture": the teachers' top-k distributions are mixed into one SoftLabels,
    which is exact only when every teacher keeps the same tokens in every row.
    """
    require_choice("combine", combine, COMBINE_MODES)
    require_choice("reduction", reduction, REDUCTIONS)  # the per-teacher losses below use reduction="none"
    for index, teacher in enumerate(teachers):
        if not isinstance(teacher, SoftLabels):
            raise TypeError(f"teacher_logits[{index}] is a {type(teacher).__name__}; a sequence of teachers must be "
                            f"all tensors or all kdfast.SoftLabels")
    if not isinstance(student_logits, Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}")
    leading_shape = student_logits.shape[:-1]
    math_dtype = torch.float64 if student_logits.dtype == torch.float64 or any(
        t.logprobs.dtype == torch.float64 for t in teachers) else torch.float32
    label_rows = None if labels is None else labels.reshape(-1)
    valid_rows = None if label_rows is None else label_rows != ignore_index
    weight_rows = multi_teacher_reference.normalised_weights(weights, len(teachers), leading_shape, valid_rows,
                                                             math_dtype, student_logits.device)
    sparse_options = dict(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta, tail=tail,
                          ignore_index=ignore_index, label_smoothing=label_smoothing, t2_scale=t2_scale)
    if combine == "sum":
        row_loss = None
        for teacher, teacher_weight in zip(teachers, weight_rows):
            term = sparse_kd_loss(student_logits, teacher, labels, reduction="none", **sparse_options).reshape(-1)
            term = term.to(math_dtype)
            # A zero weight drops the teacher (no 0·inf), but its NaN still counts: NaN in, NaN out.
            term = torch.where(teacher_weight > 0, teacher_weight * term, torch.where(torch.isnan(term), term, 0.0))
            row_loss = term if row_loss is None else row_loss + term
        return reduce_rows(row_loss.reshape(leading_shape), reduction, valid_rows)
    first = teachers[0]
    for index, teacher in enumerate(teachers[1:], start=1):
        if teacher.indices.shape != first.indices.shape or not torch.equal(teacher.indices, first.indices):
            raise ValueError(
                f'multi_teacher_kd_loss: combine="mixture" with SoftLabels needs every teacher to keep the same '
                f"tokens (equal indices) in every row, but teacher_logits[{index}] differs from teacher_logits[0]. "
                "A token kept by one teacher lies in another's tail, whose mass is not split over tokens, so the "
                'mixture distribution is not known there. Use combine="sum", or compress every teacher over '
                "shared indices.")
        if teacher.temperature != first.temperature or teacher.vocab_size != first.vocab_size:
            raise ValueError("multi_teacher_kd_loss: every SoftLabels teacher must have the same temperature and "
                             "vocab_size")
    flat_shape = (leading_shape.numel(), first.indices.shape[-1])
    log_weights = weight_rows.log()  # [M, rows]; -inf for a zero weight
    mixed_logprobs = torch.stack([t.logprobs.detach().reshape(flat_shape).to(math_dtype) + lw[:, None]
                                  for t, lw in zip(teachers, log_weights)]).logsumexp(0)
    mixed_tail = torch.stack([t.tail_logprob.detach().reshape(-1).to(math_dtype) + lw
                              for t, lw in zip(teachers, log_weights)]).logsumexp(0)
    mixture = SoftLabels(indices=first.indices, logprobs=mixed_logprobs.reshape(first.indices.shape),
                         tail_logprob=mixed_tail.reshape(first.tail_logprob.shape), temperature=first.temperature,
                         vocab_size=first.vocab_size)
    return sparse_kd_loss(student_logits, mixture, labels, reduction=reduction, **sparse_options)


def multi_teacher_kd_loss(
    student_logits: Tensor,
    teacher_logits,
    labels: Optional[Tensor] = None,
    *,
    weights=None,
    combine: str = "sum",
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    t2_scale: bool = True,
    tail: str = "bucket",
) -> Tensor:
    """Fused multi-teacher distillation loss: one student, M teachers, one kernel.

    Per row, with p_m = softmax(t_m/T), q = softmax(s/T), r = softmax(s) and weights w̄_m
    normalised to sum 1 over the teachers (per row for per-row weights):
    `combine="sum"` gives D = Σ_m w̄_m·D(p_m, q), `combine="mixture"` gives
    D = D(Σ_m w̄_m·p_m, q); the row loss is α·CE(s, y) + (1−α)·τ·D with τ = T² when
    `t2_scale` else 1 and CE = −(1−ε)·log r_y − (ε/V)·Σ log r_i. D is `forward_kl`,
    `reverse_kl`, `jsd` (β) or `tvd` exactly as in `kd_loss`; every divergence works with
    both combine modes. The semantics are those of `kdfast.reference.multi_teacher_kd_loss`
    (also exported as `kdfast.methods.multi_teacher_kd_loss`), the float64 oracle and the
    fallback on devices without the kernels.

    On the CPU, with "forward_kl" (either combine mode) the forward kernel reads every
    teacher row and the student row from memory once, exponentiates each element once, and,
    when the student needs a gradient (eager mode), writes that gradient in the same pass;
    the backward pass only scales it by grad_output. Other divergences read the rows once
    in the forward pass (twice for "mixture", "jsd" and "tvd", which need normalised
    distributions) and once more in the backward pass. Teachers are passed by address, so
    no [M, N, V] stack or per-teacher [N, V] temporary is created: the extra memory is the
    [N, 6 + 3M] per-row statistics, the [N, V] student gradient (float32, float64 for a
    float64 student) and a few rows per thread.

    Args:
        student_logits: [..., V] float32, bfloat16, float16 or float64. Receives the gradient.
        teacher_logits: a sequence of M tensors shaped like the student, or one [M, ..., V]
            tensor (its M slices are used as views). Treated as constants. Teachers may have a
            different dtype from the student; when the teachers' dtypes differ from one
            another they are converted to float32 first (a copy), and a float64 student or
            teacher makes every input float64. Or a sequence of M `kdfast.SoftLabels`
            (top-k teachers, leading shape [...], vocab_size V): each teacher's divergence
            is then the one of `sparse_kd_loss` (per `tail`), and `temperature` must equal
            the soft labels' temperature. "sum" computes Σ_m w̄_m·ℓ_m from M sparse losses
            (not one fused kernel; each reads the student once). "mixture" mixes the
            teachers' kept probabilities and tail masses into one SoftLabels, which is exact
            only when all teachers keep the same indices in every row; otherwise it raises
            ValueError, because a token one teacher keeps sits in another's tail bucket,
            whose mass is not split over tokens.
        labels: [...] int64 class indices in [0, V), or None (every row valid; `alpha` must be
            0). Rows whose label equals `ignore_index` contribute 0 and get a zero gradient.
        weights: None (default: uniform 1/M), M non-negative numbers or a tensor [M] (per
            teacher), or a tensor [M, ...] with the student's leading shape (per row, e.g.
            teacher confidences). Normalised to sum 1 over the teachers; treated as constants.
            Every non-ignored row needs a positive sum (checked in eager mode).
        combine: "sum" (default) or "mixture".
        divergence: "forward_kl" (default), "reverse_kl", "jsd" or "tvd".
        temperature: T in [1e-20, 1e20] (default 1.0).
        alpha: weight of the hard-label cross-entropy, in [0, 1] (default 0.0).
        beta: JSD mixture weight in (0, 1) (default 0.5); used by "jsd" only.
        ignore_index: label value of rows to skip (default -100).
        reduction: "mean" (default: sum over valid rows / number of valid rows, 0 when no row
            is valid), "sum", "batchmean" (sum / number of rows) or "none" (per-row losses
            with the leading shape [...]).
        label_smoothing: ε in [0, 1) for the cross-entropy term (default 0.0).
        t2_scale: scale the divergence by T² (default True).
        tail: "bucket" (default) or "renormalize", as in `sparse_kd_loss`; used only with
            SoftLabels teachers.

    Returns:
        float32 loss (float64 when the student or a teacher is float64): a scalar, or [...]
        for reduction="none". The student gradient has the student's dtype.

    Raises:
        TypeError: logits not floating, labels not int64, weights of the wrong type.
        ValueError: mismatched shapes or devices, bad options (as `kd_loss`), an unknown
            `combine`, labels outside [0, V) that are not `ignore_index` (CPU; on CUDA
            tensors their rows get a NaN loss and gradient, as in `kd_loss`), and in eager
            mode negative or non-finite weights or a zero weight sum on a non-ignored row.
    """
    options = dict(weights=weights, combine=combine, divergence=divergence, temperature=temperature, alpha=alpha,
                   beta=beta, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                   t2_scale=t2_scale)
    if _is_soft_label_sequence(teacher_logits):
        return _multi_teacher_soft_labels(student_logits, list(teacher_logits), labels, tail=tail, **options)
    uses_kernel = isinstance(student_logits, Tensor) and (
        student_logits.device.type == "cpu"
        or (student_logits.device.type == "cuda" and has_cuda_kernels()
            and _multi_teacher_count(teacher_logits) <= cuda_limit("max_teachers")))
    # Under torch.compile the availability check is not traced; a missing core fails at the op.
    if not uses_kernel or (not torch.compiler.is_compiling() and not native_available()):
        return multi_teacher_reference.multi_teacher_kd_loss(student_logits, teacher_logits, labels, **options)
    require_choice("combine", combine, COMBINE_MODES)
    teachers = multi_teacher_reference.split_teachers(teacher_logits, student_logits)
    for index, teacher in enumerate(teachers):
        check_kd_inputs(
            student_logits, teacher, labels, divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            names=dataclasses.replace(MULTI_TEACHER_NAMES, teacher=f"teacher_logits[{index}]"),
        )
    teacher_dtypes = {teacher.dtype for teacher in teachers}
    if student_logits.dtype == torch.float64 or torch.float64 in teacher_dtypes:
        student_logits = student_logits.to(torch.float64)
        teachers = [teacher.to(torch.float64) for teacher in teachers]
    elif len(teacher_dtypes) > 1:
        teachers = [teacher.to(torch.float32) for teacher in teachers]
    dtype = compute_dtype(student_logits)
    vocab = student_logits.shape[-1]
    leading_shape = student_logits.shape[:-1]
    student_rows = as_rows(student_logits, vocab)
    teacher_rows = [as_rows(teacher.detach(), vocab) for teacher in teachers]
    label_rows = labels.reshape(-1).contiguous() if labels is not None else None
    kernel_options = KDOptions.of(combine=combine, divergence=divergence, reduction=reduction,
                                  temperature=temperature, alpha=alpha, beta=beta, label_smoothing=label_smoothing,
                                  t2_scale=t2_scale, ignore_index=ignore_index)
    if torch.compiler.is_compiling():
        weight_rows = _unchecked_teacher_weights(weights, len(teachers), leading_shape, dtype, student_logits.device)
    else:  # validated weights (reads tensor data)
        valid_rows = None if label_rows is None else label_rows != ignore_index
        weight_rows = multi_teacher_reference.normalised_weights(weights, len(teachers), leading_shape, valid_rows,
                                                                 dtype, student_logits.device)
    loss = multi_teacher_ops.multi_teacher_kd_loss(student_rows, teacher_rows, weight_rows, label_rows, kernel_options)
    if reduction == "none":
        loss = loss.reshape(leading_shape)
    return loss
