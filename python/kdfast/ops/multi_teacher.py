"""The fused multi-teacher KD loss ops: `kdfast::multi_teacher_kd_forward` / `_backward`, and their autograd.

Contract (inputs already validated and shaped by `kdfast.functional.multi_teacher_kd_loss`):
- student [rows, vocab] float32/bfloat16/float16 (or float64); teachers: a list of M tensors
  [rows, vocab] of one dtype among float32/bfloat16/float16 (all float64 with a float64
  student), each with a contiguous last dimension and its own row stride. The kernel gets
  the teachers' addresses and row strides as two lists of ints, so no [M, rows, vocab]
  stack is ever built.
- weights [M, rows] in the compute dtype (float64 for a float64 student, else float32),
  normalised to sum 1 over the teachers; any strides (an expanded [M, 1] is read with row
  stride 0). labels None or int64 [rows] contiguous.
- the forward body writes `loss` ([rows] for reduction "none", else 0-dim), `row_stats`
  [rows, base + per_teacher·M] (student maximum and log-sums, mixture aux, row loss, 0, then
  per teacher its maximum, log-sum and aux; see types.h) and `valid_rows` (0-dim count of
  rows whose label is not ignore_index), in the compute dtype. With a `grad_student` buffer
  (forward_kl on the CPU: contiguous [rows, vocab] in the compute dtype) it also writes the
  student gradient for grad_output = 1 in the same pass. Labels outside [0, vocab) that are
  not ignore_index raise ValueError on the CPU; CUDA gives NaN rows instead.
- the backward body writes the student gradient [rows, vocab] in the student dtype,
  multiplied by grad_output inside the kernel.
CPU, and CUDA when the core was built with CUDA kernels (at most the core's
`cuda_max_teachers` teachers). `MultiTeacherKDLossFunction` is the one autograd wrapper; with
create_graph=True its backward differentiates `differentiable_loss` (the same loss in plain
PyTorch, `kdfast.reference.multi_teacher`), so second-order gradients are exact.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from kdfast.contract.options import KDOptions, compute_dtype
from kdfast.ops._buffers import gradient_buffer
from kdfast.ops._native import device_and_stream, facts, native_module, row_stats_width
from kdfast.ops._op import creating_graph, define_op, differentiable_gradients, launch
from kdfast.reference import multi_teacher as multi_teacher_reference

__all__ = ["MultiTeacherKDLossFunction", "differentiable_loss", "forward_outputs", "multi_teacher_kd_backward",
           "multi_teacher_kd_forward", "multi_teacher_kd_loss"]


def _common_arguments(student: Tensor, teachers: List[Tensor], weights: Tensor, labels: Optional[Tensor],
                      options: KDOptions) -> dict:
    rows, vocab = student.shape
    codes = facts()
    device_index, stream = device_and_stream(student)
    return dict(
        student=student.data_ptr(), student_dtype=codes.dtype_codes[student.dtype],
        student_row_stride=student.stride(0),
        teachers=[teacher.data_ptr() for teacher in teachers],
        teacher_row_strides=[teacher.stride(0) for teacher in teachers],
        teacher_dtype=codes.dtype_codes[teachers[0].dtype], weights=weights.data_ptr(),
        weight_teacher_stride=weights.stride(0), weight_row_stride=weights.stride(1),
        labels=labels.data_ptr() if labels is not None else 0, rows=rows, vocab=vocab,
        combine=codes.combine_codes[options.combine], divergence=codes.divergence_codes[options.divergence],
        reduction=codes.reduction_codes[options.reduction], temperature=options.temperature, alpha=options.alpha,
        beta=options.beta, label_smoothing=options.label_smoothing, divergence_scale=options.divergence_scale,
        ignore_index=options.ignore_index, num_threads=torch.get_num_threads(), device_index=device_index,
        stream=stream,
    )


def forward_body(student: Tensor, teachers: List[Tensor], weights: Tensor, labels: Optional[Tensor], loss: Tensor,
                 row_stats: Tensor, valid_rows: Tensor, grad_student: Optional[Tensor], options: KDOptions) -> None:
    """Writes `loss`, `row_stats`, `valid_rows` and, when given, `grad_student` (module contract)."""
    vocab = student.shape[1]
    bad_labels = native_module().multi_teacher_forward(
        loss=loss.data_ptr(), row_stats=row_stats.data_ptr(), valid_rows=valid_rows.data_ptr(),
        grad_student=grad_student.data_ptr() if grad_student is not None else 0,
        **_common_arguments(student, teachers, weights, labels, options))
    if bad_labels:
        bad = labels[(labels != options.ignore_index) & ((labels < 0) | (labels >= vocab))]
        raise ValueError(
            f"multi_teacher_kd_loss: labels out of range: {bad_labels} label(s) outside [0, {vocab}) that are not "
            f"ignore_index={options.ignore_index}, e.g. {bad[:5].tolist()}"
        )


def backward_body(grad_output: Tensor, student: Tensor, teachers: List[Tensor], weights: Tensor,
                  labels: Optional[Tensor], row_stats: Tensor, valid_rows: Tensor, grad_student: Tensor,
                  options: KDOptions) -> None:
    """Writes d(grad_output · loss)/d student into `grad_student` ([rows, vocab], contiguous)."""
    grad_output = grad_output.to(row_stats.dtype).contiguous()
    native_module().multi_teacher_backward(
        grad_output=grad_output.data_ptr(), grad_output_stride=1 if options.reduction == "none" else 0,
        row_stats=row_stats.data_ptr(), valid_rows=valid_rows.data_ptr(), grad_student=grad_student.data_ptr(),
        **_common_arguments(student, teachers, weights, labels, options))


multi_teacher_kd_forward = define_op("kdfast::multi_teacher_kd_forward", forward_body,
                                     mutates=("loss", "row_stats", "valid_rows", "grad_student"))
multi_teacher_kd_backward = define_op("kdfast::multi_teacher_kd_backward", backward_body, mutates=("grad_student",))


def forward_outputs(student: Tensor, num_teachers: int, options: KDOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, row_stats, valid_rows), allocated for `forward_body` with `num_teachers` teachers."""
    rows = student.shape[0]
    dtype = compute_dtype(student)
    loss = student.new_empty((rows,) if options.reduction == "none" else (), dtype=dtype)
    row_stats = student.new_empty((rows, row_stats_width("multi_teacher", num_teachers)), dtype=dtype)
    return loss, row_stats, student.new_empty((), dtype=dtype)


def differentiable_loss(student: Tensor, teachers: List[Tensor], weights: Tensor, labels: Optional[Tensor],
                        options: KDOptions) -> Tensor:
    """The loss `forward_body` computes, written with differentiable PyTorch operations
    (`kdfast.reference.multi_teacher`): twice differentiable in the student. Reads the labels
    and weights (checked as in eager calls)."""
    return multi_teacher_reference.multi_teacher_kd_loss(
        student, teachers, labels, weights=weights, combine=options.combine, reduction=options.reduction,
        **options.row_options())


class MultiTeacherKDLossFunction(torch.autograd.Function):
    """`apply(student, weights, labels, options, *teachers) -> loss`.

    Teachers come last so that autograd sees them as tensors (constants here). In eager mode,
    with forward_kl on the CPU and a student that needs a gradient, the forward kernel also
    writes the gradient for grad_output = 1 (one pass over the inputs instead of two; the
    buffer has the student's shape in the compute dtype, whatever M is), and the backward
    pass only scales it; a second backward (retain_graph) recomputes it with the backward
    kernel. Under torch.compile the backward kernel computes the gradient.
    """

    @staticmethod
    def forward(ctx, student: Tensor, weights: Tensor, labels: Optional[Tensor], options: KDOptions,
                *teachers: Tensor) -> Tensor:
        teachers = list(teachers)
        loss, row_stats, valid_rows = forward_outputs(student, len(teachers), options)
        grad_buffer = None
        if (ctx.needs_input_grad[0] and options.divergence == "forward_kl" and student.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            grad_buffer = torch.empty(student.shape, dtype=compute_dtype(student), device=student.device)
        launch(multi_teacher_kd_forward, forward_body,
               (student, teachers, weights, labels, loss, row_stats, valid_rows, grad_buffer), options)
        ctx.save_for_backward(student, weights, labels, row_stats, valid_rows, *teachers)
        ctx.options = options
        ctx.grad_buffer = grad_buffer
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        student, weights, labels, row_stats, valid_rows, *teachers = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[0] and creating_graph():  # second-order gradients: a differentiable recomputation
            ctx.grad_buffer = None
            grad_student, = differentiable_gradients(
                lambda: differentiable_loss(student, teachers, weights, labels, ctx.options), (student,), (True,),
                grad_loss)
        elif ctx.needs_input_grad[0]:
            grad_buffer, ctx.grad_buffer = ctx.grad_buffer, None
            if grad_buffer is not None:
                grad_loss = grad_loss.to(grad_buffer.dtype)
                if grad_loss.dim() == 1:  # reduction "none": one factor per row
                    grad_buffer.mul_(grad_loss.unsqueeze(1))
                elif float(grad_loss) != 1.0:
                    grad_buffer.mul_(grad_loss)
                grad_student = grad_buffer.to(student.dtype)
            else:
                grad_student = gradient_buffer(student.shape, student.dtype, student.device)
                launch(multi_teacher_kd_backward, backward_body, (grad_loss, student, teachers, weights, labels,
                                                                  row_stats, valid_rows, grad_student), ctx.options)
        return (grad_student, None, None, None) + (None,) * len(teachers)


def multi_teacher_kd_loss(student: Tensor, teachers: List[Tensor], weights: Tensor, labels: Optional[Tensor],
                          options: KDOptions) -> Tensor:
    """The fused multi-teacher loss of [rows, vocab] inputs through `MultiTeacherKDLossFunction`."""
    options.require_not_dense_only("multi_teacher_kd_loss")
    return MultiTeacherKDLossFunction.apply(student, weights, labels, options, *teachers)
