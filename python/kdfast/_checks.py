"""Input validation for the knowledge-distillation losses.

`check_kd_inputs` is shared by `kdfast.functional` and `kdfast.reference`. It looks only
at metadata (types, shapes, dtypes, devices) and at Python-scalar options, never at tensor
data, so it runs inside `torch.compile(fullgraph=True)` without a graph break or a device
synchronisation. Wrong tensor dtypes raise `TypeError`; every other bad input raises
`ValueError`. Each message names the argument and shows the shapes, dtypes or values seen.
`check_label_range` reads label data and is therefore used by the reference
implementation only; the compiled kernels check label range on the device themselves.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "none", "batchmean")

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _shape(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape)


def _is_real_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_logits_tensor(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"kd_loss: {name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(
            f"kd_loss: {name} must be a floating tensor (float32, bfloat16, float16 or float64), "
            f"got dtype {logits.dtype} ({name}.shape={_shape(logits)})"
        )
    if logits.dim() == 0:
        raise ValueError(f"kd_loss: {name} must have shape [..., V] with at least one dimension, got a 0-dim tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"kd_loss: {name} has vocab size 0 ({name}.shape={_shape(logits)}); V must be at least 1")


def _check_number_option(name: str, value) -> None:
    if not _is_real_number(value):
        raise TypeError(f"kd_loss: {name} must be a Python number, got {type(value).__name__} ({value!r})")


def check_kd_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> None:
    """Validates the arguments of a dense KD loss call using metadata only.

    Args:
        student_logits: floating tensor [..., V].
        teacher_logits: floating tensor with the same shape as `student_logits` (its dtype may differ).
        labels: int64 tensor with the leading shape of `student_logits`, or None.
        divergence: one of `DIVERGENCES`.
        temperature: finite T > 0.
        alpha: cross-entropy weight in [0, 1]; alpha > 0 requires labels.
        beta: JSD mixture weight in (0, 1); checked only for divergence "jsd".
        ignore_index: integer label value marking rows that contribute nothing.
        reduction: one of `REDUCTIONS`.
        label_smoothing: ε in [0, 1).

    Raises:
        TypeError: a logits tensor is not float32/bfloat16/float16/float64, labels are not
            int64, or a scalar option has the wrong Python type.
        ValueError: any other invalid shape, device or option value.
    """
    _check_logits_tensor("student_logits", student_logits)
    _check_logits_tensor("teacher_logits", teacher_logits)

    student_shape = _shape(student_logits)
    teacher_shape = _shape(teacher_logits)
    both_shapes = f"(student_logits.shape={student_shape}, teacher_logits.shape={teacher_shape})"
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(
            f"kd_loss: teacher_logits has vocab size {teacher_logits.shape[-1]} but student_logits has "
            f"{student_logits.shape[-1]} {both_shapes}"
        )
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"kd_loss: teacher_logits has leading (row) shape {teacher_shape[:-1]} but student_logits has "
            f"{student_shape[:-1]} {both_shapes}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"kd_loss: student_logits and teacher_logits must be on the same device, got "
            f"student_logits on {student_logits.device} and teacher_logits on {teacher_logits.device}"
        )

    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"kd_loss: labels must be a torch.Tensor of dtype torch.int64 or None, got {type(labels).__name__}")
        if labels.dtype != torch.int64:
            raise TypeError(
                f"kd_loss: labels must have dtype torch.int64 (torch.long), got {labels.dtype} "
                f"(labels.shape={_shape(labels)}); other integer dtypes are not accepted, convert with labels.long()"
            )
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"kd_loss: labels.shape={_shape(labels)} must equal the leading shape of student_logits "
                f"{student_shape[:-1]} (student_logits.shape={student_shape})"
            )
        if labels.device != student_logits.device:
            raise ValueError(
                f"kd_loss: labels must be on the same device as student_logits, got labels on {labels.device} "
                f"and student_logits on {student_logits.device}"
            )

    if divergence not in DIVERGENCES:
        raise ValueError(f"kd_loss: divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"kd_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")

    _check_number_option("temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"kd_loss: temperature must be finite and > 0, got temperature={temperature!r}")

    _check_number_option("alpha", alpha)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"kd_loss: alpha must be in [0, 1], got alpha={alpha!r}")
    if alpha > 0 and labels is None:
        raise ValueError(
            f"kd_loss: alpha={alpha!r} > 0 weights a hard-label cross-entropy, so labels must be given (got labels=None)"
        )

    _check_number_option("beta", beta)
    if divergence == "jsd" and not (0.0 < beta < 1.0):
        raise ValueError(f"kd_loss: beta must be in (0, 1) for divergence 'jsd', got beta={beta!r}")

    _check_number_option("label_smoothing", label_smoothing)
    if not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"kd_loss: label_smoothing must be in [0, 1), got label_smoothing={label_smoothing!r}")

    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"kd_loss: ignore_index must be a Python int, got {type(ignore_index).__name__} ({ignore_index!r})")


def check_label_range(labels: Optional[torch.Tensor], vocab_size: int, ignore_index: int) -> None:
    """Raises ValueError unless every label is `ignore_index` or lies in [0, vocab_size).

    Reads tensor data (one device synchronisation), so it is for the reference path only.
    """
    if labels is None or labels.numel() == 0:
        return
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(out_of_range.any()):
        offending_value = int(labels[out_of_range].reshape(-1)[0])
        count = int(out_of_range.sum())
        raise ValueError(
            f"kd_loss: labels out of range: found label {offending_value} ({count} out-of-range label(s) in total); "
            f"labels must be in [0, {vocab_size}) for vocab size V={vocab_size}, or equal ignore_index={ignore_index}"
        )
