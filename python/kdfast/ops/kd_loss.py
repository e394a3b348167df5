"""The dense KD loss ops: `kdfast::kd_loss_forward`, `kdfast::kd_loss_backward`, and their autograd.

Contract (inputs already validated and shaped by kdfast.functional):
- student [rows, vocab] and teacher [rows, vocab]: float32/bfloat16/float16, or both float64;
  last dimension contiguous, any row stride; labels None or int64 [rows] contiguous.
- the forward body writes `loss` ([rows] for reduction "none", else 0-dim), `row_stats`
  [rows, kd_row_stats] (per row what the backward pass reuses: the maxima of t and s, the
  log-sums of exp((t - max)/T), exp((s - max)/T) and exp(s - max), a divergence-specific
  value, the row loss) and `valid_rows` (0-dim count of rows whose label is not
  ignore_index, read by the backward kernel on the device), all in the compute dtype
  (float64 for float64 inputs, else float32). Labels outside [0, vocab) that are not
  ignore_index raise ValueError on the CPU; on CUDA (no host synchronisation) their rows'
  loss and gradient are NaN instead.
- the backward body writes the student gradient [rows, vocab] (contiguous, student dtype),
  already multiplied by grad_output (read by the kernel; no host synchronisation); it may
  write over `student` itself, each element after its logit was read.
`KDLossFunction` is the one autograd wrapper; `forward_outputs` allocates what the forward
body writes, so the chunked fused-linear loss can call the bodies on its own buffers. A
backward pass with create_graph=True differentiates `differentiable_loss` (the same loss in
plain PyTorch) instead of running the backward op, so second-order gradients are exact.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdfast.contract.options import KDOptions, compute_dtype
from kdfast.contract.reductions import reduce_rows
from kdfast.contract.validation import check_label_range
from kdfast.ops._native import device_and_stream, facts, native_module, row_stats_width
from kdfast.ops._op import creating_graph, define_op, differentiable_gradients, launch
from kdfast.reference import dense as dense_reference

__all__ = ["KDLossFunction", "backward_body", "differentiable_loss", "forward_body", "forward_outputs", "kd_loss",
           "kd_loss_backward", "kd_loss_forward"]


def _raise_bad_labels(count: int, labels: Tensor, vocab: int, ignore_index: int) -> None:
    bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= vocab))]
    raise ValueError(
        f"kd_loss: labels out of range: {count} label(s) outside [0, {vocab}) that are not "
        f"ignore_index={ignore_index}, e.g. {bad[:5].tolist()}"
    )


def forward_body(student: Tensor, teacher: Tensor, labels: Optional[Tensor], loss: Tensor, row_stats: Tensor,
                 valid_rows: Tensor, options: KDOptions) -> None:
    """Writes `loss`, `row_stats` and `valid_rows` (see the module contract)."""
    rows, vocab = student.shape
    codes = facts()
    device_index, stream = device_and_stream(student)
    bad_labels = native_module().kd_forward(
        student.data_ptr(), codes.dtype_codes[student.dtype], student.stride(0),
        teacher.data_ptr(), codes.dtype_codes[teacher.dtype], teacher.stride(0),
        labels.data_ptr() if labels is not None else 0, rows, vocab,
        codes.divergence_codes[options.divergence], codes.reduction_codes[options.reduction], options.temperature,
        options.alpha, options.beta, options.label_smoothing, options.divergence_scale, options.ignore_index,
        loss.data_ptr(), row_stats.data_ptr(), valid_rows.data_ptr(), torch.get_num_threads(), device_index, stream,
    )
    if bad_labels:
        _raise_bad_labels(bad_labels, labels, vocab, options.ignore_index)


def backward_body(grad_output: Tensor, student: Tensor, teacher: Tensor, labels: Optional[Tensor], row_stats: Tensor,
                  valid_rows: Tensor, grad_student: Tensor, options: KDOptions) -> None:
    """Writes d(grad_output · loss)/d student into `grad_student` ([rows, vocab], contiguous)."""
    rows, vocab = student.shape
    codes = facts()
    grad_output = grad_output.to(row_stats.dtype).contiguous()
    device_index, stream = device_and_stream(student)
    native_module().kd_backward(
        grad_output.data_ptr(), 1 if options.reduction == "none" else 0,
        student.data_ptr(), codes.dtype_codes[student.dtype], student.stride(0),
        teacher.data_ptr(), codes.dtype_codes[teacher.dtype], teacher.stride(0),
        labels.data_ptr() if labels is not None else 0, rows, vocab,
        codes.divergence_codes[options.divergence], codes.reduction_codes[options.reduction], options.temperature,
        options.alpha, options.beta, options.label_smoothing, options.divergence_scale, options.ignore_index,
        row_stats.data_ptr(), valid_rows.data_ptr(), grad_student.data_ptr(), torch.get_num_threads(), device_index,
        stream,
    )


kd_loss_forward = define_op("kdfast::kd_loss_forward", forward_body, mutates=("loss", "row_stats", "valid_rows"))
kd_loss_backward = define_op("kdfast::kd_loss_backward", backward_body, mutates=("grad_student",))


def forward_outputs(student: Tensor, options: KDOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, row_stats, valid_rows), allocated for `forward_body`."""
    rows = student.shape[0]
    dtype = compute_dtype(student)
    loss = student.new_empty((rows,) if options.reduction == "none" else (), dtype=dtype)
    return loss, student.new_empty((rows, row_stats_width("kd")), dtype=dtype), student.new_empty((), dtype=dtype)


def differentiable_loss(student: Tensor, teacher: Tensor, labels: Optional[Tensor], options: KDOptions) -> Tensor:
    """The loss `forward_body` computes, written with differentiable PyTorch operations
    (`kdfast.reference.dense`): twice differentiable in the student. Reads the labels (their
    range is checked, as the CPU kernels do)."""
    check_label_range(labels, student.shape[1], options.ignore_index)
    row_loss = dense_reference.kd_loss_rows(student, teacher, labels, **options.row_options())
    valid = labels != options.ignore_index if labels is not None else None
    return reduce_rows(row_loss, options.reduction, valid)


class KDLossFunction(torch.autograd.Function):
    """`apply(student, teacher, labels, options) -> loss`; the gradient flows to the student only."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, labels: Optional[Tensor], options: KDOptions) -> Tensor:
        loss, row_stats, valid_rows = forward_outputs(student, options)
        launch(kd_loss_forward, forward_body, (student, teacher, labels, loss, row_stats, valid_rows), options)
        ctx.save_for_backward(student, teacher, labels, row_stats, valid_rows)
        ctx.options = options
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        student, teacher, labels, row_stats, valid_rows = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[0] and creating_graph():  # second-order gradients: a differentiable recomputation
            grad_student, = differentiable_gradients(lambda: differentiable_loss(student, teacher, labels, ctx.options),
                                                     (student,), (True,), grad_loss)
        elif ctx.needs_input_grad[0]:
            grad_student = torch.empty(student.shape, dtype=student.dtype, device=student.device)
            launch(kd_loss_backward, backward_body,
                   (grad_loss, student, teacher, labels, row_stats, valid_rows, grad_student), ctx.options)
        return grad_student, None, None, None


def kd_loss(student: Tensor, teacher: Tensor, labels: Optional[Tensor], options: KDOptions) -> Tensor:
    """The dense KD loss of [rows, vocab] inputs through `KDLossFunction`."""
    return KDLossFunction.apply(student, teacher, labels, options)
