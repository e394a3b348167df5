"""Drop-ins for torchtune 0.6.1's distillation losses (`torchtune.modules.loss.kd_losses`).

Same class names, constructor arguments and defaults, forward signatures and numbers as
torchtune 0.6.1: `ForwardKLLoss`, `ReverseKLLoss`, `SymmetricKLLoss` take logits
[rows, V] (any leading shape) and labels with as many elements (only compared with
`ignore_index`; their values need not be token ids), and `normalize=True` divides by the
number of kept rows (0 when none). The `...WithChunkedOutputLoss` variants take lists of
[B, T/c, V] chunks and labels [B, T], chunked along dim 1 as torchtune does.

Conventions reproduced, which differ from `kdfast.functional.kd_loss`:
- torchtune's `ForwardKLLoss` is the cross-entropy −Σ p·log q, i.e. KL(p‖q) plus the
  teacher's entropy H(p) (the gradient is the KL's); the kernels compute it in the same pass
  (`KDOptions.teacher_entropy`).
- The normaliser (1 / kept rows, times the symmetric loss's ratio) is known before the kernels
  run and is folded into their gradient (`KDOptions.divergence_weight`), so that the backward
  pass hands the one-pass gradient on as it is instead of scaling it.
- No temperature, no T² factor; the loss is float32 whatever the logits' dtype.
- Masked vocabulary entries (−inf logits in both models at the same place) contribute 0.
  torchtune also zeroes terms that touch any infinite logit where the other model is finite
  (e.g. a student −inf where the teacher has mass); the fused kernels give +inf there, so a
  non-finite fused result is recomputed with torchtune's formula in eager PyTorch (exact,
  slower, only for such inputs). torchtune's reverse KL has a NaN gradient whenever any
  logit is −inf (0·∞ in the backward of its masked products); kdfast's is finite there.
- The chunked reverse and symmetric losses divide by the kept-row count without a zero check,
  so they are NaN when every label is ignored (as in torchtune); the chunked forward loss is 0.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as torch_f
from torch import Tensor, nn

from kdfast.compat._common import SKIP, keep_rows
from kdfast.contract.options import KDOptions
from kdfast.contract.validation import check_kd_inputs
from kdfast.functional.dense import kd_loss_with_options

__all__ = [
    "ForwardKLLoss",
    "ForwardKLWithChunkedOutputLoss",
    "ReverseKLLoss",
    "ReverseKLWithChunkedOutputLoss",
    "SymmetricKLLoss",
    "SymmetricKLWithChunkedOutputLoss",
]


def _rows(logits: Tensor) -> Tensor:
    return logits.reshape(-1, logits.shape[-1])


def _eager_sum(student: Tensor, teacher: Tensor, keep: Optional[Tensor], direction: str) -> Tensor:
    """torchtune 0.6.1's formula (sum over kept rows), for inputs the fused path cannot mirror.

    Masked log-probabilities are replaced by 0 before the products (same value as torchtune's
    masked_fill after them), so the gradient stays finite where torchtune's reverse KL is NaN.
    """
    student_log = torch_f.log_softmax(student, dim=-1, dtype=torch.float32)
    if direction == "forward":
        inf_mask = torch.isinf(student)
        teacher_prob = torch_f.softmax(teacher, dim=-1, dtype=torch.float32)
        row = -(teacher_prob * student_log.masked_fill(inf_mask, 0)).masked_fill(inf_mask, 0).sum(-1)
    else:
        inf_mask = torch.isinf(student) | torch.isinf(teacher)
        student_prob = torch_f.softmax(student, dim=-1, dtype=torch.float32)
        teacher_log = torch_f.log_softmax(teacher, dim=-1, dtype=torch.float32)
        gap = student_log.masked_fill(inf_mask, 0) - teacher_log.masked_fill(inf_mask, 0)
        row = (student_prob * gap).masked_fill(inf_mask, 0).sum(-1)
    if keep is not None:
        row = row * (keep != SKIP)
    return row.sum()


def _kl_sum(student: Tensor, teacher: Tensor, labels: Tensor, ignore_index: int, direction: str,
            weight: float = 1.0) -> Tensor:
    """`weight` times the sum over kept rows of torchtune's per-row forward ("forward": the
    cross-entropy −Σ p·log q) or reverse ("reverse") KL; the weight is folded into the kernels."""
    student, teacher = _rows(student), _rows(teacher)
    keep = keep_rows(labels, ignore_index, student.shape[0])
    divergence = "forward_kl" if direction == "forward" else "reverse_kl"
    check_kd_inputs(student, teacher, keep, divergence=divergence, temperature=1.0, alpha=0.0, beta=0.5,
                    ignore_index=SKIP, reduction="sum", label_smoothing=0.0)
    options = KDOptions.of(divergence=divergence, reduction="sum", ignore_index=SKIP,
                           teacher_entropy=direction == "forward", divergence_weight=weight)
    total = kd_loss_with_options(student, teacher, keep, options)
    if not bool(torch.isfinite(total)):
        return weight * _eager_sum(student, teacher, keep, direction)
    return total


def _symmetric_sum(student, teacher, labels, ignore_index: int, ratio: float, weight: float = 1.0) -> Tensor:
    total = 0.0
    if ratio != 0.0:
        total = _kl_sum(student, teacher, labels, ignore_index, "forward", ratio * weight)
    if ratio != 1.0:
        total = total + _kl_sum(student, teacher, labels, ignore_index, "reverse", (1 - ratio) * weight)
    return torch.as_tensor(total)


def _kept(labels: Tensor, ignore_index: int) -> int:
    return int((labels != ignore_index).sum())


def _normaliser(labels: Tensor, ignore_index: int, normalize: bool) -> Optional[float]:
    """The factor of the summed loss: 1 without `normalize`, else 1 / kept rows (None when none)."""
    if not normalize:
        return 1.0
    count = _kept(labels, ignore_index)
    return 1.0 / count if count else None


class ForwardKLLoss(nn.Module):
    """torchtune 0.6.1 `ForwardKLLoss` on the fused kernels: −Σ_kept Σ_v p·log q [/ kept rows].

    Args:
        ignore_index: label value of rows to skip (default -100).

    forward(student_logits [..., V], teacher_logits [..., V], labels (as many elements as rows),
    normalize=True) -> float32 scalar: the sum over kept rows of −Σ softmax(t)·log_softmax(s)
    (= KL(p‖q) + H(p)), divided by the number of kept rows when `normalize` (0 when none).
    Logits may be float32, bfloat16 or float16; the gradient reaches the student only.
    """

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, normalize: bool = True) -> Tensor:
        weight = _normaliser(labels, self.ignore_index, normalize)
        if weight is None:
            return torch.tensor(0.0, device=student_logits.device)
        return _kl_sum(student_logits, teacher_logits, labels, self.ignore_index, "forward", weight)


class ReverseKLLoss(nn.Module):
    """torchtune 0.6.1 `ReverseKLLoss` on the fused kernels: Σ_kept KL(q‖p) [/ kept rows].

    Args:
        ignore_index: label value of rows to skip (default -100).

    forward(student_logits [..., V], teacher_logits [..., V], labels, normalize=True) -> float32
    scalar, q = softmax(s), p = softmax(t); normalised by the kept-row count (0 when none).
    """

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, normalize: bool = True) -> Tensor:
        weight = _normaliser(labels, self.ignore_index, normalize)
        if weight is None:
            return torch.tensor(0.0, device=student_logits.device)
        return _kl_sum(student_logits, teacher_logits, labels, self.ignore_index, "reverse", weight)


class SymmetricKLLoss(nn.Module):
    """torchtune 0.6.1 `SymmetricKLLoss`: r·ForwardKLLoss + (1−r)·ReverseKLLoss.

    Args:
        sym_kd_ratio: r in [0, 1] (default 0.5); ValueError outside, as in torchtune.
        ignore_index: label value of rows to skip (default -100).

    forward(student_logits, teacher_logits, labels, normalize=True) -> float32 scalar.
    """

    def __init__(self, sym_kd_ratio: float = 0.5, ignore_index: int = -100):
        super().__init__()
        if sym_kd_ratio < 0.0 or sym_kd_ratio > 1.0:
            raise ValueError("sym_kd_ratio must be in the range [0, 1]")
        self.ignore_index = ignore_index
        self.sym_kd_ratio = sym_kd_ratio

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, normalize: bool = True) -> Tensor:
        weight = _normaliser(labels, self.ignore_index, normalize)
        if weight is None:
            return torch.tensor(0.0, device=student_logits.device)
        return _symmetric_sum(student_logits, teacher_logits, labels, self.ignore_index, self.sym_kd_ratio, weight)


class _ChunkedOutputLoss(nn.Module):
    """Shared forward of the chunked variants: per-chunk sums over kept rows / all kept rows."""

    _zero_when_empty = False

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100):
        super().__init__()
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index

    def _chunk_sum(self, student: Tensor, teacher: Tensor, labels: Tensor, weight: float) -> Tensor:
        raise NotImplementedError

    def forward(self, student_logits: List[Tensor], teacher_logits: List[Tensor], labels: Tensor) -> Tensor:
        """student_logits, teacher_logits: lists of [B, T/c, V] chunks; labels [B, T] -> float32 scalar."""
        count = _kept(labels, self.ignore_index)
        if self._zero_when_empty and count == 0:
            return torch.tensor(0.0, device=student_logits[0].device)
        weight = 1.0 / count if count else 1.0
        label_chunks = labels.chunk(self.num_output_chunks, dim=1)
        total = 0.0
        for student, teacher, label_chunk in zip(student_logits, teacher_logits, label_chunks):
            total = total + self._chunk_sum(student, teacher, label_chunk.reshape(-1), weight)
        total = torch.as_tensor(total)
        return total if count else total / count  # 0 / 0: NaN, as torchtune


class ForwardKLWithChunkedOutputLoss(_ChunkedOutputLoss):
    """torchtune 0.6.1 `ForwardKLWithChunkedOutputLoss`: `ForwardKLLoss` summed over chunks.

    Args:
        num_output_chunks: c, the number of chunks labels [B, T] are split into along dim 1 (default 8).
        ignore_index: label value of rows to skip (default -100).

    forward(student_logits: list of [B, T/c, V], teacher_logits: same, labels [B, T]) -> float32
    scalar: the sum over chunks of −Σ p·log q over kept rows, divided by the kept rows (0 when none).
    """

    _zero_when_empty = True

    def _chunk_sum(self, student, teacher, labels, weight):
        return _kl_sum(student, teacher, labels, self.ignore_index, "forward", weight)


class ReverseKLWithChunkedOutputLoss(_ChunkedOutputLoss):
    """torchtune 0.6.1 `ReverseKLWithChunkedOutputLoss`: Σ_chunks Σ_kept KL(q‖p) / kept rows.

    Args: as `ForwardKLWithChunkedOutputLoss`. NaN when every label is ignored (as torchtune).
    """

    def _chunk_sum(self, student, teacher, labels, weight):
        return _kl_sum(student, teacher, labels, self.ignore_index, "reverse", weight)


class SymmetricKLWithChunkedOutputLoss(_ChunkedOutputLoss):
    """torchtune 0.6.1 `SymmetricKLWithChunkedOutputLoss`: chunked r·forward + (1−r)·reverse.

    Args:
        num_output_chunks: c (default 8).
        sym_kd_ratio: r in [0, 1] (default 0.5; ValueError outside).
        ignore_index: label value of rows to skip (default -100).

    forward(student_logits: list of [B, T/c, V], teacher_logits, labels [B, T]) -> float32 scalar;
    NaN when every label is ignored (as torchtune).
    """

    def __init__(self, num_output_chunks: int = 8, sym_kd_ratio: float = 0.5, ignore_index: int = -100):
        super().__init__(num_output_chunks, ignore_index)
        if sym_kd_ratio < 0.0 or sym_kd_ratio > 1.0:
            raise ValueError("sym_kd_ratio must be in the range [0, 1]")
        self.sym_kd_ratio = sym_kd_ratio

    def _chunk_sum(self, student, teacher, labels, weight):
        return _symmetric_sum(student, teacher, labels, self.ignore_index, self.sym_kd_ratio, weight)
