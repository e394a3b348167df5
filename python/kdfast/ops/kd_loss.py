"""Custom ops of the dense KD loss: `kdfast::kd_loss_forward` and `kdfast::kd_loss_backward`.

Contract (inputs already validated and shaped by kdfast.functional):
- student [rows, vocab] and teacher [rows, vocab]: float32/bfloat16/float16, or both float64;
  last dimension contiguous, any row stride; labels None or int64 [rows] contiguous.
- forward returns (loss, row_stats, valid_rows), all in the compute dtype (float64 for
  float64 inputs, else float32): loss is [rows] for reduction "none" else 0-dim; row_stats
  [rows, 8] holds per row what the backward pass reuses (the maxima of t and s, the log-sums
  of exp((t - max)/T), exp((s - max)/T) and exp(s - max), a divergence-specific value), then
  the row loss and a zero; valid_rows (0-dim) counts rows whose label is
  not ignore_index (the "mean" denominator, read by the backward kernel on the device).
  Labels outside [0, vocab) that are not ignore_index raise ValueError on the CPU; on CUDA
  (no host synchronisation) their rows' loss and gradient are NaN instead.
- backward returns the student gradient [rows, vocab], contiguous, in the student dtype,
  already multiplied by grad_output (read by the kernel; no host synchronisation).
`forward_impl` / `backward_impl` are the bodies; `EagerKDLoss` runs them without the
dispatcher for eager mode.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdfast.ops._native import (
    DIVERGENCE_CODES,
    DTYPE_CODES,
    REDUCTION_CODES,
    compute_dtype,
    device_and_stream,
    divergence_scale,
    native_module,
)

ROW_STATS = 8


def forward_impl(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    divergence: str,
    reduction: str,
    temperature: float,
    alpha: float,
    beta: float,
    label_smoothing: float,
    t2_scale: bool,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    rows, vocab = student.shape
    dtype = compute_dtype(student)
    loss = torch.empty((rows,) if reduction == "none" else (), dtype=dtype, device=student.device)
    row_stats = torch.empty((rows, ROW_STATS), dtype=dtype, device=student.device)
    valid_rows = torch.empty((), dtype=dtype, device=student.device)
    device_index, stream = device_and_stream(student)
    bad_labels = native_module().kd_forward(
        student.data_ptr(), DTYPE_CODES[student.dtype], student.stride(0),
        teacher.data_ptr(), DTYPE_CODES[teacher.dtype], teacher.stride(0),
        labels.data_ptr() if labels is not None else 0, rows, vocab,
        DIVERGENCE_CODES[divergence], REDUCTION_CODES[reduction], temperature, alpha, beta,
        label_smoothing, divergence_scale(temperature, t2_scale), ignore_index,
        loss.data_ptr(), row_stats.data_ptr(), valid_rows.data_ptr(), torch.get_num_threads(), device_index, stream,
    )
    if bad_labels:
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= vocab))]
        raise ValueError(
            f"kd_loss: labels out of range: {bad_labels} label(s) outside [0, {vocab}) that are not "
            f"ignore_index={ignore_index}, e.g. {bad[:5].tolist()}"
        )
    return loss, row_stats, valid_rows


@torch.library.custom_op("kdfast::kd_loss_forward", mutates_args=(), device_types=("cpu", "cuda"))
def kd_loss_forward(
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    divergence: str,
    reduction: str,
    temperature: float,
    alpha: float,
    beta: float,
    label_smoothing: float,
    t2_scale: bool,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return forward_impl(student, teacher, labels, divergence, reduction, temperature, alpha, beta, label_smoothing,
                        t2_scale, ignore_index)


@kd_loss_forward.register_fake
def _(student, teacher, labels, divergence, reduction, temperature, alpha, beta, label_smoothing, t2_scale,
      ignore_index):
    rows = student.shape[0]
    dtype = compute_dtype(student)
    loss = student.new_empty((rows,) if reduction == "none" else (), dtype=dtype)
    return loss, student.new_empty((rows, ROW_STATS), dtype=dtype), student.new_empty((), dtype=dtype)


def backward_impl(
    grad_output: Tensor,
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    row_stats: Tensor,
    valid_rows: Tensor,
    divergence: str,
    reduction: str,
    temperature: float,
    alpha: float,
    beta: float,
    label_smoothing: float,
    t2_scale: bool,
    ignore_index: int,
    out: Optional[Tensor] = None,
) -> Tensor:
    """The gradient into a new tensor, or into `out` ([rows, vocab] contiguous, student dtype).

    `out` may be `student` itself: each gradient element is written after its logit was read.
    """
    rows, vocab = student.shape
    grad_student = torch.empty((rows, vocab), dtype=student.dtype, device=student.device) if out is None else out
    grad_output = grad_output.to(row_stats.dtype).contiguous()
    device_index, stream = device_and_stream(student)
    native_module().kd_backward(
        grad_output.data_ptr(), 1 if reduction == "none" else 0,
        student.data_ptr(), DTYPE_CODES[student.dtype], student.stride(0),
        teacher.data_ptr(), DTYPE_CODES[teacher.dtype], teacher.stride(0),
        labels.data_ptr() if labels is not None else 0, rows, vocab,
        DIVERGENCE_CODES[divergence], REDUCTION_CODES[reduction], temperature, alpha, beta,
        label_smoothing, divergence_scale(temperature, t2_scale), ignore_index,
        row_stats.data_ptr(), valid_rows.data_ptr(), grad_student.data_ptr(), torch.get_num_threads(), device_index, stream,
    )
    return grad_student


@torch.library.custom_op("kdfast::kd_loss_backward", mutates_args=(), device_types=("cpu", "cuda"))
def kd_loss_backward(
    grad_output: Tensor,
    student: Tensor,
    teacher: Tensor,
    labels: Optional[Tensor],
    row_stats: Tensor,
    valid_rows: Tensor,
    divergence: str,
    reduction: str,
    temperature: float,
    alpha: float,
    beta: float,
    label_smoothing: float,
    t2_scale: bool,
    ignore_index: int,
) -> Tensor:
    return backward_impl(grad_output, student, teacher, labels, row_stats, valid_rows, divergence, reduction,
                         temperature, alpha, beta, label_smoothing, t2_scale, ignore_index)


@kd_loss_backward.register_fake
def _(grad_output, student, teacher, labels, row_stats, valid_rows, divergence, reduction, temperature, alpha, beta,
      label_smoothing, t2_scale, ignore_index):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, teacher, labels, *options = inputs
    _, row_stats, valid_rows = output
    ctx.save_for_backward(student, teacher, labels, row_stats, valid_rows)
    ctx.options = options


def _backward(ctx, grad_loss, grad_row_stats, grad_valid_rows):
    student, teacher, labels, row_stats, valid_rows = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = kd_loss_backward(grad_loss, student, teacher, labels, row_stats, valid_rows, *ctx.options)
    return (grad_student,) + (None,) * 10


kd_loss_forward.register_autograd(_backward, setup_context=_setup_context)


class EagerKDLoss(torch.autograd.Function):
    """The same computation as the custom ops, for eager mode without the dispatcher.

    `torch.library` custom ops cost tens of microseconds per call in Python-side dispatch;
    outside `torch.compile` kdfast.functional calls this Function instead, which runs the
    very same `forward_impl` / `backward_impl`. Under compilation the custom ops are used.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, *options):
        loss, row_stats, valid_rows = forward_impl(student, teacher, labels, *options)
        ctx.save_for_backward(student, teacher, labels, row_stats, valid_rows)
        ctx.options = options
        ctx.mark_non_differentiable(row_stats, valid_rows)
        return loss, row_stats, valid_rows

    @staticmethod
    def backward(ctx, grad_loss, grad_row_stats, grad_valid_rows):
        student, teacher, labels, row_stats, valid_rows = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[0]:
            grad_student = backward_impl(grad_loss, student, teacher, labels, row_stats, valid_rows, *ctx.options)
        return (grad_student,) + (None,) * (2 + len(ctx.options))
