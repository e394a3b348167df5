"""Custom ops of top-k soft labels: `kdfast::topk_compress`, `kdfast::sparse_kd_forward`,
`kdfast::sparse_kd_backward`.

Contract (inputs already validated and shaped by kdfast.softlabels / kdfast.functional):
- topk_compress(teacher [rows, V] float32/bfloat16/float16/float64, last dim contiguous, any
  row stride; k; temperature; int64_indices) → (indices [rows, k] int32 or int64, logprobs
  [rows, k], tail [rows]) with logprobs/tail in float64 for float64 input, else float32.
- sparse_kd_forward(student [rows, V] with contiguous last dim, indices [rows, k] int64/int32/
  int16/uint16 contiguous, teacher_logprobs [rows, k] and teacher_tail [rows] contiguous
  float32/bfloat16/float16 (float64 only with a float64 student), labels None or int64 [rows],
  options) → (loss, row_stats [rows, 8], valid_rows): loss in the compute dtype (float64 for a
  float64 student, else float32), [rows] for reduction "none", else 0-dim; row_stats (see
  kSparseRowStats in types.h) and valid_rows (0-dim count of non-ignored rows) in float64. Out-of-range labels
  or indices, and indices repeated within a row, raise ValueError.
- sparse_kd_backward returns the student gradient [rows, V] in the student dtype, already
  multiplied by grad_output.
The `*_impl` functions are the bodies; `compress` and `sparse_kd_loss` call them directly in
eager mode (no dispatcher cost) and through the custom ops under torch.compile.
CUDA tensors run the CUDA kernels when the core was built with them (build_info()["cuda_topk"]);
there, compression takes k ≤ CUDA_MAX_TOPK and the sparse loss V ≤ CUDA_MAX_SPARSE_VOCAB (beyond
them kdfast.reference runs), and bad labels or soft-label indices give NaN rows instead of
ValueError (the kernels never synchronise with the host).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from kdfast.ops._native import (
    DIVERGENCE_CODES,
    DTYPE_CODES,
    REDUCTION_CODES,
    compute_dtype,
    divergence_scale,
    device_and_stream,
    has_cuda_kernels,
    native_available,
    native_module,
)

# Mirrors kdfast::IndexType and kdfast::SparseTail in csrc/include/kdfast/types.h.
INDEX_DTYPE_CODES = {torch.int64: 0, torch.int32: 1, torch.int16: 2, torch.uint16: 3}
TAIL_MODE_CODES = {"bucket": 0, "renormalize": 1}
SPARSE_ROW_STATS = 8
# Largest k the CUDA compression kernel takes (kMaxCudaTopK in csrc/cuda/topk_compress.cu).
CUDA_MAX_TOPK = 4096
# Largest vocabulary the CUDA sparse-loss kernels take (a per-row bitmap of the kept tokens
# lives in shared memory: 128 KiB at 2^20); larger ones run kdfast.reference on the GPU.
CUDA_MAX_SPARSE_VOCAB = 1 << 20


@functools.lru_cache(maxsize=None)
def _kernel_devices() -> frozenset:
    """Device types the compiled core has top-k kernels for (empty without the core)."""
    if not native_available() or not hasattr(native_module(), "sparse_kd_forward"):
        return frozenset()
    devices = {"cpu"}
    # The CUDA top-k kernels announce themselves in build_info(); a core without them sends
    # CUDA tensors down the pure-PyTorch path.
    if has_cuda_kernels() and native_module().build_info().get("cuda_topk", False):
        devices.add("cuda")
    return frozenset(devices)


@torch.compiler.assume_constant_result
def _has_kernels_for(device_type: str) -> bool:
    # A constant for torch.compile: evaluated once while tracing, never traced into.
    return device_type in _kernel_devices()


def uses_kernels(device: torch.device) -> bool:
    """True when tensors on `device` run the compiled top-k kernels (else: kdfast.reference)."""
    return _has_kernels_for(device.type)


def compress_uses_kernels(device: torch.device, k: int) -> bool:
    """True when `compress_topk` with this k runs a compiled kernel on `device`."""
    return uses_kernels(device) and (device.type != "cuda" or k <= CUDA_MAX_TOPK)


# ---------------------------------------------------------------------------- compression
def topk_compress_impl(teacher: Tensor, k: int, temperature: float, int64_indices: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Body of `kdfast::topk_compress` (called directly in eager mode)."""
    rows, vocab = teacher.shape
    value_dtype = compute_dtype(teacher)
    indices = torch.empty((rows, k), dtype=torch.int64 if int64_indices else torch.int32, device=teacher.device)
    logprobs = torch.empty((rows, k), dtype=value_dtype, device=teacher.device)
    tail = torch.empty((rows,), dtype=value_dtype, device=teacher.device)
    device_index, stream = device_and_stream(teacher)
    native_module().topk_compress(
        teacher.data_ptr(), DTYPE_CODES[teacher.dtype], teacher.stride(0), rows, vocab, k, temperature,
        indices.data_ptr(), int64_indices, logprobs.data_ptr(), tail.data_ptr(), torch.get_num_threads(),
        device_index, stream,
    )
    return indices, logprobs, tail


@torch.library.custom_op("kdfast::topk_compress", mutates_args=(), device_types=("cpu", "cuda"))
def topk_compress(teacher: Tensor, k: int, temperature: float, int64_indices: bool) -> tuple[Tensor, Tensor, Tensor]:
    return topk_compress_impl(teacher, k, temperature, int64_indices)


@topk_compress.register_fake
def _(teacher, k, temperature, int64_indices):
    rows = teacher.shape[0]
    value_dtype = compute_dtype(teacher)
    return (
        teacher.new_empty((rows, k), dtype=torch.int64 if int64_indices else torch.int32),
        teacher.new_empty((rows, k), dtype=value_dtype),
        teacher.new_empty((rows,), dtype=value_dtype),
    )


# ---------------------------------------------------------------------------- sparse loss
def _raise_bad_inputs(bad_labels: int, bad_index_rows: int, labels, indices, vocab: int, ignore_index: int) -> None:
    if bad_labels:
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= vocab))]
        raise ValueError(
            f"sparse_kd_loss: labels out of range: {bad_labels} label(s) outside [0, {vocab}) that are not "
            f"ignore_index={ignore_index}, e.g. {bad[:5].tolist()}"
        )
    if bad_index_rows:
        raise ValueError(
            f"sparse_kd_loss: {bad_index_rows} row(s) of soft_labels.indices hold an index outside [0, {vocab}) "
            f"or repeat an index (indices.shape={tuple(indices.shape)}, dtype {indices.dtype})"
        )


def sparse_kd_forward_impl(
    student: Tensor,
    indices: Tensor,
    teacher_logprobs: Tensor,
    teacher_tail: Tensor,
    labels: Optional[Tensor],
    divergence: str,
    tail_mode: str,
    reduction: str,
    temperature: float,
    alpha: float,
    beta: float,
    label_smoothing: float,
    t2_scale: bool,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    rows, vocab = student.shape
    k = indices.shape[1]
    dtype = compute_dtype(student)
    loss = torch.empty((rows,) if reduction == "none" else (), dtype=dtype, device=student.device)
    row_stats = torch.empty((rows, SPARSE_ROW_STATS), dtype=torch.float64, device=student.device)
    valid_rows = torch.empty((), dtype=torch.float64, device=student.device)
    device_index, stream = device_and_stream(student)
    bad_labels, bad_index_rows = native_module().sparse_kd_forward(
        student.data_ptr(), DTYPE_CODES[student.dtype], student.stride(0),
        indices.data_ptr(), INDEX_DTYPE_CODES[indices.dtype],
        teacher_logprobs.data_ptr(), DTYPE_CODES[teacher_logprobs.dtype],
        teacher_tail.data_ptr(), DTYPE_CODES[teacher_tail.dtype],
        labels.data_ptr() if labels is not None else 0, rows, vocab, k,
        DIVERGENCE_CODES[divergence], TAIL_MODE_CODES[tail_mode], REDUCTION_CODES[reduction], temperature, alpha,
        beta, label_smoothing, divergence_scale(temperature, t2_scale), ignore_index,
        loss.data_ptr(), row_stats.data_ptr(), valid_rows.data_ptr(), torch.get_num_threads(), device_index, stream,
    )
    if bad_labels or bad_index_rows:
        _raise_bad_inputs(bad_labels, bad_index_rows, labels, indices, vocab, ignore_index)
    return loss, row_stats, valid_rows


@torch.library.custom_op("kdfast::sparse_kd_forward", mutates_args=(), device_types=("cpu", "cuda"))
def sparse_kd_forward(
    student: Tensor,
    indices: Tensor,
    teacher_logprobs: Tensor,
    teacher_tail: Tensor,
    labels: Optional[Tensor],
    divergence: str,
    tail_mode: str,
    reduction: str,
    temperature: float,
    alpha: float,
    beta: float,
    label_smoothing: float,
    t2_scale: bool,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return sparse_kd_forward_impl(student, indices, teacher_logprobs, teacher_tail, labels, divergence, tail_mode,
                                  reduction, temperature, alpha, beta, label_smoothing, t2_scale, ignore_index)


@sparse_kd_forward.register_fake
def _(student, indices, teacher_logprobs, teacher_tail, labels, divergence, tail_mode, reduction, temperature, alpha,
      beta, label_smoothing, t2_scale, ignore_index):
    rows = student.shape[0]
    dtype = compute_dtype(student)
    loss = student.new_empty((rows,) if reduction == "none" else (), dtype=dtype)
    return (
        loss,
        student.new_empty((rows, SPARSE_ROW_STATS), dtype=torch.float64),
        student.new_empty((), dtype=torch.float64),
    )


def sparse_kd_backward_impl(
    grad_output: Tensor,
    student: Tensor,
    indices: Tensor,
    teacher_logprobs: Tensor,
    teacher_tail: Tensor,
    labels: Optional[Tensor],
    row_stats: Tensor,
    valid_rows: Tensor,
    divergence: str,
    tail_mode: str,
    reduction: str,
    temperature: float,
    alpha: float,
    beta: float,
    label_smoothing: float,
    t2_scale: bool,
    ignore_index: int,
    out: Optional[Tensor] = None,
) -> Tensor:
    """The gradient into a new tensor, or into `out` ([rows, vocab] contiguous, student dtype,
    not aliasing `student`: kept logits are re-read after their chunk's tail gradient is written)."""
    rows, vocab = student.shape
    k = indices.shape[1]
    grad_student = torch.empty((rows, vocab), dtype=student.dtype, device=student.device) if out is None else out
    grad_output = grad_output.to(compute_dtype(student)).contiguous()
    device_index, stream = device_and_stream(student)
    native_module().sparse_kd_backward(
        grad_output.data_ptr(), 1 if reduction == "none" else 0,
        student.data_ptr(), DTYPE_CODES[student.dtype], student.stride(0),
        indices.data_ptr(), INDEX_DTYPE_CODES[indices.dtype],
        teacher_logprobs.data_ptr(), DTYPE_CODES[teacher_logprobs.dtype],
        teacher_tail.data_ptr(), DTYPE_CODES[teacher_tail.dtype],
        labels.data_ptr() if labels is not None else 0, rows, vocab, k,
        DIVERGENCE_CODES[divergence], TAIL_MODE_CODES[tail_mode], REDUCTION_CODES[reduction], temperature, alpha,
        beta, label_smoothing, divergence_scale(temperature, t2_scale), ignore_index,
        row_stats.data_ptr(), valid_rows.data_ptr(), grad_student.data_ptr(), torch.get_num_threads(),
        device_index, stream,
    )
    return grad_student


@torch.library.custom_op("kdfast::sparse_kd_backward", mutates_args=(), device_types=("cpu", "cuda"))
def sparse_kd_backward(
    grad_output: Tensor,
    student: Tensor,
    indices: Tensor,
    teacher_logprobs: Tensor,
    teacher_tail: Tensor,
    labels: Optional[Tensor],
    row_stats: Tensor,
    valid_rows: Tensor,
    divergence: str,
    tail_mode: str,
    reduction: str,
    temperature: float,
    alpha: float,
    beta: float,
    label_smoothing: float,
    t2_scale: bool,
    ignore_index: int,
) -> Tensor:
    return sparse_kd_backward_impl(grad_output, student, indices, teacher_logprobs, teacher_tail, labels, row_stats,
                                   valid_rows, divergence, tail_mode, reduction, temperature, alpha, beta,
                                   label_smoothing, t2_scale, ignore_index)


@sparse_kd_backward.register_fake
def _(grad_output, student, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows, divergence,
      tail_mode, reduction, temperature, alpha, beta, label_smoothing, t2_scale, ignore_index):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, indices, teacher_logprobs, teacher_tail, labels, *options = inputs
    _, row_stats, valid_rows = output
    ctx.save_for_backward(student, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows)
    ctx.options = options


def _backward(ctx, grad_loss, grad_row_stats, grad_valid_rows):
    student, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = sparse_kd_backward(
            grad_loss, student, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows, *ctx.options
        )
    return (grad_student,) + (None,) * 13


sparse_kd_forward.register_autograd(_backward, setup_context=_setup_context)


class EagerSparseKDLoss(torch.autograd.Function):
    """The computation of the sparse custom ops, for eager mode without the dispatcher.

    Outside `torch.compile`, kdfast.functional calls this Function, which runs the same
    `sparse_kd_forward_impl` / `sparse_kd_backward_impl` while skipping the custom-op
    dispatch cost (tens of microseconds per call); under compilation the custom ops are used.
    """

    @staticmethod
    def forward(ctx, student, indices, teacher_logprobs, teacher_tail, labels, *options):
        loss, row_stats, valid_rows = sparse_kd_forward_impl(student, indices, teacher_logprobs, teacher_tail, labels,
                                                             *options)
        ctx.save_for_backward(student, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows)
        ctx.options = options
        ctx.mark_non_differentiable(row_stats, valid_rows)
        return loss, row_stats, valid_rows

    @staticmethod
    def backward(ctx, grad_loss, grad_row_stats, grad_valid_rows):
        student, indices, teacher_logprobs, teacher_tail, labels, row_stats, valid_rows = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[0]:
            grad_student = sparse_kd_backward_impl(grad_loss, student, indices, teacher_logprobs, teacher_tail, labels,
                                                   row_stats, valid_rows, *ctx.options)
        return (grad_student,) + (None,) * (4 + len(ctx.options))


def compress(teacher: Tensor, k: int, temperature: float, int64_indices: bool) -> tuple[Tensor, Tensor, Tensor]:
    """`kdfast::topk_compress` under torch.compile, its body directly in eager mode."""
    if torch.compiler.is_compiling():
        return topk_compress(teacher, k, temperature, int64_indices)
    return topk_compress_impl(teacher, k, temperature, int64_indices)


def _reference_loss(student, indices, teacher_logprobs, teacher_tail, labels, divergence, tail_mode, reduction,
                    temperature, alpha, beta, label_smoothing, t2_scale, ignore_index) -> Tensor:
    """kdfast.reference on the flattened rows, reduced as the kernels reduce."""
    from kdfast import reference

    row_loss = reference.sparse_kd_loss_rows(
        student, indices, teacher_logprobs, teacher_tail, labels, divergence=divergence, temperature=temperature,
        alpha=alpha, beta=beta, tail=tail_mode, ignore_index=ignore_index, label_smoothing=label_smoothing,
        t2_scale=t2_scale,
    )
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean" or labels is None:
        return total / max(row_loss.shape[0], 1)
    return total / (labels != ignore_index).sum().clamp(min=1).to(total.dtype)


def sparse_kd_loss(student, indices, teacher_logprobs, teacher_tail, labels, *options) -> Tensor:
    """The sparse KD loss through the custom op (compiling) or EagerSparseKDLoss (eager); CUDA
    rows longer than CUDA_MAX_SPARSE_VOCAB take kdfast.reference."""
    if student.device.type == "cuda" and student.shape[-1] > CUDA_MAX_SPARSE_VOCAB:
        return _reference_loss(student, indices, teacher_logprobs, teacher_tail, labels, *options)
    if torch.compiler.is_compiling():
        loss, _, _ = sparse_kd_forward(student, indices, teacher_logprobs, teacher_tail, labels, *options)
    else:
        loss, _, _ = EagerSparseKDLoss.apply(student, indices, teacher_logprobs, teacher_tail, labels, *options)
    return loss
