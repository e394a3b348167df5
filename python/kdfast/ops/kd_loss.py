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
- one-pass training (CPU and CUDA): when the student needs a gradient, `forward_grad_body` runs the
  forward kernel that also writes the gradient for grad_output = 1 (the reduction's scale
  folded in) into `grad_student`, each row while it is cache-resident (`kd_loss_forward_grad`;
  `kd_loss_forward_grad_inplace` writes it into the student's own storage). The backward pass
  then returns that gradient as it is when grad_output is the scalar 1 (the usual
  `loss.backward()`), and otherwise multiplies it by grad_output in one pass where it lies
  (per row for reduction "none"; under torch.compile into a fresh tensor, `scale_gradient_body`).
  A bfloat16/float16 student that keeps its logits runs the two-pass backward kernel instead
  (into the same buffer), so that its gradient is still rounded once. A second backward pass
  through the same graph recomputes the forward's gradient into a fresh tensor first (the same
  bits as the first pass). On CUDA (GPU unverified) the forward writes the gradient with the
  one-pass kernel when there are rows enough for every multiprocessor, else with the backward
  kernel right after the forward kernels; the backward pass then runs the backward kernel
  with `skip_unit_rows`, which leaves every row whose grad_output is 1 as it is and recomputes
  the others exactly, so nothing reads grad_output on the host. In place is CPU-only.
`KDLossFunction` is the one autograd wrapper; `forward_outputs` allocates what the forward
body writes, so the chunked fused-linear loss can call the bodies on its own buffers. A
backward pass with create_graph=True differentiates `differentiable_loss` (the same loss in
plain PyTorch) instead of running the backward op, so second-order gradients are exact (not
with the in-place gradient, whose logits are gone: that raises RuntimeError).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdfast.contract.options import KDOptions, compute_dtype
from kdfast.contract.reductions import reduce_rows
from kdfast.contract.validation import check_label_range
from kdfast.ops._buffers import gradient_buffer
from kdfast.ops._native import device_and_stream, facts, native_module, row_stats_width
from kdfast.ops._op import (
    creating_graph,
    define_op,
    differentiable_gradients,
    inplace_gradient_gone,
    launch,
    save_with_gradient,
    saved_gradient,
)
from kdfast.reference import dense as dense_reference

__all__ = ["KDLossFunction", "backward_body", "check_inplace_student", "differentiable_loss", "forward_body",
           "forward_grad_body", "forward_outputs", "kd_loss", "kd_loss_backward", "kd_loss_forward",
           "kd_loss_forward_grad", "kd_loss_forward_grad_inplace", "kd_loss_scale_gradient", "scale_gradient_body"]


def _raise_bad_labels(count: int, labels: Tensor, vocab: int, ignore_index: int) -> None:
    bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= vocab))]
    raise ValueError(
        f"kd_loss: labels out of range: {count} label(s) outside [0, {vocab}) that are not "
        f"ignore_index={ignore_index}, e.g. {bad[:5].tolist()}"
    )


def forward_body(student: Tensor, teacher: Tensor, labels: Optional[Tensor], loss: Tensor, row_stats: Tensor,
                 valid_rows: Tensor, options: KDOptions) -> None:
    """Writes `loss`, `row_stats` and `valid_rows` (see the module contract)."""
    _forward(student, teacher, labels, loss, row_stats, valid_rows, None, options)


def forward_grad_body(student: Tensor, teacher: Tensor, labels: Optional[Tensor], loss: Tensor, row_stats: Tensor,
                      valid_rows: Tensor, grad_student: Tensor, options: KDOptions) -> None:
    """`forward_body`, and the gradient for grad_output = 1 into `grad_student` ([rows, vocab],
    contiguous, student dtype) in the same pass (CPU only)."""
    _forward(student, teacher, labels, loss, row_stats, valid_rows, grad_student, options)


def forward_grad_inplace_body(student: Tensor, teacher: Tensor, labels: Optional[Tensor], loss: Tensor,
                              row_stats: Tensor, valid_rows: Tensor, options: KDOptions) -> None:
    """`forward_grad_body` with the gradient written over `student` itself (rows contiguous)."""
    _forward(student, teacher, labels, loss, row_stats, valid_rows, student, options)


def _forward(student: Tensor, teacher: Tensor, labels: Optional[Tensor], loss: Tensor, row_stats: Tensor,
             valid_rows: Tensor, grad_student: Optional[Tensor], options: KDOptions) -> None:
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
        grad_student.data_ptr() if grad_student is not None else 0, options.teacher_entropy,
    )
    if bad_labels:
        _raise_bad_labels(bad_labels, labels, vocab, options.ignore_index)


def backward_body(grad_output: Tensor, student: Tensor, teacher: Tensor, labels: Optional[Tensor], row_stats: Tensor,
                  valid_rows: Tensor, grad_student: Tensor, options: KDOptions) -> None:
    """Writes d(grad_output · loss)/d student into `grad_student` ([rows, vocab], contiguous)."""
    _backward(grad_output, student, teacher, labels, row_stats, valid_rows, grad_student, options, False)


def _backward(grad_output: Tensor, student: Tensor, teacher: Tensor, labels: Optional[Tensor], row_stats: Tensor,
              valid_rows: Tensor, grad_student: Tensor, options: KDOptions, skip_unit_rows: bool) -> None:
    """`backward_body`; `skip_unit_rows` (CUDA): rows whose grad_output is 1 are left as they are
    (they hold the one-pass gradient), decided on the device."""
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
        stream, skip_unit_rows,
    )


def scale_gradient_body(grad_output: Tensor, gradient: Tensor, student: Tensor, teacher: Tensor,
                        labels: Optional[Tensor], row_stats: Tensor, valid_rows: Tensor, grad_student: Tensor,
                        exact: bool, options: KDOptions) -> None:
    """Writes grad_output times the one-pass `gradient` (for grad_output = 1) into `grad_student`:
    a copy when grad_output is the scalar 1, the two-pass backward kernel when `exact` (a
    bfloat16/float16 student whose logits are intact: one rounding), else one scaling pass
    (per row for reduction "none"). On CUDA: a copy, then the two-pass backward kernel for the
    rows whose grad_output is not 1 (decided on the device: no host synchronisation)."""
    if gradient.is_cuda:
        grad_student.copy_(gradient)
        _backward(grad_output, student, teacher, labels, row_stats, valid_rows, grad_student, options, True)
    elif grad_output.numel() == 1 and options.reduction != "none" and float(grad_output) == 1.0:
        grad_student.copy_(gradient)
    elif exact:
        backward_body(grad_output, student, teacher, labels, row_stats, valid_rows, grad_student, options)
    else:
        torch.mul(gradient, _row_factor(grad_output, gradient, options), out=grad_student)


def _row_factor(grad_output: Tensor, gradient: Tensor, options: KDOptions) -> Tensor:
    """grad_output as a [rows, 1] or [1, 1] factor in the compute dtype (never rounded to a
    16-bit gradient's dtype: the product is formed in float32 and rounded once)."""
    factor = grad_output.to(torch.float64 if gradient.dtype == torch.float64 else torch.float32)
    return factor.reshape(-1, 1) if options.reduction == "none" else factor.reshape(1, 1)


kd_loss_forward = define_op("kdfast::kd_loss_forward", forward_body, mutates=("loss", "row_stats", "valid_rows"))
kd_loss_forward_grad = define_op("kdfast::kd_loss_forward_grad", forward_grad_body,
                                 mutates=("loss", "row_stats", "valid_rows", "grad_student"))
kd_loss_forward_grad_inplace = define_op("kdfast::kd_loss_forward_grad_inplace", forward_grad_inplace_body,
                                         mutates=("student", "loss", "row_stats", "valid_rows"))
kd_loss_backward = define_op("kdfast::kd_loss_backward", backward_body, mutates=("grad_student",))
kd_loss_scale_gradient = define_op("kdfast::kd_loss_scale_gradient", scale_gradient_body, mutates=("grad_student",))


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


def check_inplace_student(student: Tensor, name: str = "student_logits") -> None:
    """Raises ValueError where writing the gradient over `student` would corrupt autograd or the
    user's data: a leaf that requires grad (a parameter), or a view of one, or a device
    without the one-pass kernel."""
    base = student._base if student._base is not None else student
    if base.is_leaf and base.requires_grad:
        raise ValueError(
            f"inplace_backward=True: {name} is a leaf tensor that requires grad (or a view of one); writing its "
            "gradient over it would overwrite the values autograd accumulates into. Pass the output of an "
            "operation (e.g. the lm_head's logits), or use inplace_backward=False"
        )
    if student.device.type != "cpu":
        raise ValueError(f"inplace_backward=True: supported on CPU tensors only, got {name} on {student.device}")


class KDLossFunction(torch.autograd.Function):
    """`apply(student, teacher, labels, options, inplace, one_pass) -> loss`; the gradient flows
    to the student only. On the CPU, when the student needs a gradient, the forward pass also
    computes it (one pass over the logits; `one_pass=False` keeps the two-pass kernels, for
    comparisons); `inplace` writes it over the student's storage."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, labels: Optional[Tensor], options: KDOptions,
                inplace: bool = False, one_pass: bool = True) -> Tensor:
        loss, row_stats, valid_rows = forward_outputs(student, options)
        ctx.options = options
        ctx.one_pass = one_pass and bool(ctx.needs_input_grad[0]) and student.device.type in ("cpu", "cuda")
        ctx.inplace = ctx.one_pass and inplace
        if not ctx.one_pass:
            launch(kd_loss_forward, forward_body, (student, teacher, labels, loss, row_stats, valid_rows), options)
            ctx.save_for_backward(student, teacher, labels, row_stats, valid_rows)
            return loss
        if ctx.inplace:
            if not torch.compiler.is_compiling():  # before the logits are overwritten (the kernel reports them too)
                check_label_range(labels, student.shape[1], options.ignore_index)
            launch(kd_loss_forward_grad_inplace, forward_grad_inplace_body,
                   (student, teacher, labels, loss, row_stats, valid_rows), options)
            if not torch.compiler.is_compiling():
                # Every other saved use of the logits now fails autograd's version check.
                torch.autograd.graph.increment_version(student)
            ctx.save_for_backward(None, teacher, labels, row_stats, valid_rows, student)
        else:
            gradient = gradient_buffer(student.shape, student.dtype, student.device)
            launch(kd_loss_forward_grad, forward_grad_body,
                   (student, teacher, labels, loss, row_stats, valid_rows, gradient), options)
            save_with_gradient(ctx, (student, teacher, labels, row_stats, valid_rows), gradient)
        ctx.handed_out = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        student, teacher, labels, row_stats, valid_rows, *gradient = ctx.saved_tensors
        gradient = saved_gradient(ctx, gradient)
        grad_student = None
        if ctx.needs_input_grad[0] and creating_graph():  # second-order gradients: a differentiable recomputation
            if ctx.inplace:
                raise inplace_gradient_gone("kd_loss", second_pass=False)
            grad_student, = differentiable_gradients(lambda: differentiable_loss(student, teacher, labels, ctx.options),
                                                     (student,), (True,), grad_loss)
        elif ctx.needs_input_grad[0] and ctx.one_pass:
            grad_student = _one_pass_gradient(ctx, grad_loss, gradient, student, teacher, labels, row_stats,
                                              valid_rows)
        elif ctx.needs_input_grad[0]:
            grad_student = gradient_buffer(student.shape, student.dtype, student.device)
            launch(kd_loss_backward, backward_body,
                   (grad_loss, student, teacher, labels, row_stats, valid_rows, grad_student), ctx.options)
        return grad_student, None, None, None, None, None


def _one_pass_gradient(ctx, grad_loss: Tensor, gradient: Tensor, student: Optional[Tensor], teacher: Tensor,
                       labels: Optional[Tensor], row_stats: Tensor, valid_rows: Tensor) -> Tensor:
    """The student gradient for `grad_loss` from `gradient`, the forward pass's (grad_output = 1).

    The first backward pass owns `gradient` and returns it: as it is for grad_output = 1, scaled
    where it lies otherwise (float32/float64), or rewritten by the two-pass backward kernel (a
    16-bit student, rounded once), so that no second N×V buffer is allocated. A later backward
    pass through the same graph (retain_graph=True) recomputes the forward's gradient into a
    fresh tensor and treats it the same way: bit for bit the first pass's result."""
    if ctx.inplace and ctx.handed_out:
        raise inplace_gradient_gone("kd_loss", second_pass=True)
    if torch.compiler.is_compiling():
        exact = not ctx.inplace and gradient.dtype not in (torch.float32, torch.float64)
        out = torch.empty_like(gradient)
        launch(kd_loss_scale_gradient, scale_gradient_body, (grad_loss, gradient, student if student is not None else
               gradient, teacher, labels, row_stats, valid_rows, out, exact), ctx.options)
        return out
    if ctx.handed_out:
        gradient = gradient_buffer(student.shape, student.dtype, student.device)
        scratch = forward_outputs(student, ctx.options)
        forward_grad_body(student, teacher, labels, *scratch, gradient, ctx.options)
    ctx.handed_out, ctx.gradient = True, None
    if gradient.is_cuda:  # rows whose grad_output is not 1 recomputed exactly, decided on the device
        _backward(grad_loss, student, teacher, labels, row_stats, valid_rows, gradient, ctx.options, True)
        return gradient
    if grad_loss.numel() == 1 and ctx.options.reduction != "none" and float(grad_loss) == 1.0:
        return gradient  # the usual loss.backward(): the forward's gradient as it is, no pass at all
    if not ctx.inplace and gradient.dtype not in (torch.float32, torch.float64):
        backward_body(grad_loss, student, teacher, labels, row_stats, valid_rows, gradient, ctx.options)
        return gradient
    return gradient.mul_(_row_factor(grad_loss, gradient, ctx.options))


def kd_loss(student: Tensor, teacher: Tensor, labels: Optional[Tensor], options: KDOptions,
            inplace: bool = False, one_pass: bool = True) -> Tensor:
    """The dense KD loss of [rows, vocab] inputs through `KDLossFunction`; `inplace`: the
    one-pass gradient is written over `student` (see `check_inplace_student`); `one_pass=False`:
    the two-pass kernels (forward, then backward) even where the one-pass kernel applies."""
    # Inside Function.forward grad mode is off and needs_input_grad ignores it: decide here.
    one_pass = one_pass and torch.is_grad_enabled() and student.requires_grad
    # The in-place kernel writes row r's gradient at r * V: rows taken with a step (row stride
    # != V) get a fresh gradient instead.
    inplace = inplace and one_pass and student.is_contiguous()
    return KDLossFunction.apply(student, teacher, labels, options, inplace, one_pass)
