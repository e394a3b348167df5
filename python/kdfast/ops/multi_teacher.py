"""Custom ops of the fused multi-teacher KD loss: `kdfast::multi_teacher_kd_forward` / `_backward`.

Contract (inputs already validated and shaped by `kdfast.functional.multi_teacher_kd_loss`):
- student [rows, vocab] float32/bfloat16/float16 (or float64); teachers: a list of M tensors
  [rows, vocab] of one dtype among float32/bfloat16/float16 (all float64 with a float64
  student), each with a contiguous last dimension and its own row stride. The kernel gets
  the teachers' addresses and row strides as two lists of ints, so no [M, rows, vocab]
  stack is ever built.
- weights [M, rows] in the compute dtype (float64 for a float64 student, else float32),
  normalised to sum 1 over the teachers; any strides (an expanded [M, 1] is read with row
  stride 0). labels None or int64 [rows] contiguous.
- forward returns (loss, row_stats, valid_rows) in the compute dtype: loss [rows] for
  reduction "none" else 0-dim; row_stats [rows, 6 + 3M] (student maximum and log-sums,
  mixture aux, row loss, 0, then per teacher its maximum, log-sum and aux; see types.h);
  valid_rows (0-dim) counts rows whose label is not ignore_index. Labels outside
  [0, vocab) that are not ignore_index raise ValueError.
- backward returns the student gradient [rows, vocab], contiguous, in the student dtype,
  multiplied by grad_output inside the kernel.
CPU, and CUDA when the core was built with CUDA kernels (at most MAX_CUDA_TEACHERS
teachers; they run on the current stream and give NaN rows for out-of-range labels instead
of raising). The functional falls back to `kdfast.methods.multi_teacher_kd_loss` elsewhere.
`EagerMultiTeacherKDLoss` runs the same bodies without the dispatcher for eager mode.
"""

from __future__ import annotations

from typing import List, Optional

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

# Most teachers the CUDA kernels take (their addresses travel in the kernel parameters).
MAX_CUDA_TEACHERS = 16

COMBINE_CODES = {"sum": 0, "mixture": 1}
ROW_STATS_BASE = 6
ROW_STATS_PER_TEACHER = 3


def row_stats_width(num_teachers: int) -> int:
    return ROW_STATS_BASE + ROW_STATS_PER_TEACHER * num_teachers


def _common_arguments(student: Tensor, teachers: List[Tensor], weights: Tensor, labels: Optional[Tensor],
                      combine: str, divergence: str, reduction: str, temperature: float, alpha: float, beta: float,
                      label_smoothing: float, t2_scale: bool, ignore_index: int) -> dict:
    rows, vocab = student.shape
    device_index, stream = device_and_stream(student)
    return dict(
        student=student.data_ptr(), student_dtype=DTYPE_CODES[student.dtype], student_row_stride=student.stride(0),
        teachers=[teacher.data_ptr() for teacher in teachers],
        teacher_row_strides=[teacher.stride(0) for teacher in teachers],
        teacher_dtype=DTYPE_CODES[teachers[0].dtype], weights=weights.data_ptr(),
        weight_teacher_stride=weights.stride(0), weight_row_stride=weights.stride(1),
        labels=labels.data_ptr() if labels is not None else 0, rows=rows, vocab=vocab,
        combine=COMBINE_CODES[combine], divergence=DIVERGENCE_CODES[divergence], reduction=REDUCTION_CODES[reduction],
        temperature=temperature, alpha=alpha, beta=beta, label_smoothing=label_smoothing,
        divergence_scale=divergence_scale(temperature, t2_scale), ignore_index=ignore_index,
        num_threads=torch.get_num_threads(), device_index=device_index, stream=stream,
    )


def forward_impl(student: Tensor, teachers: List[Tensor], weights: Tensor, labels: Optional[Tensor], combine: str,
                 divergence: str, reduction: str, temperature: float, alpha: float, beta: float,
                 label_smoothing: float, t2_scale: bool, ignore_index: int,
                 grad_student: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The forward kernel; with `grad_student` (forward_kl only: a contiguous [rows, vocab]
    tensor in the compute dtype) it also writes the student gradient for grad_output = 1."""
    rows, vocab = student.shape
    dtype = compute_dtype(student)
    loss = torch.empty((rows,) if reduction == "none" else (), dtype=dtype, device=student.device)
    row_stats = torch.empty((rows, row_stats_width(len(teachers))), dtype=dtype, device=student.device)
    valid_rows = torch.empty((), dtype=dtype, device=student.device)
    arguments = _common_arguments(student, teachers, weights, labels, combine, divergence, reduction, temperature,
                                  alpha, beta, label_smoothing, t2_scale, ignore_index)
    bad_labels = native_module().multi_teacher_forward(
        loss=loss.data_ptr(), row_stats=row_stats.data_ptr(), valid_rows=valid_rows.data_ptr(),
        grad_student=grad_student.data_ptr() if grad_student is not None else 0, **arguments)
    if bad_labels:
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= vocab))]
        raise ValueError(
            f"multi_teacher_kd_loss: labels out of range: {bad_labels} label(s) outside [0, {vocab}) that are not "
            f"ignore_index={ignore_index}, e.g. {bad[:5].tolist()}"
        )
    return loss, row_stats, valid_rows


def backward_impl(grad_output: Tensor, student: Tensor, teachers: List[Tensor], weights: Tensor,
                  labels: Optional[Tensor], row_stats: Tensor, valid_rows: Tensor, combine: str, divergence: str,
                  reduction: str, temperature: float, alpha: float, beta: float, label_smoothing: float,
                  t2_scale: bool, ignore_index: int) -> Tensor:
    grad_student = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    grad_output = grad_output.to(row_stats.dtype).contiguous()
    arguments = _common_arguments(student, teachers, weights, labels, combine, divergence, reduction, temperature,
                                  alpha, beta, label_smoothing, t2_scale, ignore_index)
    native_module().multi_teacher_backward(
        grad_output=grad_output.data_ptr(), grad_output_stride=1 if reduction == "none" else 0,
        row_stats=row_stats.data_ptr(), valid_rows=valid_rows.data_ptr(), grad_student=grad_student.data_ptr(),
        **arguments)
    return grad_student


@torch.library.custom_op("kdfast::multi_teacher_kd_forward", mutates_args=(), device_types=("cpu", "cuda"))
def multi_teacher_kd_forward(student: Tensor, teachers: List[Tensor], weights: Tensor, labels: Optional[Tensor],
                             combine: str, divergence: str, reduction: str, temperature: float, alpha: float,
                             beta: float, label_smoothing: float, t2_scale: bool,
                             ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    return forward_impl(student, teachers, weights, labels, combine, divergence, reduction, temperature, alpha, beta,
                        label_smoothing, t2_scale, ignore_index)


@multi_teacher_kd_forward.register_fake
def _(student, teachers, weights, labels, combine, divergence, reduction, temperature, alpha, beta, label_smoothing,
      t2_scale, ignore_index):
    rows = student.shape[0]
    dtype = compute_dtype(student)
    loss = student.new_empty((rows,) if reduction == "none" else (), dtype=dtype)
    row_stats = student.new_empty((rows, row_stats_width(len(teachers))), dtype=dtype)
    return loss, row_stats, student.new_empty((), dtype=dtype)


@torch.library.custom_op("kdfast::multi_teacher_kd_backward", mutates_args=(), device_types=("cpu", "cuda"))
def multi_teacher_kd_backward(grad_output: Tensor, student: Tensor, teachers: List[Tensor], weights: Tensor,
                              labels: Optional[Tensor], row_stats: Tensor, valid_rows: Tensor, combine: str,
                              divergence: str, reduction: str, temperature: float, alpha: float, beta: float,
                              label_smoothing: float, t2_scale: bool, ignore_index: int) -> Tensor:
    return backward_impl(grad_output, student, teachers, weights, labels, row_stats, valid_rows, combine, divergence,
                         reduction, temperature, alpha, beta, label_smoothing, t2_scale, ignore_index)


@multi_teacher_kd_backward.register_fake
def _(grad_output, student, teachers, weights, labels, row_stats, valid_rows, combine, divergence, reduction,
      temperature, alpha, beta, label_smoothing, t2_scale, ignore_index):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


NUM_OPTIONS = 9  # combine ... ignore_index


def _setup_context(ctx, inputs, output):
    student, teachers, weights, labels, *options = inputs
    _, row_stats, valid_rows = output
    ctx.save_for_backward(student, weights, labels, row_stats, valid_rows, *teachers)
    ctx.options = options
    ctx.num_teachers = len(teachers)


def _backward(ctx, grad_loss, grad_row_stats, grad_valid_rows):
    student, weights, labels, row_stats, valid_rows, *teachers = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = multi_teacher_kd_backward(grad_loss, student, teachers, weights, labels, row_stats, valid_rows,
                                                 *ctx.options)
    return (grad_student, [None] * ctx.num_teachers, None, None) + (None,) * NUM_OPTIONS


multi_teacher_kd_forward.register_autograd(_backward, setup_context=_setup_context)


class EagerMultiTeacherKDLoss(torch.autograd.Function):
    """The custom ops' computation for eager mode, without the dispatcher's per-call cost.

    `apply(student, weights, labels, options, *teachers)`: `options` is the tuple
    (combine, divergence, reduction, temperature, alpha, beta, label_smoothing, t2_scale,
    ignore_index); teachers come last so autograd sees them as tensors (constants here).

    With forward_kl and a student that needs a gradient, the forward kernel also writes the
    gradient for grad_output = 1 (one pass over the inputs instead of two; the buffer has
    the student's shape in the compute dtype, whatever M is), and the backward pass only
    scales it. A second backward (retain_graph) recomputes it with the backward kernel.
    """

    @staticmethod
    def forward(ctx, student, weights, labels, options, *teachers):
        divergence = options[1]
        grad_buffer = None
        if ctx.needs_input_grad[0] and divergence == "forward_kl" and student.device.type == "cpu":
            grad_buffer = torch.empty(student.shape, dtype=compute_dtype(student), device=student.device)
        loss, row_stats, valid_rows = forward_impl(student, list(teachers), weights, labels, *options,
                                                   grad_student=grad_buffer)
        ctx.save_for_backward(student, weights, labels, row_stats, valid_rows, *teachers)
        ctx.options = options
        ctx.grad_buffer = grad_buffer
        ctx.mark_non_differentiable(row_stats, valid_rows)
        return loss, row_stats, valid_rows

    @staticmethod
    def backward(ctx, grad_loss, grad_row_stats, grad_valid_rows):
        student, weights, labels, row_stats, valid_rows, *teachers = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[0]:
            grad_buffer, ctx.grad_buffer = ctx.grad_buffer, None
            if grad_buffer is not None:
                grad_loss = grad_loss.to(grad_buffer.dtype)
                if grad_loss.dim() == 1:  # reduction "none": one factor per row
                    grad_buffer.mul_(grad_loss.unsqueeze(1))
                elif float(grad_loss) != 1.0:
                    grad_buffer.mul_(grad_loss)
                grad_student = grad_buffer.to(student.dtype)
            else:
                grad_student = backward_impl(grad_loss, student, list(teachers), weights, labels, row_stats,
                                             valid_rows, *ctx.options)
        return (grad_student, None, None, None) + (None,) * len(teachers)
