"""Chunked linear + KD loss: `kdfast::fused_linear_kd_forward` / `kdfast::fused_linear_kd_backward`.

The student's logits `hidden @ weight.T + bias` (optionally soft-capped, c·tanh(x/c)) are
never held whole: rows are processed `chunk_rows` at a time. Per chunk the logits are one
matmul (torch: MKL / cuBLAS) into a reused buffer, the teacher chunk is a slice of the
teacher logits, a matmul of the teacher's hidden states, or a slice of top-k soft labels,
and the fused kernels of `ops/kd_loss.py` / `ops/sparse.py` give the chunk's loss and its
logit gradient. The logit gradient is then folded into grad_hidden (one matmul) and
accumulated into grad_weight / grad_bias, so that for the scalar reductions the forward
pass already produces every gradient (scaled by grad_output in backward, as fused linear
cross-entropy implementations do). Reduction "none" keeps the per-row statistics and
recomputes the chunks in backward, because its gradient depends on the per-row grad_output.

Contract (inputs validated and shaped by kdfast.functional.fused_linear_kd_loss):
- hidden [rows, H] and weight [V, H] (same floating dtype), bias None or [V]; labels None or
  int64 [rows]; exactly one teacher: `teacher_logits` [rows, V] (last dim contiguous, any row
  stride), or `teacher_hidden` [rows, H_t] with `teacher_weight` [V, H_t] (+ `teacher_bias`),
  or the soft-label tensors (`indices`, `logprobs` [rows, k], `tail` [rows]);
  `teacher_columns` (int64 [V], −1 = no teacher column) optionally gathers the dense teacher's
  columns (applied after the teacher matmul).
- forward returns (loss, row_stats, grad_hidden, grad_weight, grad_bias): loss in the compute
  dtype (0-dim, or [rows] for "none"); row_stats the kernels' per-row statistics for "none"
  (else empty); the gradients for grad_output = 1 when `compute_grads` and the reduction is not
  "none" (else empty tensors). Memory above inputs and gradients: one chunk of logits (which
  the dense kernel overwrites with its own gradient), plus one teacher chunk for a
  hidden-state or column-mapped teacher, plus one gradient chunk for soft labels or a softcap.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdfast.ops import kd_loss as _kd_ops
from kdfast.ops import sparse as _sparse_ops
from kdfast.ops._native import compute_dtype

# Bytes of logits one chunk may take by default: small enough to stay out of the way of the
# model on the CPU, large enough for full-speed matmuls on a GPU.
DEFAULT_CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}


def default_chunk_rows(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk when the caller gives none: the largest power of two whose logits chunk
    ([chunk, V] in the logits' dtype) fits DEFAULT_CHUNK_BYTES for the device (32 MiB on the
    CPU, 256 MiB elsewhere), at least 1 and at most `rows`."""
    budget = DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cuda"])
    element_size = torch.empty((), dtype=dtype).element_size()
    fit = max(1, budget // max(1, vocab * element_size))
    return max(1, min(rows, 1 << (fit.bit_length() - 1)))


class ChunkLoss:
    """Loss and logit gradient of one chunk of rows; `kernels=False` uses kdfast.reference.

    `teacher` is a [c, V] tensor or a (indices, logprobs, tail) triple of the chunk. The
    chunk's reduction is "none" (per-row losses, statistics kept for backward) or "sum".
    """

    def __init__(self, sparse: bool, kernels: bool, options: tuple):
        (self.divergence, self.tail_mode, self.reduction, self.temperature, self.alpha, self.beta,
         self.label_smoothing, self.t2_scale, self.ignore_index) = options
        self.sparse, self.kernels = sparse, kernels

    def _kernel_options(self, reduction: str) -> tuple:
        base = (self.divergence,) + ((self.tail_mode,) if self.sparse else ()) + (reduction,)
        return base + (self.temperature, self.alpha, self.beta, self.label_smoothing, self.t2_scale,
                       self.ignore_index)

    def _reference_loss(self, student: Tensor, teacher, labels: Optional[Tensor], reduction: str) -> Tensor:
        from kdfast import reference
        from kdfast.softlabels import SoftLabels

        common = dict(divergence=self.divergence, temperature=self.temperature, alpha=self.alpha, beta=self.beta,
                      ignore_index=self.ignore_index, reduction=reduction, label_smoothing=self.label_smoothing,
                      t2_scale=self.t2_scale)
        if self.sparse:
            indices, logprobs, tail = teacher
            soft = SoftLabels(indices, logprobs, tail, self.temperature, student.shape[-1])
            return reference.sparse_kd_loss(student, soft, labels, tail=self.tail_mode, **common)
        return reference.kd_loss(student, teacher, labels, **common)

    def forward(self, student: Tensor, teacher, labels: Optional[Tensor], reduction: str):
        """(loss, row_stats or None) of the chunk."""
        if not self.kernels:
            with torch.no_grad():
                return self._reference_loss(student, teacher, labels, reduction), None
        if self.sparse:
            loss, stats, _ = _sparse_ops.sparse_kd_forward_impl(student, *teacher, labels,
                                                                 *self._kernel_options(reduction))
        else:
            loss, stats, _ = _kd_ops.forward_impl(student, teacher, labels, *self._kernel_options(reduction))
        return loss, stats

    def gradient(self, student: Tensor, teacher, labels: Optional[Tensor], row_stats: Optional[Tensor],
                 grad_output: Tensor, reduction: str, out: Tensor) -> Tensor:
        """d(grad_output · loss)/d student into `out` (which may alias `student` for dense kernels)."""
        if not self.kernels or row_stats is None:
            with torch.enable_grad():
                leaf = student.detach().clone().requires_grad_(True)
                loss = self._reference_loss(leaf, teacher, labels, reduction)
                (grad,) = torch.autograd.grad(loss, leaf, grad_output.to(loss.dtype).expand_as(loss))
            return out.copy_(grad)
        valid = row_stats.new_ones(())  # read by the kernels for "mean" only, never used here
        if self.sparse:
            return _sparse_ops.sparse_kd_backward_impl(grad_output, student, *teacher, labels, row_stats, valid,
                                                       *self._kernel_options(reduction), out=out)
        return _kd_ops.backward_impl(grad_output, student, teacher, labels, row_stats, valid,
                                     *self._kernel_options(reduction), out=out)

    @property
    def gradient_in_place(self) -> bool:
        return self.kernels and not self.sparse


def _teacher_chunk(start: int, stop: int, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                   teacher_columns, soft, buffer: Optional[Tensor], dtype: torch.dtype):
    if soft is not None:
        return tuple(t[start:stop] for t in soft)
    if teacher_logits is not None:
        chunk = teacher_logits[start:stop]
    else:
        chunk = buffer[: stop - start]
        torch.matmul(teacher_hidden[start:stop], teacher_weight.t(), out=chunk)
        if teacher_bias is not None:
            chunk.add_(teacher_bias)
    if teacher_columns is not None:
        chunk = chunk.index_select(1, teacher_columns.clamp(min=0))
        chunk.masked_fill_(teacher_columns < 0, float("-inf"))
    if dtype == torch.float64 and chunk.dtype != torch.float64:
        chunk = chunk.to(torch.float64)
    return chunk


def _student_chunk(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: float, start: int, stop: int,
                   buffer: Tensor) -> Tensor:
    chunk = buffer[: stop - start]
    torch.matmul(hidden[start:stop], weight.t(), out=chunk)
    if bias is not None:
        chunk.add_(bias)
    if softcap > 0:
        chunk.div_(softcap).tanh_().mul_(softcap)
    return chunk


def _fold_gradient(grad_logits: Tensor, logits: Tensor, softcap: float, hidden: Tensor, weight: Tensor,
                   start: int, stop: int, grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Optional[Tensor]):
    """Chain the chunk's logit gradient through the soft cap and the linear layer."""
    if softcap > 0:  # d(c·tanh(x/c))/dx = 1 − (capped/c)²; `logits` is free to overwrite now
        grad_logits.mul_(logits.div_(softcap).square_().neg_().add_(1))
    torch.matmul(grad_logits, weight, out=grad_hidden[start:stop])
    grad_weight.addmm_(grad_logits.t(), hidden[start:stop])
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0))


def reduction_scale(labels: Optional[Tensor], rows: int, reduction: str, ignore_index: int, dtype, device) -> Tensor:
    """The factor a summed loss takes for `reduction` ("sum": 1, "batchmean": 1/rows, "mean":
    1/valid rows, 1 when no row is valid), as a 0-dim tensor (no host synchronisation)."""
    if reduction == "mean":
        valid = (labels != ignore_index).sum() if labels is not None else torch.tensor(rows, device=device)
        return 1.0 / valid.clamp(min=1).to(dtype)
    if reduction == "batchmean":
        return torch.tensor(1.0 / max(rows, 1), dtype=dtype, device=device)
    return torch.ones((), dtype=dtype, device=device)


def _buffers(hidden: Tensor, vocab: int, chunk_rows: int, teacher_hidden: Optional[Tensor], separate_gradient: bool):
    logits = torch.empty((chunk_rows, vocab), dtype=hidden.dtype, device=hidden.device)
    teacher = (torch.empty((chunk_rows, vocab), dtype=teacher_hidden.dtype, device=hidden.device)
               if teacher_hidden is not None else None)
    gradient = torch.empty_like(logits) if separate_gradient else logits
    return logits, teacher, gradient


def forward_impl(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    teacher_logits: Optional[Tensor], teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
    teacher_bias: Optional[Tensor], teacher_columns: Optional[Tensor],
    soft_indices: Optional[Tensor], soft_logprobs: Optional[Tensor], soft_tail: Optional[Tensor],
    labels: Optional[Tensor], compute_grads: bool, chunk_rows: int, softcap: float, kernels: bool,
    divergence: str, tail_mode: str, reduction: str, temperature: float, alpha: float, beta: float,
    label_smoothing: float, t2_scale: bool, ignore_index: int, chunk_loss=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunk loop; `chunk_loss` replaces the kernels' ChunkLoss (kdfast.vocab_parallel)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden)
    device = hidden.device
    soft = (soft_indices, soft_logprobs, soft_tail) if soft_indices is not None else None
    if chunk_loss is None:
        chunk_loss = ChunkLoss(soft is not None, kernels, (divergence, tail_mode, reduction, temperature, alpha, beta,
                                                           label_smoothing, t2_scale, ignore_index))
    per_row = reduction == "none"
    grads = compute_grads and not per_row
    logits_buffer, teacher_buffer, grad_buffer = _buffers(
        hidden, vocab, min(chunk_rows, max(rows, 1)), teacher_hidden,
        grads and (softcap > 0 or not chunk_loss.gradient_in_place))
    empty = hidden.new_empty((0,))
    row_loss = torch.empty((rows,), dtype=dtype, device=device) if per_row else None
    row_stats = None
    total = torch.zeros((), dtype=dtype, device=device)
    scale = reduction_scale(labels, rows, reduction, ignore_index, dtype, device)
    grad_hidden = torch.empty_like(hidden) if grads else empty
    grad_weight = torch.zeros_like(weight) if grads else empty
    grad_bias = torch.zeros_like(bias) if grads and bias is not None else None
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            logits = _student_chunk(hidden, weight, bias, softcap, start, stop, logits_buffer)
            teacher = _teacher_chunk(start, stop, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                                     teacher_columns, soft, teacher_buffer, dtype)
            chunk_labels = labels[start:stop] if labels is not None else None
            loss, stats = chunk_loss.forward(logits, teacher, chunk_labels, "none" if per_row else "sum")
            if per_row:
                row_loss[start:stop] = loss
                if stats is not None:
                    if row_stats is None:
                        row_stats = stats.new_empty((rows, stats.shape[1]))
                    row_stats[start:stop] = stats
                continue
            total += loss
            if grads:
                grad_logits = chunk_loss.gradient(logits, teacher, chunk_labels, stats, scale, "sum",
                                                  grad_buffer[: stop - start])
                _fold_gradient(grad_logits, logits, softcap, hidden, weight, start, stop, grad_hidden, grad_weight,
                               grad_bias)
    loss = row_loss if per_row else total * scale
    if row_stats is None:
        row_stats = torch.empty((0, 0), dtype=dtype, device=device)
    return loss, row_stats, grad_hidden, grad_weight, grad_bias if grad_bias is not None else empty


def backward_impl(
    grad_rows: Tensor, row_stats: Tensor,
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    teacher_logits: Optional[Tensor], teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
    teacher_bias: Optional[Tensor], teacher_columns: Optional[Tensor],
    soft_indices: Optional[Tensor], soft_logprobs: Optional[Tensor], soft_tail: Optional[Tensor],
    labels: Optional[Tensor], chunk_rows: int, softcap: float, kernels: bool,
    divergence: str, tail_mode: str, temperature: float, alpha: float, beta: float,
    label_smoothing: float, t2_scale: bool, ignore_index: int, chunk_loss=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ grad_rows·loss_rows (reduction "none"), recomputing each chunk."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden)
    soft = (soft_indices, soft_logprobs, soft_tail) if soft_indices is not None else None
    if chunk_loss is None:
        chunk_loss = ChunkLoss(soft is not None, kernels, (divergence, tail_mode, "none", temperature, alpha, beta,
                                                           label_smoothing, t2_scale, ignore_index))
    logits_buffer, teacher_buffer, grad_buffer = _buffers(
        hidden, vocab, min(chunk_rows, max(rows, 1)), teacher_hidden, softcap > 0 or not chunk_loss.gradient_in_place)
    grad_rows = grad_rows.to(dtype).contiguous()
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight)
    grad_bias = torch.zeros_like(bias) if bias is not None else None
    has_stats = row_stats.numel() > 0
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            logits = _student_chunk(hidden, weight, bias, softcap, start, stop, logits_buffer)
            teacher = _teacher_chunk(start, stop, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                                     teacher_columns, soft, teacher_buffer, dtype)
            chunk_labels = labels[start:stop] if labels is not None else None
            stats = row_stats[start:stop] if has_stats else None
            grad_logits = chunk_loss.gradient(logits, teacher, chunk_labels, stats,
                                              grad_rows[start:stop], "none", grad_buffer[: stop - start])
            _fold_gradient(grad_logits, logits, softcap, hidden, weight, start, stop, grad_hidden, grad_weight,
                           grad_bias)
    return grad_hidden, grad_weight, grad_bias if grad_bias is not None else hidden.new_empty((0,))


# ------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("kdfast::fused_linear_kd_forward", mutates_args=(), device_types=("cpu", "cuda"))
def fused_linear_kd_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    teacher_logits: Optional[Tensor], teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
    teacher_bias: Optional[Tensor], teacher_columns: Optional[Tensor],
    soft_indices: Optional[Tensor], soft_logprobs: Optional[Tensor], soft_tail: Optional[Tensor],
    labels: Optional[Tensor], compute_grads: bool, chunk_rows: int, softcap: float, kernels: bool,
    divergence: str, tail_mode: str, reduction: str, temperature: float, alpha: float, beta: float,
    label_smoothing: float, t2_scale: bool, ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    outputs = forward_impl(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                           teacher_columns, soft_indices, soft_logprobs, soft_tail, labels, compute_grads, chunk_rows,
                           softcap, kernels, divergence, tail_mode, reduction, temperature, alpha, beta,
                           label_smoothing, t2_scale, ignore_index)
    # custom ops may not return views of (or the same tensor as) another output
    return tuple(t if t.numel() else t.clone() for t in outputs)


@fused_linear_kd_forward.register_fake
def _(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, teacher_columns,
      soft_indices, soft_logprobs, soft_tail, labels, compute_grads, chunk_rows, softcap, kernels, divergence,
      tail_mode, reduction, temperature, alpha, beta, label_smoothing, t2_scale, ignore_index):
    rows = hidden.shape[0]
    dtype = compute_dtype(hidden)
    per_row = reduction == "none"
    loss = hidden.new_empty((rows,) if per_row else (), dtype=dtype)
    if per_row and kernels:
        stats = (hidden.new_empty((rows, _sparse_ops.SPARSE_ROW_STATS), dtype=torch.float64)
                 if soft_indices is not None else hidden.new_empty((rows, _kd_ops.ROW_STATS), dtype=dtype))
    else:
        stats = hidden.new_empty((0, 0), dtype=dtype)
    grads = compute_grads and not per_row
    empty = hidden.new_empty((0,))
    return (loss, stats, torch.empty_like(hidden) if grads else empty,
            torch.empty_like(weight) if grads else hidden.new_empty((0,)),
            torch.empty_like(bias) if grads and bias is not None else hidden.new_empty((0,)))


@torch.library.custom_op("kdfast::fused_linear_kd_backward", mutates_args=(), device_types=("cpu", "cuda"))
def fused_linear_kd_backward(
    grad_rows: Tensor, row_stats: Tensor,
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
    teacher_logits: Optional[Tensor], teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
    teacher_bias: Optional[Tensor], teacher_columns: Optional[Tensor],
    soft_indices: Optional[Tensor], soft_logprobs: Optional[Tensor], soft_tail: Optional[Tensor],
    labels: Optional[Tensor], chunk_rows: int, softcap: float, kernels: bool,
    divergence: str, tail_mode: str, temperature: float, alpha: float, beta: float,
    label_smoothing: float, t2_scale: bool, ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return backward_impl(grad_rows, row_stats, hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                         teacher_bias, teacher_columns, soft_indices, soft_logprobs, soft_tail, labels, chunk_rows,
                         softcap, kernels, divergence, tail_mode, temperature, alpha, beta, label_smoothing, t2_scale,
                         ignore_index)


@fused_linear_kd_backward.register_fake
def _(grad_rows, row_stats, hidden, weight, bias, *rest):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else hidden.new_empty((0,)))


def _gradients(grad_loss: Tensor, saved: tuple, options: dict, op) -> tuple:
    """(grad_hidden, grad_weight, grad_bias) from the forward's gradients or a recomputation by `op`."""
    if options["reduction"] != "none":
        grad_hidden, grad_weight, grad_bias = saved
        g = grad_loss.to(grad_weight.dtype)
        return grad_hidden * g, grad_weight * g, (grad_bias * g if grad_bias.numel() else None)
    row_stats, *tensors = saved
    backward_options = {k: v for k, v in options.items() if k not in ("reduction", "compute_grads")}
    grad_hidden, grad_weight, grad_bias = op(grad_loss, row_stats, *tensors, **backward_options)
    return grad_hidden, grad_weight, (grad_bias if grad_bias.numel() else None)


OPTION_NAMES = ("compute_grads", "chunk_rows", "softcap", "kernels", "divergence", "tail_mode", "reduction",
                "temperature", "alpha", "beta", "label_smoothing", "t2_scale", "ignore_index")


def _setup_context(ctx, inputs, output):
    """Saves what backward needs: the inputs and row statistics for "none" (recomputation),
    else the forward's gradients."""
    tensors, options = inputs[:12], dict(zip(OPTION_NAMES, inputs[12:]))
    _, row_stats, grad_hidden, grad_weight, grad_bias = output
    if options["reduction"] == "none":
        ctx.save_for_backward(row_stats, *tensors)
    else:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.options = options


def _backward(ctx, grad_loss, *unused):
    saved = ctx.saved_tensors
    grads = _gradients(grad_loss, saved, ctx.options, fused_linear_kd_backward)
    return grads + (None,) * (12 + len(OPTION_NAMES) - 3)


fused_linear_kd_forward.register_autograd(_backward, setup_context=_setup_context)


class EagerFusedLinearKDLoss(torch.autograd.Function):
    """The custom ops' computation for eager mode, without the dispatcher's per-call cost."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = forward_impl(*inputs)
        _setup_context(ctx, inputs, outputs)
        return outputs[0]

    @staticmethod
    def backward(ctx, grad_loss):
        saved = ctx.saved_tensors
        if ctx.options["reduction"] != "none":
            grad_hidden, grad_weight, grad_bias = saved
            if bool(grad_loss == 1):  # loss.backward(): hand over the forward's gradients, no copy
                grads = (grad_hidden, grad_weight, grad_bias if grad_bias.numel() else None)
            else:
                g = grad_loss.to(grad_weight.dtype)
                grads = (grad_hidden * g, grad_weight * g, grad_bias * g if grad_bias.numel() else None)
        else:
            grads = _gradients(grad_loss, saved, ctx.options, backward_impl)
        return grads + (None,) * (12 + len(OPTION_NAMES) - 3)


def fused_linear_kd_loss(*inputs) -> Tensor:
    """Through the custom op when compiling, else through EagerFusedLinearKDLoss."""
    if torch.compiler.is_compiling():
        return fused_linear_kd_forward(*inputs)[0]
    return EagerFusedLinearKDLoss.apply(*inputs)
