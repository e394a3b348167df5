"""nn.Module wrappers around `kdfast.functional`.

Each module validates the loss options given at construction (with the checks, and so the
messages, of the matching functional call: `kdfast.contract.validation`), stores them and
forwards to the functional call; `forward` returns exactly what the functional form returns
for the same arguments, following PyTorch's loss-module conventions (`reduction`,
`ignore_index`). Options that depend on the inputs (labels for α > 0, a temperature equal to
the soft labels', vocabulary maps against the vocabularies) are checked per call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdfast import functional as F
from kdfast.contract.options import COMBINE_MODES
from kdfast.contract.validation import (
    FUSED_LINEAR_NAMES,
    KD_NAMES,
    MULTI_TEACHER_NAMES,
    SPARSE_NAMES,
    check_chunk_size,
    check_kd_options,
    check_softcap,
    check_tail,
    check_tail_options,
    check_vocab_mapping_kind,
    require_choice,
)
from kdfast.reference.multi_teacher import normalised_weights


class KDLoss(nn.Module):
    """Fused knowledge-distillation loss module; see `kdfast.functional.kd_loss`.

    Args:
        divergence: "forward_kl" (default), "reverse_kl", "jsd" or "tvd".
        temperature: softmax temperature T > 0 (default 1.0).
        alpha: weight of the hard-label cross-entropy in [0, 1] (default 0.0).
        beta: JSD mixture weight in (0, 1) (default 0.5), used by "jsd" only.
        ignore_index: label value whose rows contribute nothing (default -100).
        reduction: "mean" (default), "sum", "none" or "batchmean".
        label_smoothing: ε in [0, 1) for the cross-entropy term (default 0.0).
        t2_scale: multiply the divergence by T² (default True).
        inplace_backward: write the student gradient over the student logits (CPU; default
            False); see `kdfast.functional.kd_loss` for the contract and its refusals.

    Shape:
        student_logits, teacher_logits: [..., V]; labels: [...] int64 or None.
        Output: scalar, or [...] for reduction="none"; float32 (float64 for float64 inputs).

    Raises:
        TypeError / ValueError: an invalid option, at construction, with the message of
            `kdfast.functional.kd_loss`.
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        temperature: float = 1.0,
        alpha: float = 0.0,
        beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        t2_scale: bool = True,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        check_kd_options(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                         ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                         names=KD_NAMES)
        self.inplace_backward = bool(inplace_backward)
        self.divergence = divergence
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.t2_scale = t2_scale

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return F.kd_loss(
            student_logits,
            teacher_logits,
            labels,
            divergence=self.divergence,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            t2_scale=self.t2_scale,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, alpha={self.alpha}, "
            f"beta={self.beta}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, t2_scale={self.t2_scale}"
        )


class SparseKDLoss(nn.Module):
    """Distillation loss against top-k soft labels; see `kdfast.functional.sparse_kd_loss`.

    Args:
        divergence: "forward_kl" (default), "reverse_kl", "jsd" or "tvd".
        temperature: None (default: the soft labels' own temperature) or a value equal to it.
        alpha: weight of the hard-label cross-entropy in [0, 1] (default 0.0).
        beta: JSD mixture weight in (0, 1) (default 0.5), used by "jsd" only.
        tail: "bucket" (default: k kept tokens plus one tail bucket) or "renormalize".
        ignore_index: label value whose rows contribute nothing (default -100).
        reduction: "mean" (default), "sum", "none" or "batchmean".
        label_smoothing: ε in [0, 1) for the cross-entropy term (default 0.0).
        t2_scale: multiply the divergence by T² (default True).
        inplace_backward: write the student gradient over the student logits (CPU; default
            False); see `kdfast.functional.kd_loss` for the contract and its refusals.

    Shape:
        student_logits: [..., V]; soft_labels: SoftLabels with leading shape [...];
        labels: [...] int64 or None.
        Output: scalar, or [...] for reduction="none"; float32 (float64 for float64 inputs).

    Raises:
        TypeError / ValueError: an invalid option, at construction, with the message of
            `kdfast.functional.sparse_kd_loss`.
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        temperature: Optional[float] = None,
        alpha: float = 0.0,
        beta: float = 0.5,
        tail: str = "bucket",
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        t2_scale: bool = True,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        check_tail_options(tail=tail, temperature=temperature, divergence=divergence, alpha=alpha, beta=beta,
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                           names=SPARSE_NAMES)
        self.inplace_backward = bool(inplace_backward)
        self.divergence = divergence
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.tail = tail
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.t2_scale = t2_scale

    def forward(self, student_logits: torch.Tensor, soft_labels, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.sparse_kd_loss(
            student_logits,
            soft_labels,
            labels,
            divergence=self.divergence,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            tail=self.tail,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            t2_scale=self.t2_scale,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, temperature={self.temperature}, alpha={self.alpha}, "
            f"beta={self.beta}, tail={self.tail!r}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, t2_scale={self.t2_scale}"
        )


class MultiTeacherKDLoss(nn.Module):
    """Fused multi-teacher distillation loss; see `kdfast.functional.multi_teacher_kd_loss`.

    Args:
        weights: None (default: uniform), M numbers or a tensor [M] (per teacher), kept as
            the buffer `weights` (numbers as float64), so `.to(device)` and `state_dict()`
            carry it. Per-row weights [M, ...] vary per batch, so pass them to `forward` instead.
        combine: "sum" (default: Σ_m w̄_m·D(p_m, q)) or "mixture" (D(Σ_m w̄_m·p_m, q)).
        divergence: "forward_kl" (default), "reverse_kl", "jsd" or "tvd".
        temperature: softmax temperature T > 0 (default 1.0).
        alpha: weight of the hard-label cross-entropy in [0, 1] (default 0.0).
        beta: JSD mixture weight in (0, 1) (default 0.5), used by "jsd" only.
        ignore_index: label value whose rows contribute nothing (default -100).
        reduction: "mean" (default), "sum", "none" or "batchmean".
        label_smoothing: ε in [0, 1) for the cross-entropy term (default 0.0).
        t2_scale: multiply the divergence by T² (default True).
        tail: "bucket" (default) or "renormalize": the tail rule of SoftLabels teachers.

    Shape:
        student_logits: [..., V]; teacher_logits: a sequence of M tensors [..., V] or one
        [M, ..., V] tensor, or a sequence of M `kdfast.SoftLabels` with leading shape [...];
        labels: [...] int64 or None; weights (forward, optional, overrides the constructor's):
        [M] or [M, ...].
        Output: scalar, or [...] for reduction="none"; float32 (float64 for float64 inputs).

    Raises:
        TypeError / ValueError: an invalid option or teacher weights (not [M], negative, not
            finite, or summing to 0), at construction, with the message of
            `kdfast.functional.multi_teacher_kd_loss`.
    """

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        require_choice("combine", combine, COMBINE_MODES)
        check_tail(tail, MULTI_TEACHER_NAMES)
        check_kd_options(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                         ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                         names=MULTI_TEACHER_NAMES)
        # a buffer, so that `.to(device)` and state_dict carry the teacher weights
        if weights is not None:
            weights = _checked_teacher_weights(weights)
        self.register_buffer("weights", weights)
        self.tail = tail
        self.combine = combine
        self.divergence = divergence
        self.temperature = temperature
        self.alpha = alpha
        self.beta = beta
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.t2_scale = t2_scale

    def forward(self, student_logits: torch.Tensor, teacher_logits, labels: Optional[torch.Tensor] = None,
                weights=None) -> torch.Tensor:
        return F.multi_teacher_kd_loss(
            student_logits,
            teacher_logits,
            labels,
            weights=self.weights if weights is None else weights,
            combine=self.combine,
            divergence=self.divergence,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            t2_scale=self.t2_scale,
            tail=self.tail,
        )

    def extra_repr(self) -> str:
        return (
            f"combine={self.combine!r}, divergence={self.divergence!r}, temperature={self.temperature}, "
            f"alpha={self.alpha}, beta={self.beta}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, t2_scale={self.t2_scale}"
        )


def _checked_teacher_weights(weights) -> torch.Tensor:
    """Per-teacher weights ([M] tensor or M numbers, numbers kept as float64) after the checks
    of the functional call: finite, non-negative, with a positive sum."""
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"multi_teacher_kd_loss: weights given to MultiTeacherKDLoss must have shape [M] (one "
                             f"per teacher), got {tuple(weights.shape)}; pass per-row weights [M, ...] to forward")
        count, device = weights.shape[0], weights.device
    else:
        try:
            count = len(weights)
        except TypeError:
            count = 0
        device = torch.device("cpu")
    if device.type != "meta":  # the checks read the values
        normalised_weights(weights, count, torch.Size(()), None, torch.float64, device)  # raises on bad weights
    if isinstance(weights, torch.Tensor):
        return weights.detach().clone()
    return torch.tensor([float(w) for w in weights], dtype=torch.float64)


class FusedLinearKDLoss(nn.Module):
    """Student lm_head + distillation loss in chunks; see `kdfast.functional.fused_linear_kd_loss`.

    The module holds the loss options only; the lm_head weight stays in the model and is
    passed to `forward` (so optimisers, DDP and FSDP see it as the model's parameter).

    Args:
        chunk_size: rows per chunk, or None for the memory-based default.
        softcap: None, or c > 0 for c·tanh(s/c) soft-capping of the student logits.
        vocab_mapping: None, "truncate" or an int64 [V] map for a teacher of another vocabulary size.
        divergence, temperature, alpha, beta, tail, ignore_index, reduction, label_smoothing, t2_scale: as in
            `kdfast.functional.fused_linear_kd_loss`.
        process_group: the torch.distributed group the vocabulary is sharded over, or None.

    Shape:
        student_hidden [..., H]; student_weight [V, H]; student_bias [V] or None; teacher:
        logits [..., V], a (hidden [..., H_t], weight [V, H_t], optional bias) tuple, or SoftLabels;
        labels [...] int64 or None. Output: scalar, or [...] for reduction="none".

    Raises:
        TypeError / ValueError: an invalid option, at construction, with the message of
            `kdfast.functional.fused_linear_kd_loss`.
    """

    def __init__(
        self,
        chunk_size: Optional[int] = None,
        softcap: Optional[float] = None,
        vocab_mapping=None,
        divergence: str = "forward_kl",
        temperature: Optional[float] = None,
        alpha: float = 0.0,
        beta: float = 0.5,
        tail: str = "bucket",
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        t2_scale: bool = True,
        process_group=None,
    ) -> None:
        super().__init__()
        check_chunk_size(chunk_size, FUSED_LINEAR_NAMES)
        check_softcap(softcap, FUSED_LINEAR_NAMES)
        check_vocab_mapping_kind(vocab_mapping, FUSED_LINEAR_NAMES)
        check_tail_options(tail=tail, temperature=temperature, divergence=divergence, alpha=alpha, beta=beta,
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                           names=FUSED_LINEAR_NAMES)
        self.options = dict(
            chunk_size=chunk_size, softcap=softcap, vocab_mapping=vocab_mapping, divergence=divergence,
            temperature=temperature, alpha=alpha, beta=beta, tail=tail, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing, t2_scale=t2_scale, process_group=process_group,
        )

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher,
        labels: Optional[torch.Tensor] = None,
        student_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return F.fused_linear_kd_loss(student_hidden, student_weight, teacher, labels, student_bias=student_bias,
                                      **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "process_group" and v is not None)
