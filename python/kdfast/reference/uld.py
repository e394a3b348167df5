"""Universal Logit Distillation (ULD) in plain PyTorch: the float64 oracle, its checks and sizes.

ULD (Boizard et al., 2024) compares a student and a teacher whose vocabularies differ: per
row, both probability vectors are sorted in descending order, the shorter is padded with
zeros, and the loss is the L1 distance between them. `uld_loss` computes it from that
definition with a full stable sort in float64. With `k` it computes the top-k form of
`kdfast.functional.uld_loss` from the same full sort: the first K sorted entries of each side
are compared, and the remaining mass of each side enters as one term |A − B| (a lower bound
of the exact remainder; see `uld_sizes`). This module also holds the argument checks and the
size rule that `kdfast.functional.uld_loss` shares, so both agree by construction. It imports
only `kdfast.contract`.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from kdfast.contract.reductions import ROW_REDUCTIONS, reduce_rows
from kdfast.contract.softlabels import SoftLabels
from kdfast.contract.validation import ArgumentNames, check_logits_tensor, check_temperature

__all__ = ["ULD_NAMES", "ULDSizes", "check_uld_inputs", "uld_loss", "uld_loss_rows", "uld_sizes"]

ULD_NAMES = ArgumentNames("uld_loss", "student_logits", "teacher")


@dataclasses.dataclass(frozen=True)
class ULDSizes:
    """How many sorted entries of each side a row of the ULD loss reads.

    Attributes:
        student_k: sorted student probabilities kept (≤ V_s).
        teacher_k: sorted teacher probabilities available (≤ V_t; the soft labels' k).
        compared: K, the length of the compared sorted prefix. Entries of a side beyond its
            kept ones inside the prefix are zeros (a complete side of a smaller vocabulary);
            teacher entries beyond K join the teacher's remaining mass.
        exact: True when both sides keep their whole vocabulary (the loss is exact ULD).
    """

    student_k: int
    teacher_k: int
    compared: int
    exact: bool


def uld_sizes(student_vocab: int, teacher_vocab: int, k: Optional[int], teacher_k: Optional[int] = None) -> ULDSizes:
    """The size rule of the top-k ULD loss.

    A side is complete when it keeps its whole vocabulary (its sorted vector beyond the kept
    entries is known: zeros). The teacher keeps `teacher_k` (soft labels) or min(k, V_t)
    entries (all with k=None). The student keeps min(k, V_s), at most the teacher's count when
    the teacher is incomplete (entries past it could not be compared). K is the largest kept
    count when both sides are complete (exact ULD), else the smallest kept count among the
    incomplete sides. Beyond K only each side's remaining mass A, B is known, and the loss
    adds |A − B|, a lower bound of the exact Σ_{i≥K} |a_i − b_i| (triangle inequality); the
    exact remainder is at most A + B, so exact − approximate ≤ 2·min(A, B).
    """
    if teacher_k is None:
        teacher_k = teacher_vocab if k is None else min(k, teacher_vocab)
    teacher_complete = teacher_k == teacher_vocab
    student_k = student_vocab if k is None else min(k, student_vocab)
    if not teacher_complete:
        student_k = min(student_k, teacher_k)
    student_complete = student_k == student_vocab
    if student_complete and teacher_complete:
        compared = max(student_k, teacher_k)
    else:
        compared = min(size for size, complete in ((student_k, student_complete), (teacher_k, teacher_complete))
                       if not complete)
    return ULDSizes(student_k, teacher_k, compared, student_complete and teacher_complete)


def _require_number(name: str, value) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"uld_loss: {name} must be a Python number, got {type(value).__name__} ({value!r})")


def check_uld_inputs(student_logits, teacher, *, k, student_temperature, teacher_temperature, mask,
                     reduction) -> float:
    """Checks the arguments of `uld_loss` from metadata only; returns the teacher temperature.

    Raises TypeError for wrong types and dtypes, ValueError for everything else (shapes, k,
    temperatures, reduction, devices), each message opening with `uld_loss:`.
    """
    check_logits_tensor("student_logits", student_logits, ULD_NAMES)
    leading = tuple(student_logits.shape[:-1])
    if isinstance(teacher, SoftLabels):
        if tuple(teacher.shape) != leading:
            raise ValueError(f"uld_loss: teacher soft labels have leading shape {tuple(teacher.shape)}, but "
                             f"student_logits has leading shape {leading} (student_logits.shape="
                             f"{tuple(student_logits.shape)})")
        if teacher.device != student_logits.device:
            raise ValueError(f"uld_loss: teacher is on {teacher.device} but student_logits is on "
                             f"{student_logits.device}")
        if teacher_temperature is None:
            teacher_temperature = teacher.temperature
        else:
            _require_number("teacher_temperature", teacher_temperature)
            if float(teacher_temperature) != teacher.temperature:
                raise ValueError(f"uld_loss: teacher_temperature={teacher_temperature!r} differs from the soft "
                                 f"labels' temperature {teacher.temperature!r}; stored log-probabilities cannot be "
                                 "moved to another temperature (pass None)")
    elif isinstance(teacher, torch.Tensor):
        check_logits_tensor("teacher", teacher, ULD_NAMES)
        if tuple(teacher.shape[:-1]) != leading:
            raise ValueError(f"uld_loss: teacher has leading shape {tuple(teacher.shape[:-1])}, but student_logits "
                             f"has {leading} (teacher.shape={tuple(teacher.shape)}, student_logits.shape="
                             f"{tuple(student_logits.shape)}); the vocabularies may differ, the rows may not")
        if teacher.device != student_logits.device:
            raise ValueError(f"uld_loss: teacher is on {teacher.device} but student_logits is on "
                             f"{student_logits.device}")
        teacher_temperature = 1.0 if teacher_temperature is None else teacher_temperature
    else:
        raise TypeError(f"uld_loss: teacher must be a torch.Tensor of logits or a kdfast.SoftLabels, got "
                        f"{type(teacher).__name__}")
    _require_number("student_temperature", student_temperature)
    _require_number("teacher_temperature", teacher_temperature)
    check_temperature("uld_loss", student_temperature)
    check_temperature("uld_loss", teacher_temperature)
    if k is not None:
        if not isinstance(k, numbers.Integral) or isinstance(k, bool):
            raise TypeError(f"uld_loss: k must be an int or None, got {type(k).__name__} ({k!r})")
        if k < 1:
            raise ValueError(f"uld_loss: k must be at least 1 (or None for the exact loss), got k={k}")
    if reduction not in ROW_REDUCTIONS:
        raise ValueError(f"uld_loss: reduction must be one of {ROW_REDUCTIONS}, got {reduction!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"uld_loss: mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"uld_loss: mask must have dtype torch.bool, got {mask.dtype}")
        if tuple(mask.shape) != leading:
            raise ValueError(f"uld_loss: mask must have the leading shape {leading} of student_logits, got "
                             f"{tuple(mask.shape)}")
        if mask.device != student_logits.device:
            raise ValueError(f"uld_loss: mask is on {mask.device} but student_logits is on {student_logits.device}")
    return float(teacher_temperature)


def uld_loss_rows(student_logits: Tensor, teacher: Union[Tensor, SoftLabels], *, k: Optional[int] = None,
                  student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> Tensor:
    """Per-row ULD loss [...] in float64, from a full stable sort of each side (no checks).

    Differentiable in `student_logits` by autograd through `torch.sort`.
    """
    student_vocab = student_logits.shape[-1]
    q = torch.softmax(student_logits.to(torch.float64) / student_temperature, dim=-1)
    a = torch.sort(q, dim=-1, descending=True, stable=True).values
    if isinstance(teacher, SoftLabels):
        b = teacher.logprobs.detach().to(torch.float64).exp()
        teacher_tail = teacher.tail_logprob.detach().to(torch.float64).exp()
        sizes = uld_sizes(student_vocab, teacher.vocab_size, k, teacher.k)
    else:
        p = torch.softmax(teacher.detach().to(torch.float64) / teacher_temperature, dim=-1)
        b = torch.sort(p, dim=-1, descending=True, stable=True).values
        sizes = uld_sizes(student_vocab, teacher.shape[-1], k)
        teacher_tail = b[..., sizes.teacher_k:].sum(-1)
        b = b[..., :sizes.teacher_k]
    compared = sizes.compared
    student_head = torch.nn.functional.pad(a[..., :compared], (0, max(0, compared - a.shape[-1])))
    teacher_head = torch.nn.functional.pad(b[..., :compared], (0, max(0, compared - b.shape[-1])))
    student_rest = a[..., compared:].sum(-1)
    teacher_rest = b[..., compared:].sum(-1) + teacher_tail
    return (student_head - teacher_head).abs().sum(-1) + (student_rest - teacher_rest).abs()


def uld_loss(student_logits: Tensor, teacher: Union[Tensor, SoftLabels], *, k: Optional[int] = None,
             student_temperature: float = 1.0, teacher_temperature: Optional[float] = None,
             mask: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """ULD loss in float64 from its definition; see `kdfast.functional.uld_loss` for the contract.

    Args:
        student_logits: [..., V_s] floating. Receives the gradient (in its dtype).
        teacher: teacher logits [..., V_t] (any floating dtype, V_t may differ from V_s) or
            `SoftLabels` with leading shape [...]. Treated as a constant.
        k: None (exact ULD) or the number of sorted entries kept per side (`uld_sizes`).
        student_temperature, teacher_temperature: softmax temperatures (teacher: None means
            1.0 for logits and the soft labels' temperature for SoftLabels).
        mask: None or a bool [...] tensor; rows where it is False add 0 and get no gradient.
        reduction: "mean" (sum / number of rows in the mask), "sum", "batchmean" (sum / number
            of rows) or "none" ([...]).

    Returns:
        float64 loss: a scalar, or [...] for reduction="none".
    """
    teacher_temperature = check_uld_inputs(student_logits, teacher, k=k, student_temperature=student_temperature,
                                           teacher_temperature=teacher_temperature, mask=mask, reduction=reduction)
    if mask is not None:
        # masked rows are replaced before any arithmetic, so that whatever they hold never
        # reaches the loss or the gradient
        student_logits = torch.where(mask[..., None], student_logits, torch.zeros((), dtype=student_logits.dtype))
    rows = uld_loss_rows(student_logits, teacher, k=k, student_temperature=float(student_temperature),
                         teacher_temperature=teacher_temperature)
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows
    return reduce_rows(rows.reshape(-1), reduction, None if mask is None else mask.reshape(-1))

