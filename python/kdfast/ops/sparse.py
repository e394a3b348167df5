"""Top-k soft-label ops: `kdfast::topk_compress`, `kdfast::sparse_kd_forward`, `kdfast::sparse_kd_backward`.

Contract (inputs already validated and shaped by kdfast.functional):
- topk_compress: teacher [rows, V] float32/bfloat16/float16/float64, last dim contiguous, any
  row stride; writes `indices` [rows, k] (int32 or int64), `logprobs` [rows, k] and `tail`
  [rows] (float64 for float64 input, else float32).
- sparse_kd_forward: student [rows, V] with contiguous last dim, indices [rows, k]
  int64/int32/int16/uint16 contiguous, teacher_logprobs [rows, k] and teacher_tail [rows]
  contiguous float32/bfloat16/float16 (float64 only with a float64 student), labels None or
  int64 [rows]; writes `loss` in the compute dtype (float64 for a float64 student, else
  float32; [rows] for reduction "none", else 0-dim), `row_stats` [rows, sparse_row_stats]
  and `valid_rows` (0-dim count of non-ignored rows), both float64. Out-of-range labels or
  indices, and indices repeated within a row, raise ValueError on the CPU.
- sparse_kd_backward writes the student gradient [rows, V] (student dtype, not aliasing the
  student: kept logits are re-read after their chunk's tail gradient is written), already
  multiplied by grad_output (read by the kernel; no host synchronisation).
CUDA tensors run the CUDA kernels when the core was built with them; there compression takes
k ≤ the core's `cuda_max_topk` and the sparse loss V ≤ `cuda_max_sparse_vocab` (beyond them
kdfast.reference runs), and bad labels or indices give NaN rows instead of ValueError (the
kernels never synchronise with the host). `SparseKDLossFunction` is the one autograd wrapper;
with create_graph=True its backward differentiates `differentiable_loss` (the same loss in
plain PyTorch), so second-order gradients are exact.
One-pass training (CPU and CUDA): when the student needs a gradient, `forward_grad_body`
(`kdfast::sparse_kd_forward_grad`) also writes the gradient for grad_output = 1 (the
reduction's scale folded in) into `grad_student`, each row right after its statistics; the
first backward pass returns that buffer: as it is for the scalar grad_output 1, else scaled
in place in one pass (`scale_gradient_body`; a bfloat16/float16 student runs the backward
kernel into it instead, so that its gradient is rounded once), so no second N×V buffer is
allocated. A later backward pass through the same graph recomputes that gradient into a fresh
tensor first (the same bits). `sparse_kd_forward_grad_inplace` writes the gradient over the
student's own storage (`inplace_backward`, CPU only; labels and indices are checked before the
logits are overwritten). On CUDA (GPU unverified) the forward writes the gradient with the
one-pass kernel (one block per row: the row's statistics, then its gradient while the row is in
L2), or, for few long rows that take a thread-block cluster each, with the backward kernel right
after the forward kernels; the backward pass then runs the backward kernel with
`skip_unit_rows`, which leaves every row whose grad_output is 1 as it is and recomputes the
others exactly, so nothing reads grad_output on the host.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdfast.contract.options import KDOptions, compute_dtype
from kdfast.contract.reductions import reduce_rows
from kdfast.contract.validation import check_label_range
from kdfast.ops._buffers import gradient_buffer
from kdfast.ops._native import (
    cuda_limit,
    device_and_stream,
    facts,
    has_cuda_topk_kernels,
    native_available,
    native_module,
    row_stats_width,
)
from kdfast.ops._op import (
    creating_graph,
    define_op,
    differentiable_gradients,
    inplace_gradient_gone,
    launch,
    save_with_gradient,
    saved_gradient,
)
from kdfast.reference import sparse as sparse_reference

__all__ = ["SparseKDLossFunction", "compress", "compress_uses_kernels", "differentiable_loss", "sparse_kd_backward",
           "sparse_kd_forward", "sparse_kd_forward_grad", "sparse_kd_loss", "sparse_kd_scale_gradient", "topk_compress",
           "uses_kernels"]


@torch.compiler.assume_constant_result
def _has_kernels_for(device_type: str) -> bool:
    if not native_available():
        return False
    return device_type == "cpu" or (device_type == "cuda" and has_cuda_topk_kernels())


def uses_kernels(device: torch.device) -> bool:
    """True when tensors on `device` run the compiled top-k kernels (else: kdfast.reference)."""
    return _has_kernels_for(device.type)


def compress_uses_kernels(device: torch.device, k: int) -> bool:
    """True when `compress_topk` with this k runs a compiled kernel on `device`."""
    return uses_kernels(device) and (device.type != "cuda" or k <= cuda_limit("max_topk"))


def sparse_uses_kernels(device: torch.device, vocab: int) -> bool:
    """True when the sparse loss over a `vocab`-wide row runs a compiled kernel on `device`."""
    return uses_kernels(device) and (device.type != "cuda" or vocab <= cuda_limit("max_sparse_vocab"))


# ---------------------------------------------------------------------------- compression
def compress_body(teacher: Tensor, indices: Tensor, logprobs: Tensor, tail: Tensor, temperature: float) -> None:
    """Writes the top-k `indices`, their `logprobs` and the `tail` log-mass of each teacher row."""
    rows, vocab = teacher.shape
    codes = facts()
    device_index, stream = device_and_stream(teacher)
    native_module().topk_compress(
        teacher.data_ptr(), codes.dtype_codes[teacher.dtype], teacher.stride(0), rows, vocab, indices.shape[1],
        temperature, indices.data_ptr(), indices.dtype == torch.int64, logprobs.data_ptr(), tail.data_ptr(),
        torch.get_num_threads(), device_index, stream,
    )


topk_compress = define_op("kdfast::topk_compress", compress_body, mutates=("indices", "logprobs", "tail"))


def compress(teacher: Tensor, k: int, temperature: float, int64_indices: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(indices, logprobs, tail) of [rows, V] teacher logits; allocates them and runs the op."""
    rows = teacher.shape[0]
    value_dtype = compute_dtype(teacher)
    indices = teacher.new_empty((rows, k), dtype=torch.int64 if int64_indices else torch.int32)
    logprobs = teacher.new_empty((rows, k), dtype=value_dtype)
    tail = teacher.new_empty((rows,), dtype=value_dtype)
    launch(topk_compress, compress_body, (teacher, indices, logprobs, tail, float(temperature)))
    return indices, logprobs, tail


# ---------------------------------------------------------------------------- sparse loss
def _raise_bad_inputs(bad_labels: int, bad_index_rows: int, labels, indices, vocab: int, ignore_index: int) -> None:
    if bad_labels:
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= vocab))]
        raise ValueError(
            f"sparse_kd_loss: labels out of range: {bad_labels} label(s) outside [0, {vocab}) that are not "
            f"ignore_index={ignore_index}, e.g. {bad[:5].tolist()}"
        )
    raise ValueError(
        f"sparse_kd_loss: {bad_index_rows} row(s) of soft_labels.indices hold an index outside [0, {vocab}) "
        f"or repeat an index (indices.shape={tuple(indices.shape)}, dtype {indices.dtype})"
    )


def _sparse_arguments(student: Tensor, indices: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor,
                      labels: Optional[Tensor], options: KDOptions) -> tuple:
    """The arguments the forward and backward kernels share, in the core's order."""
    rows, vocab = student.shape
    codes = facts()
    return (
        student.data_ptr(), codes.dtype_codes[student.dtype], student.stride(0),
        indices.data_ptr(), codes.index_dtype_codes[indices.dtype],
        teacher_logprobs.data_ptr(), codes.dtype_codes[teacher_logprobs.dtype],
        teacher_tail.data_ptr(), codes.dtype_codes[teacher_tail.dtype],
        labels.data_ptr() if labels is not None else 0, rows, vocab, indices.shape[1],
        codes.divergence_codes[options.divergence], codes.tail_codes[options.tail],
        codes.reduction_codes[options.reduction], options.temperature, options.alpha, options.beta,
        options.label_smoothing, options.divergence_scale, options.ignore_index,
    )


def forward_body(student: Tensor, indices: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor,
                 labels: Optional[Tensor], loss: Tensor, row_stats: Tensor, valid_rows: Tensor,
                 options: KDOptions) -> None:
    """Writes `loss`, `row_stats` and `valid_rows` (see the module contract)."""
    _forward(student, indices, teacher_logprobs, teacher_tail, labels, loss, row_stats, valid_rows, None, options)


def forward_grad_body(student: Tensor, indices: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor,
                      labels: Optional[Tensor], loss: Tensor, row_stats: Tensor, valid_rows: Tensor,
                      grad_student: Tensor, options: KDOptions) -> None:
    """`forward_body`, and the gradient for grad_output = 1 into `grad_student` ([rows, V],
    contiguous, student dtype) in the same pass."""
    _forward(student, indices, teacher_logprobs, teacher_tail, labels, loss, row_stats, valid_rows, grad_student,
             options)


def forward_grad_inplace_body(student: Tensor, indices: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor,
                              labels: Optional[Tensor], loss: Tensor, row_stats: Tensor, valid_rows: Tensor,
                              options: KDOptions) -> None:
    """`forward_grad_body` with the gradient written over `student` itself (rows contiguous)."""
    _forward(student, indices, teacher_logprobs, teacher_tail, labels, loss, row_stats, valid_rows, student, options)


def _check_before_overwriting(student: Tensor, indices: Tensor, labels: Optional[Tensor], options: KDOptions) -> None:
    """The label and index checks the kernel reports, made before an in-place forward pass
    overwrites the logits (the kernel only reports them afterwards)."""
    vocab = student.shape[1]
    check_label_range(labels, vocab, options.ignore_index)
    if indices.numel() == 0:
        return
    wide = indices.to(torch.int64)
    out_of_range = ((wide < 0) | (wide >= vocab)).any(dim=1)
    ordered = wide.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
    bad_rows = int((out_of_range | repeated).sum())
    if bad_rows:
        _raise_bad_inputs(0, bad_rows, labels, indices, vocab, options.ignore_index)


def _forward(student: Tensor, indices: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor,
             labels: Optional[Tensor], loss: Tensor, row_stats: Tensor, valid_rows: Tensor,
             grad_student: Optional[Tensor], options: KDOptions) -> None:
    device_index, stream = device_and_stream(student)
    bad_labels, bad_index_rows = native_module().sparse_kd_forward(
        *_sparse_arguments(student, indices, teacher_logprobs, teacher_tail, labels, options),
        loss.data_ptr(), row_stats.data_ptr(), valid_rows.data_ptr(), torch.get_num_threads(), device_index, stream,
        grad_student.data_ptr() if grad_student is not None else 0,
    )
    if bad_labels or bad_index_rows:
        _raise_bad_inputs(bad_labels, bad_index_rows, labels, indices, student.shape[1], options.ignore_index)


def backward_body(grad_output: Tensor, student: Tensor, indices: Tensor, teacher_logprobs: Tensor,
                  teacher_tail: Tensor, labels: Optional[Tensor], row_stats: Tensor, valid_rows: Tensor,
                  grad_student: Tensor, options: KDOptions) -> None:
    """Writes d(grad_output · loss)/d student into `grad_student` ([rows, V], contiguous)."""
    _backward(grad_output, student, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows,
              grad_student, options, False)


def _backward(grad_output: Tensor, student: Tensor, indices: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor,
              labels: Optional[Tensor], row_stats: Tensor, valid_rows: Tensor, grad_student: Tensor,
              options: KDOptions, skip_unit_rows: bool) -> None:
    """`backward_body`; `skip_unit_rows` (CUDA): rows whose grad_output is 1 are left as they are
    (they hold the one-pass gradient), decided on the device."""
    grad_output = grad_output.to(compute_dtype(student)).contiguous()
    device_index, stream = device_and_stream(student)
    native_module().sparse_kd_backward(
        grad_output.data_ptr(), 1 if options.reduction == "none" else 0,
        *_sparse_arguments(student, indices, teacher_logprobs, teacher_tail, labels, options),
        row_stats.data_ptr(), valid_rows.data_ptr(), grad_student.data_ptr(), torch.get_num_threads(),
        device_index, stream, skip_unit_rows,
    )


def scale_gradient_body(grad_output: Tensor, gradient: Tensor, student: Tensor, indices: Tensor,
                        teacher_logprobs: Tensor, teacher_tail: Tensor, labels: Optional[Tensor], row_stats: Tensor,
                        valid_rows: Tensor, grad_student: Tensor, exact: bool, options: KDOptions) -> None:
    """Writes grad_output times the one-pass `gradient` (for grad_output = 1) into `grad_student`:
    a copy for the scalar 1, the backward kernel when `exact` (a bfloat16/float16 student whose
    logits are intact: one rounding), else one scaling pass (per row for reduction "none"). On
    CUDA: a copy, then the backward kernel for the rows whose grad_output is not 1 (decided on
    the device: no host synchronisation)."""
    if gradient.is_cuda:
        grad_student.copy_(gradient)
        _backward(grad_output, student, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows,
                  grad_student, options, True)
    elif grad_output.numel() == 1 and options.reduction != "none" and float(grad_output) == 1.0:
        grad_student.copy_(gradient)
    elif exact:
        backward_body(grad_output, student, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows,
                      grad_student, options)
    else:
        factor = grad_output.to(gradient.dtype)
        torch.mul(gradient, factor.reshape(-1, 1) if options.reduction == "none" else factor.reshape(1, 1),
                  out=grad_student)


sparse_kd_forward = define_op("kdfast::sparse_kd_forward", forward_body, mutates=("loss", "row_stats", "valid_rows"))
sparse_kd_forward_grad = define_op("kdfast::sparse_kd_forward_grad", forward_grad_body,
                                   mutates=("loss", "row_stats", "valid_rows", "grad_student"))
sparse_kd_forward_grad_inplace = define_op("kdfast::sparse_kd_forward_grad_inplace", forward_grad_inplace_body,
                                           mutates=("student", "loss", "row_stats", "valid_rows"))
sparse_kd_backward = define_op("kdfast::sparse_kd_backward", backward_body, mutates=("grad_student",))
sparse_kd_scale_gradient = define_op("kdfast::sparse_kd_scale_gradient", scale_gradient_body,
                                     mutates=("grad_student",))


def forward_outputs(student: Tensor, options: KDOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, row_stats, valid_rows), allocated for `forward_body`."""
    rows = student.shape[0]
    loss = student.new_empty((rows,) if options.reduction == "none" else (), dtype=compute_dtype(student))
    row_stats = student.new_empty((rows, row_stats_width("sparse")), dtype=torch.float64)
    return loss, row_stats, student.new_empty((), dtype=torch.float64)


def differentiable_loss(student: Tensor, indices: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor,
                        labels: Optional[Tensor], options: KDOptions) -> Tensor:
    """The loss `forward_body` computes, written with differentiable PyTorch operations
    (`kdfast.reference.sparse`): twice differentiable in the student. Reads the labels and
    indices (their range is checked, as the CPU kernels do)."""
    vocab = student.shape[1]
    check_label_range(labels, vocab, options.ignore_index)
    kept = indices.to(torch.int32).to(torch.int64) if indices.dtype == torch.uint16 else indices.to(torch.int64)
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= vocab):
        raise ValueError(f"sparse_kd_loss: soft_labels.indices must lie in [0, {vocab})")
    row_loss = sparse_reference.sparse_kd_loss_rows(student, kept, teacher_logprobs, teacher_tail, labels,
                                                    tail=options.tail, **options.row_options())
    valid = labels != options.ignore_index if labels is not None else None
    return reduce_rows(row_loss, options.reduction, valid)


class SparseKDLossFunction(torch.autograd.Function):
    """`apply(student, indices, teacher_logprobs, teacher_tail, labels, options, one_pass, inplace)
    -> loss`; `one_pass` (the student needs a gradient): the forward pass computes it too;
    `inplace` (CPU): it writes it over the student's storage."""

    @staticmethod
    def forward(ctx, student: Tensor, indices: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor,
                labels: Optional[Tensor], options: KDOptions, one_pass: bool = False, inplace: bool = False) -> Tensor:
        loss, row_stats, valid_rows = forward_outputs(student, options)
        inputs = (student, indices, teacher_logprobs, teacher_tail, labels, loss, row_stats, valid_rows)
        ctx.one_pass = one_pass and bool(ctx.needs_input_grad[0]) and student.device.type in ("cpu", "cuda")
        ctx.inplace = ctx.one_pass and inplace
        if ctx.inplace:
            if not torch.compiler.is_compiling():
                _check_before_overwriting(student, indices, labels, options)
            launch(sparse_kd_forward_grad_inplace, forward_grad_inplace_body, inputs, options)
            if not torch.compiler.is_compiling():
                # Every other saved use of the logits now fails autograd's version check.
                torch.autograd.graph.increment_version(student)
            ctx.save_for_backward(None, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows,
                                  student)
        elif ctx.one_pass:
            gradient = gradient_buffer(student.shape, student.dtype, student.device)
            launch(sparse_kd_forward_grad, forward_grad_body, (*inputs, gradient), options)
            save_with_gradient(ctx, (student, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows),
                               gradient)
        else:
            launch(sparse_kd_forward, forward_body, inputs, options)
            ctx.save_for_backward(student, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows)
        ctx.options = options
        ctx.handed_out = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        student, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows, *gradient = ctx.saved_tensors
        gradient = saved_gradient(ctx, gradient)
        # A 16-bit student's scaled gradient comes from the backward kernel (one rounding) while
        # its logits are intact; in place they are gone, and it is scaled where it lies.
        exact = not ctx.inplace and gradient is not None and gradient.dtype not in (torch.float32, torch.float64)
        grad_student = None
        if ctx.needs_input_grad[0] and creating_graph():  # second-order gradients: a differentiable recomputation
            if ctx.inplace:
                raise inplace_gradient_gone("sparse_kd_loss", second_pass=False)
            grad_student, = differentiable_gradients(
                lambda: differentiable_loss(student, indices, teacher_logprobs, teacher_tail, labels, ctx.options),
                (student,), (True,), grad_loss)
        elif ctx.needs_input_grad[0] and ctx.one_pass and torch.compiler.is_compiling():
            grad_student = torch.empty_like(gradient)
            launch(sparse_kd_scale_gradient, scale_gradient_body,
                   (grad_loss, gradient, student if student is not None else gradient, indices, teacher_logprobs,
                    teacher_tail, labels, row_stats, valid_rows, grad_student, exact), ctx.options)
        elif ctx.needs_input_grad[0] and ctx.one_pass:
            # The first backward pass owns the forward's gradient (no second N×V buffer); a later
            # one (retain_graph=True) recomputes it into a fresh tensor, bit for bit the same.
            if ctx.inplace and ctx.handed_out:
                raise inplace_gradient_gone("sparse_kd_loss", second_pass=True)
            inputs = (student, indices, teacher_logprobs, teacher_tail, labels)
            grad_student = gradient
            if ctx.handed_out:
                grad_student = gradient_buffer(student.shape, student.dtype, student.device)
                forward_grad_body(*inputs, *forward_outputs(student, ctx.options), grad_student, ctx.options)
            ctx.handed_out, ctx.gradient = True, None
            if grad_student.is_cuda:  # rows whose grad_output is not 1 recomputed exactly, decided on the device
                _backward(grad_loss, student, *inputs[1:], row_stats, valid_rows, grad_student, ctx.options, True)
            elif grad_loss.numel() != 1 or ctx.options.reduction == "none" or float(grad_loss) != 1.0:
                scale_gradient_body(grad_loss, grad_student, student, indices, teacher_logprobs, teacher_tail, labels,
                                    row_stats, valid_rows, grad_student, exact, ctx.options)
        elif ctx.needs_input_grad[0]:
            grad_student = gradient_buffer(student.shape, student.dtype, student.device)
            launch(sparse_kd_backward, backward_body, (grad_loss, student, indices, teacher_logprobs, teacher_tail,
                                                       labels, row_stats, valid_rows, grad_student), ctx.options)
        return grad_student, None, None, None, None, None, None, None


def sparse_kd_loss(student: Tensor, indices: Tensor, teacher_logprobs: Tensor, teacher_tail: Tensor,
                   labels: Optional[Tensor], options: KDOptions, inplace: bool = False) -> Tensor:
    """The sparse KD loss of [rows, V] student logits through `SparseKDLossFunction`; `inplace`:
    the one-pass gradient is written over `student` (see `kd_loss.check_inplace_student`)."""
    options.require_not_dense_only("sparse_kd_loss")
    # Inside Function.forward grad mode is off and needs_input_grad ignores it: decide here.
    one_pass = torch.is_grad_enabled() and student.requires_grad
    # The in-place kernel writes row r's gradient at r * V: rows taken with a step get a fresh one.
    inplace = inplace and one_pass and student.is_contiguous()
    return SparseKDLossFunction.apply(student, indices, teacher_logprobs, teacher_tail, labels, options, one_pass,
                                      inplace)
