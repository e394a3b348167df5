"""Multi-teacher knowledge distillation, plain-PyTorch implementation.

`multi_teacher_kd_loss` distils one student from M teachers, combining either the
per-teacher divergences (`combine="sum"`) or the teachers' distributions (`"mixture"`),
with per-teacher or per-row teacher weights. It follows the dense loss contract of
docs/design.md row for row (temperature, T² scaling, α-weighted hard-label cross-entropy,
`ignore_index`, reductions, fp32 math, gradients to the student only) and builds on the
divergence math of `kdfast.reference`. It is the oracle and fallback for a fused kernel
with the same signature; this implementation reads each teacher in turn and never
stacks them, so its temporaries are a few `[N, V]` tensors whatever M is.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from kdfast.contract.options import COMBINE_MODES
from kdfast.contract.reductions import reduce_rows
from kdfast.contract.validation import check_kd_inputs, check_label_range, require_choice
from kdfast.reference import dense as reference

__all__ = ["multi_teacher_kd_loss", "normalised_weights", "split_teachers"]


def split_teachers(teacher_logits, student_logits: torch.Tensor) -> list:
    """Return the teachers as a list of M tensors shaped like the student (views, no copies)."""
    if isinstance(teacher_logits, torch.Tensor):
        expected = (-1,) + tuple(student_logits.shape)
        if teacher_logits.dim() != student_logits.dim() + 1 or teacher_logits.shape[1:] != student_logits.shape:
            raise ValueError(f"teacher_logits given as one tensor must have shape [M, *student_logits.shape] = "
                             f"[M, {', '.join(map(str, expected[1:]))}], got {tuple(teacher_logits.shape)} "
                             f"(student_logits.shape={tuple(student_logits.shape)}); pass a single teacher as "
                             f"[teacher_logits]")
        teachers = list(teacher_logits.unbind(0))
    elif isinstance(teacher_logits, (list, tuple)):
        teachers = list(teacher_logits)
        for index, teacher in enumerate(teachers):
            if not isinstance(teacher, torch.Tensor):
                raise TypeError(f"teacher_logits[{index}] must be a torch.Tensor, got {type(teacher).__name__}")
            if teacher.shape != student_logits.shape:
                raise ValueError(f"teacher_logits[{index}] has shape {tuple(teacher.shape)} but student_logits "
                                 f"has {tuple(student_logits.shape)}; every teacher must match the student")
    else:
        raise TypeError(f"teacher_logits must be a sequence of tensors or one [M, ..., V] tensor, got "
                        f"{type(teacher_logits).__name__}")
    if not teachers:
        raise ValueError("teacher_logits must hold at least one teacher, got none")
    return teachers


def normalised_weights(weights, num_teachers: int, leading_shape: torch.Size,
                        valid_rows: Optional[torch.Tensor], dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
    """Teacher weights as an `[M, rows]` tensor whose columns sum to 1 (constants)."""
    num_rows = leading_shape.numel()
    if weights is None:
        return torch.full((num_teachers, num_rows), 1.0 / num_teachers, dtype=dtype, device=device)
    if isinstance(weights, torch.Tensor):
        weight_tensor = weights.detach()
        if weight_tensor.device != device:
            raise ValueError(f"weights are on {weight_tensor.device} but student_logits is on {device}")
    else:
        try:
            weight_tensor = torch.tensor([float(w) for w in weights])
        except (TypeError, ValueError):
            raise TypeError(f"weights must be None, a sequence of M numbers or a tensor of shape [M] or "
                            f"[M, *leading shape], got {weights!r}") from None
        weight_tensor = weight_tensor.to(device)
    if not weight_tensor.is_floating_point():
        weight_tensor = weight_tensor.to(dtype)
    per_row_shape = (num_teachers,) + tuple(leading_shape)
    if tuple(weight_tensor.shape) == (num_teachers,):
        weight_tensor = weight_tensor.to(dtype).unsqueeze(1).expand(num_teachers, num_rows)
    elif tuple(weight_tensor.shape) == per_row_shape:
        weight_tensor = weight_tensor.to(dtype).reshape(num_teachers, num_rows)
    else:
        raise ValueError(f"weights must have shape [M] = ({num_teachers},) (per teacher) or [M, *leading shape] = "
                         f"{per_row_shape} (per row), got {tuple(weight_tensor.shape)}")
    if not bool(torch.isfinite(weight_tensor).all()) or bool((weight_tensor < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    totals = weight_tensor.sum(dim=0)
    needs_mass = totals <= 0
    if valid_rows is not None:
        needs_mass = needs_mass & valid_rows
    if bool(needs_mass.any()):
        raise ValueError("weights must have a positive sum over the teachers for every row that is not "
                         "ignored; got a zero sum")
    # Rows with no weight at all (only possible on ignored rows) fall back to uniform weights.
    uniform = torch.full_like(weight_tensor, 1.0 / num_teachers)
    return torch.where(totals > 0, weight_tensor / totals.clamp_min(torch.finfo(dtype).tiny), uniform)


def multi_teacher_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: Union[Sequence[torch.Tensor], torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    *,
    weights: Union[None, Sequence[float], torch.Tensor] = None,
    combine: str = "sum",
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    t2_scale: bool = True,
) -> torch.Tensor:
    """Multi-teacher KD loss: one student distilled from M teachers at once.

    Ensemble distillation as in Hinton, Vinyals & Dean, "Distilling the Knowledge in a
    Neural Network", 2015 (the mixture of teacher distributions), and You, Xu, Xu & Tao,
    "Learning from Multiple Teacher Networks", KDD 2017 (a weighted sum of per-teacher
    losses). Per row, with teacher distributions p_m = softmax(t_m / T), student
    q = softmax(s / T), and normalised weights w̄_m = w_m / Σ_k w_k:

        combine="sum":      D = Σ_m w̄_m · D(p_m, q)
        combine="mixture":  D = D(Σ_m w̄_m · p_m, q)
        ℓ = α·CE + (1 − α)·τ·D,   τ = T² if t2_scale else 1,

    with D, CE (label smoothing ε) and every option exactly as in `kdfast.reference.kd_loss`.
    Weights are normalised to sum to 1 over the teachers (per row for per-row weights), so
    the loss scale does not grow with M, the mixture is a distribution, and a single teacher
    gives `kd_loss` whatever its weight. With M = 1 both modes equal `kd_loss`.

    Args:
        student_logits: `[..., V]` float32, bfloat16, float16 or float64; gradients flow here.
        teacher_logits: a sequence of M tensors shaped like the student, or one tensor
            `[M, ..., V]`; dtypes may differ from the student's. Treated as constants.
        labels: int64 `[...]` (the student's leading shape) or None; rows whose label equals
            `ignore_index` contribute 0 and get no gradient. With None every row is valid
            and `alpha` must be 0.
        weights: None (default, uniform 1/M), M non-negative numbers or a tensor `[M]` (per
            teacher), or a tensor `[M, ...]` with the student's leading shape (per row, e.g.
            teacher confidences). Treated as constants; every non-ignored row needs a
            positive sum.
        combine: "sum" (default) or "mixture", as above.
        divergence: "forward_kl" (default), "reverse_kl", "jsd" or "tvd".
        temperature: T in [1e-20, 1e20] (default 1.0).
        alpha: hard-label cross-entropy weight in [0, 1] (default 0.0).
        beta: JSD mixture weight in (0, 1) (default 0.5); used by "jsd" only.
        ignore_index: label value of rows to skip (default -100).
        reduction: "mean" (default; sum over valid rows / number of valid rows, 0 when none is
            valid), "sum", "batchmean" (sum / number of rows) or "none" (per-row losses with
            the student's leading shape).
        label_smoothing: ε in [0, 1) for the cross-entropy (default 0.0).
        t2_scale: multiply the divergence by T² (default True).

    Returns:
        A 0-dim tensor, or `[...]` for reduction="none"; float64 if the student or any
        teacher is float64, else float32.

    Raises:
        TypeError: wrong tensor or label dtypes, or weights of the wrong type.
        ValueError: mismatched shapes or devices, labels out of range, negative weights,
            a zero weight sum on a non-ignored row, or an invalid option.
    """
    require_choice("combine", combine, COMBINE_MODES)
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}")
    teachers = split_teachers(teacher_logits, student_logits)
    for teacher in teachers:
        check_kd_inputs(student_logits, teacher, labels, divergence=divergence, temperature=temperature,
                        alpha=alpha, beta=beta, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing)
    vocab_size = student_logits.shape[-1]
    check_label_range(labels, vocab_size, ignore_index)

    compute_dtype = student_logits.dtype
    for teacher in teachers:
        compute_dtype = reference.compute_dtype_for(compute_dtype, teacher.dtype)
    compute_dtype = reference.compute_dtype_for(compute_dtype, torch.float32)
    leading_shape = student_logits.shape[:-1]
    device = student_logits.device

    student_rows = student_logits.reshape(-1, vocab_size).to(compute_dtype)
    labels_rows = None if labels is None else labels.reshape(-1)
    valid_rows = None if labels_rows is None else labels_rows != ignore_index
    row_weights = normalised_weights(weights, len(teachers), leading_shape, valid_rows, compute_dtype, device)

    def teacher_rows(teacher: torch.Tensor) -> torch.Tensor:
        rows = teacher.detach().reshape(-1, vocab_size).to(compute_dtype)
        # Ignored rows are computed on zero logits (always finite) and zeroed at the end.
        return rows if valid_rows is None else torch.where(valid_rows[:, None], rows, 0.0)

    if valid_rows is not None:
        student_rows = torch.where(valid_rows[:, None], student_rows, 0.0)

    row_loss = None
    if alpha != 1:
        student_log_probs = torch.log_softmax(student_rows / temperature, dim=-1)
        if combine == "sum":
            divergence_rows = None
            for teacher, teacher_weight in zip(teachers, row_weights):
                teacher_log_probs = torch.log_softmax(teacher_rows(teacher) / temperature, dim=-1)
                teacher_divergence = reference.divergence_from_log_probs(
                    teacher_log_probs, student_log_probs, divergence, beta)
                # A zero weight drops the teacher (no 0·inf), but its NaN still counts: NaN in, NaN out.
                term = torch.where(teacher_weight > 0, teacher_weight * teacher_divergence,
                                   torch.where(torch.isnan(teacher_divergence), teacher_divergence, 0.0))
                divergence_rows = term if divergence_rows is None else divergence_rows + term
        else:
            with torch.no_grad():
                mixture_log_probs = None
                for teacher, teacher_weight in zip(teachers, row_weights):
                    weighted = (torch.log_softmax(teacher_rows(teacher) / temperature, dim=-1)
                                + teacher_weight.log()[:, None])
                    mixture_log_probs = (weighted if mixture_log_probs is None
                                         else torch.logaddexp(mixture_log_probs, weighted))
            divergence_rows = reference.divergence_from_log_probs(
                mixture_log_probs, student_log_probs, divergence, beta)
        divergence_scale = (1.0 - alpha) * (temperature * temperature if t2_scale else 1.0)
        row_loss = divergence_scale * divergence_rows
    if alpha != 0:
        # The hard-label term does not involve the teachers; with alpha=1 the reference
        # computes exactly CE per row (0 on ignored rows).
        cross_entropy = reference.kd_loss_rows(
            student_logits.reshape(-1, vocab_size), teachers[0].reshape(-1, vocab_size), labels_rows,
            alpha=1.0, ignore_index=ignore_index, label_smoothing=label_smoothing).to(compute_dtype)
        row_loss = alpha * cross_entropy if row_loss is None else row_loss + alpha * cross_entropy
    if valid_rows is not None:
        row_loss = torch.where(valid_rows, row_loss, 0.0)
    row_loss = reference.nan_rows_poison_gradient(row_loss, student_logits.reshape(-1, vocab_size))
    return reduce_rows(row_loss.reshape(leading_shape), reduction, valid_rows)
