"""Chunked linear + KD loss: `kdfast::fused_linear_kd_forward` / `kdfast::fused_linear_kd_backward`.

The student's logits `hidden @ weight.T + bias` (optionally soft-capped, c·tanh(x/c)) are
never held whole: rows are processed `chunk_rows` at a time. Per chunk the logits are one
matmul (torch: MKL / cuBLAS) into a reused buffer, the teacher chunk is a slice of the
teacher logits, a matmul of the teacher's hidden states, or a slice of top-k soft labels,
and the kernel bodies of `ops/kd_loss.py` / `ops/sparse.py` give the chunk's loss and its
logit gradient. The logit gradient is then folded into grad_hidden (one matmul) and
accumulated into grad_weight / grad_bias, so that for the scalar reductions the forward
pass already produces every gradient (scaled by grad_output in backward). Reduction "none"
keeps the per-row statistics and recomputes the chunks in backward, because its gradient
depends on the per-row grad_output.

Contract (inputs validated and shaped by kdfast.functional.fused_linear_kd_loss):
- hidden [rows, H] and weight [V, H] (same floating dtype), bias None or [V]; labels None or
  int64 [rows]; exactly one teacher: `teacher_logits` [rows, V] (last dim contiguous, any row
  stride), or `teacher_hidden` [rows, H_t] with `teacher_weight` [V, H_t] (+ `teacher_bias`),
  or the soft-label tensors (`soft_indices`, `soft_logprobs` [rows, k], `soft_tail` [rows]);
  `teacher_columns` (int64 [V], −1 = no teacher column) optionally gathers the dense
  teacher's columns (applied after the teacher matmul).
- labels outside [0, V) that are not ignore_index raise ValueError naming fused_linear_kd_loss
  (read before the chunk loop, except with the CUDA kernels, whose rows get NaN instead).
- the forward body writes `loss` (compute dtype; 0-dim, or [rows] for "none"), `row_stats`
  (the kernels' per-row statistics for "none" with kernels, else [0, 0]) and, when
  `compute_grads` and the reduction is not "none", grad_hidden, grad_weight and grad_bias
  for grad_output = 1 (else they are empty). `forward_outputs` allocates exactly these.
  Memory above inputs and gradients: one chunk of logits (which the dense kernel overwrites
  with its own gradient), plus one teacher chunk for a hidden-state or column-mapped
  teacher, plus one gradient chunk for soft labels or a softcap.
- dtypes: the matmuls run in the hidden states' dtype. The soft cap c·tanh(s/c), the loss
  and the logit gradient (with the cap's derivative 1 − tanh²) are computed in the compute
  dtype (float32 for bfloat16/float16 inputs, in a capped-logits chunk of that dtype), and
  the logit gradient is rounded once to the hidden states' dtype before the gradient matmuls.
`FusedLinearKDLossFunction` is the one autograd wrapper; `run_forward` / `run_backward` are
the chunk loops, which `kdfast.vocab_parallel` drives with its own per-chunk loss. With
create_graph=True the backward pass differentiates `differentiable_loss` (the whole [rows, V]
logits in plain PyTorch, `kdfast.reference`) instead, so second-order gradients are exact.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdfast.contract.options import KDOptions, compute_dtype
from kdfast.contract.reductions import reduction_scale
from kdfast.contract.softlabels import SoftLabels
from kdfast.contract.validation import FUSED_LINEAR_NAMES, check_label_range
from kdfast.ops import kd_loss as kd_ops
from kdfast.ops import sparse as sparse_ops
from kdfast.ops._native import row_stats_width
from kdfast.ops._op import creating_graph, define_op, differentiable_gradients, launch
from kdfast.reference import dense as dense_reference
from kdfast.reference import sparse as sparse_reference

__all__ = ["ChunkLoss", "FusedLinearKDLossFunction", "default_chunk_rows", "differentiable_loss",
           "fused_linear_kd_backward", "fused_linear_kd_forward", "fused_linear_kd_loss", "run_backward",
           "run_forward"]

# Bytes of logits one chunk may take by default: small enough to stay out of the way of the
# model on the CPU, large enough for full-speed matmuls on a GPU.
DEFAULT_CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}


def default_chunk_rows(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk when the caller gives none: the largest power of two whose logits chunk
    ([chunk, V] in the logits' dtype) fits DEFAULT_CHUNK_BYTES for the device (32 MiB on the
    CPU, 256 MiB elsewhere), at least 1 and at most `rows`."""
    budget = DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cuda"])
    element_size = dtype.itemsize
    fit = max(1, budget // max(1, vocab * element_size))
    return max(1, min(rows, 1 << (fit.bit_length() - 1)))


class ChunkLoss:
    """Loss and logit gradient of one chunk of rows; `kernels=False` uses kdfast.reference.

    `teacher` is a [c, V] tensor or a (indices, logprobs, tail) triple of the chunk. The
    chunk's reduction is "none" (per-row losses, statistics kept for backward) or "sum".
    """

    def __init__(self, sparse: bool, kernels: bool, options: KDOptions):
        self.sparse, self.kernels, self.options = sparse, kernels, options

    def _reference_loss(self, student: Tensor, teacher, labels: Optional[Tensor], reduction: str) -> Tensor:
        o = self.options
        common = dict(reduction=reduction, **o.row_options())
        if self.sparse:
            indices, logprobs, tail = teacher
            soft = SoftLabels(indices, logprobs, tail, o.temperature, student.shape[-1])
            return sparse_reference.sparse_kd_loss(student, soft, labels, tail=o.tail, **common)
        return dense_reference.kd_loss(student, teacher, labels, **common)

    def forward(self, student: Tensor, teacher, labels: Optional[Tensor], reduction: str):
        """(loss, row_stats or None) of the chunk."""
        if not self.kernels:
            with torch.no_grad():
                return self._reference_loss(student, teacher, labels, reduction), None
        options = self.options.replace(reduction=reduction)
        ops = sparse_ops if self.sparse else kd_ops
        loss, stats, valid = ops.forward_outputs(student, options)
        teacher_tensors = tuple(teacher) if self.sparse else (teacher,)
        ops.forward_body(student, *teacher_tensors, labels, loss, stats, valid, options)
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
        options = self.options.replace(reduction=reduction)
        ops = sparse_ops if self.sparse else kd_ops
        teacher_tensors = tuple(teacher) if self.sparse else (teacher,)
        ops.backward_body(grad_output, student, *teacher_tensors, labels, row_stats, valid, out, options)
        return out

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
                   buffers) -> Tensor:
    """The chunk's student logits: h·Wᵀ + b in the hidden states' dtype, soft-capped in the compute dtype."""
    chunk = buffers.raw[: stop - start]
    torch.matmul(hidden[start:stop], weight.t(), out=chunk)
    if bias is not None:
        chunk.add_(bias)
    if softcap <= 0:
        return chunk
    capped = buffers.capped[: stop - start]
    if capped.dtype != chunk.dtype:
        capped.copy_(chunk)  # exact: bfloat16/float16 to float32
    return capped.div_(softcap).tanh_().mul_(softcap)


def _fold_gradient(grad_logits: Tensor, logits: Tensor, softcap: float, buffers, hidden: Tensor, weight: Tensor,
                   start: int, stop: int, grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Optional[Tensor]):
    """Chain the chunk's logit gradient through the soft cap and the linear layer."""
    if softcap > 0:  # d(c·tanh(x/c))/dx = 1 − (capped/c)², in the compute dtype; `logits` is free to overwrite now
        grad_logits.mul_(logits.div_(softcap).square_().neg_().add_(1))
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0))
    if grad_logits.dtype != hidden.dtype:  # the one rounding of the logit gradient, for the matmuls
        grad_logits = buffers.raw[: stop - start].copy_(grad_logits)
    torch.matmul(grad_logits, weight, out=grad_hidden[start:stop])
    grad_weight.addmm_(grad_logits.t(), hidden[start:stop])


class _Buffers:
    """The [chunk, V] buffers one chunk loop reuses.

    `raw`: the logits h·Wᵀ + b in the hidden states' dtype. `capped` (softcap only): the
    soft-capped logits in the compute dtype, `raw` itself unless the hidden states are
    bfloat16/float16. `teacher`: the teacher's logits of a hidden-state teacher. `gradient`:
    where the chunk's logit gradient goes: `raw` when the loss writes it over its input, else
    a buffer of the logits' dtype (the compute dtype with a softcap, whose derivative needs
    the capped logits after the loss has run).
    """

    def __init__(self, hidden: Tensor, vocab: int, chunk_rows: int, teacher_hidden: Optional[Tensor], softcap: float,
                 gradient_in_place: bool, with_gradient: bool):
        shape, device = (chunk_rows, vocab), hidden.device
        dtype = compute_dtype(hidden)
        self.raw = torch.empty(shape, dtype=hidden.dtype, device=device)
        self.capped = None
        if softcap > 0:
            self.capped = self.raw if hidden.dtype == dtype else torch.empty(shape, dtype=dtype, device=device)
        self.teacher = (torch.empty(shape, dtype=teacher_hidden.dtype, device=device)
                        if teacher_hidden is not None else None)
        self.gradient = None
        if with_gradient:
            if softcap > 0:
                self.gradient = torch.empty(shape, dtype=dtype, device=device)
            else:
                self.gradient = self.raw if gradient_in_place else torch.empty_like(self.raw)


def run_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_logits: Optional[Tensor],
                teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                teacher_columns: Optional[Tensor], soft, labels: Optional[Tensor], loss: Tensor,
                row_stats: Optional[Tensor], grads: Optional[tuple], chunk_rows: int, softcap: float,
                chunk_loss) -> Tensor:
    """The forward chunk loop: writes `loss`, the per-row statistics of reduction "none" into
    `row_stats` (when non-empty; None allocates them at the width the chunk loss gives) and,
    when `grads` is a (grad_hidden, grad_weight, grad_bias or None) triple, the gradients for
    grad_output = 1. Returns the statistics ([0, 0] when none are kept)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden)
    device = hidden.device
    options = chunk_loss.options
    per_row = options.reduction == "none"
    buffers = _Buffers(hidden, vocab, min(chunk_rows, max(rows, 1)), teacher_hidden, softcap,
                       chunk_loss.gradient_in_place, grads is not None)
    keep_stats = per_row and (row_stats is None or row_stats.numel() > 0)
    total = torch.zeros((), dtype=dtype, device=device)
    scale = reduction_scale(labels, rows, options.reduction, options.ignore_index, dtype, device)
    if grads is not None:
        grads[1].zero_()
        if grads[2] is not None:
            grads[2].zero_()
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            logits = _student_chunk(hidden, weight, bias, softcap, start, stop, buffers)
            teacher = _teacher_chunk(start, stop, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                                     teacher_columns, soft, buffers.teacher, dtype)
            chunk_labels = labels[start:stop] if labels is not None else None
            chunk_value, stats = chunk_loss.forward(logits, teacher, chunk_labels, "none" if per_row else "sum")
            if per_row:
                loss[start:stop] = chunk_value
                if keep_stats and stats is not None:
                    if row_stats is None:
                        row_stats = stats.new_empty((rows, stats.shape[1]))
                    row_stats[start:stop] = stats
                continue
            total += chunk_value
            if grads is not None:
                grad_logits = chunk_loss.gradient(logits, teacher, chunk_labels, stats, scale, "sum",
                                                  buffers.gradient[: stop - start])
                _fold_gradient(grad_logits, logits, softcap, buffers, hidden, weight, start, stop, *grads)
    if not per_row:
        loss.copy_(total * scale)
    return row_stats if row_stats is not None else hidden.new_empty((0, 0), dtype=dtype)


def run_backward(grad_rows: Tensor, row_stats: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                 teacher_logits: Optional[Tensor], teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
                 teacher_bias: Optional[Tensor], teacher_columns: Optional[Tensor], soft, labels: Optional[Tensor],
                 grads: tuple, chunk_rows: int, softcap: float, chunk_loss) -> None:
    """Writes the gradients of Σ grad_rows·loss_rows (reduction "none") into `grads`, recomputing each chunk."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    dtype = compute_dtype(hidden)
    buffers = _Buffers(hidden, vocab, min(chunk_rows, max(rows, 1)), teacher_hidden, softcap,
                       chunk_loss.gradient_in_place, True)
    grad_rows = grad_rows.to(dtype).contiguous()
    grads[1].zero_()
    if grads[2] is not None:
        grads[2].zero_()
    has_stats = row_stats.numel() > 0
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            logits = _student_chunk(hidden, weight, bias, softcap, start, stop, buffers)
            teacher = _teacher_chunk(start, stop, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                                     teacher_columns, soft, buffers.teacher, dtype)
            chunk_labels = labels[start:stop] if labels is not None else None
            stats = row_stats[start:stop] if has_stats else None
            grad_logits = chunk_loss.gradient(logits, teacher, chunk_labels, stats,
                                              grad_rows[start:stop], "none", buffers.gradient[: stop - start])
            _fold_gradient(grad_logits, logits, softcap, buffers, hidden, weight, start, stop, *grads)


# ------------------------------------------------------------------------------ custom ops
def _soft(soft_indices: Optional[Tensor], soft_logprobs: Optional[Tensor], soft_tail: Optional[Tensor]):
    return (soft_indices, soft_logprobs, soft_tail) if soft_indices is not None else None


def forward_body(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_logits: Optional[Tensor],
                 teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                 teacher_columns: Optional[Tensor], soft_indices: Optional[Tensor], soft_logprobs: Optional[Tensor],
                 soft_tail: Optional[Tensor], labels: Optional[Tensor], loss: Tensor, row_stats: Tensor,
                 grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Tensor, compute_grads: bool, chunk_rows: int,
                 softcap: float, kernels: bool, options: KDOptions) -> None:
    """Writes the outputs `forward_outputs` allocated (see the module contract)."""
    if not (kernels and labels is not None and labels.is_cuda):  # else the kernels give NaN rows, without a sync
        check_label_range(labels, weight.shape[0], options.ignore_index, FUSED_LINEAR_NAMES)
    soft = _soft(soft_indices, soft_logprobs, soft_tail)
    grads = None
    if compute_grads and options.reduction != "none":
        grads = (grad_hidden, grad_weight, grad_bias if bias is not None else None)
    run_forward(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, teacher_columns,
                soft, labels, loss, row_stats, grads, chunk_rows, softcap,
                ChunkLoss(soft is not None, kernels, options))


def backward_body(grad_rows: Tensor, row_stats: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                  teacher_logits: Optional[Tensor], teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor],
                  teacher_bias: Optional[Tensor], teacher_columns: Optional[Tensor], soft_indices: Optional[Tensor],
                  soft_logprobs: Optional[Tensor], soft_tail: Optional[Tensor], labels: Optional[Tensor],
                  grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Tensor, chunk_rows: int, softcap: float,
                  kernels: bool, options: KDOptions) -> None:
    """Writes the gradients of Σ grad_rows·loss_rows (reduction "none") into grad_hidden/weight/bias."""
    soft = _soft(soft_indices, soft_logprobs, soft_tail)
    run_backward(grad_rows, row_stats, hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight,
                 teacher_bias, teacher_columns, soft, labels,
                 (grad_hidden, grad_weight, grad_bias if bias is not None else None), chunk_rows, softcap,
                 ChunkLoss(soft is not None, kernels, options))


fused_linear_kd_forward = define_op("kdfast::fused_linear_kd_forward", forward_body,
                                    mutates=("loss", "row_stats", "grad_hidden", "grad_weight", "grad_bias"))
fused_linear_kd_backward = define_op("kdfast::fused_linear_kd_backward", backward_body,
                                     mutates=("grad_hidden", "grad_weight", "grad_bias"))


def forward_outputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], sparse: bool, compute_grads: bool,
                    kernels: bool, options: KDOptions) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, row_stats, grad_hidden, grad_weight, grad_bias) allocated for `forward_body`."""
    rows = hidden.shape[0]
    dtype = compute_dtype(hidden)
    per_row = options.reduction == "none"
    loss = hidden.new_empty((rows,) if per_row else (), dtype=dtype)
    if per_row and kernels:
        row_stats = (hidden.new_empty((rows, row_stats_width("sparse")), dtype=torch.float64) if sparse
                     else hidden.new_empty((rows, row_stats_width("kd")), dtype=dtype))
    else:
        row_stats = hidden.new_empty((0, 0), dtype=dtype)
    grads = compute_grads and not per_row
    grad_hidden = torch.empty_like(hidden) if grads else hidden.new_empty((0,))
    grad_weight = torch.empty_like(weight) if grads else hidden.new_empty((0,))
    grad_bias = torch.empty_like(bias) if grads and bias is not None else hidden.new_empty((0,))
    return loss, row_stats, grad_hidden, grad_weight, grad_bias


def differentiable_loss(inputs, softcap: float, options: KDOptions) -> Tensor:
    """The loss `forward_body` computes, written with differentiable PyTorch operations on the
    whole [rows, V] logits (`kdfast.reference`): twice differentiable in hidden, weight and
    bias. `inputs`: hidden, weight, bias, the teacher tensors and labels, as in `forward_body`."""
    (hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, teacher_columns,
     soft_indices, soft_logprobs, soft_tail, labels) = inputs
    dtype = compute_dtype(hidden)
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    if softcap > 0:
        logits = softcap * torch.tanh(logits.to(dtype) / softcap)
    soft = _soft(soft_indices, soft_logprobs, soft_tail)
    rows, vocab = logits.shape
    buffer = None
    if teacher_hidden is not None:
        buffer = torch.empty((rows, vocab), dtype=teacher_hidden.dtype, device=hidden.device)
    with torch.no_grad():
        teacher = _teacher_chunk(0, rows, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, teacher_columns,
                                 soft, buffer, dtype)
    if soft is not None:
        return sparse_ops.differentiable_loss(logits, *teacher, labels, options)
    return kd_ops.differentiable_loss(logits, teacher, labels, options)


class FusedLinearKDLossFunction(torch.autograd.Function):
    """`apply(options, compute_grads, chunk_rows, softcap, kernels, hidden, weight, bias, teacher_logits,
    teacher_hidden, teacher_weight, teacher_bias, teacher_columns, soft_indices, soft_logprobs, soft_tail,
    labels) -> loss`; gradients reach hidden, weight and bias."""

    @staticmethod
    def forward(ctx, options: KDOptions, compute_grads: bool, chunk_rows: int, softcap: float, kernels: bool,
                *inputs: Optional[Tensor]) -> Tensor:
        hidden, weight, bias = inputs[:3]
        sparse = inputs[8] is not None
        outputs = forward_outputs(hidden, weight, bias, sparse, compute_grads, kernels, options)
        launch(fused_linear_kd_forward, forward_body,
               (*inputs, *outputs, compute_grads, chunk_rows, softcap, kernels), options)
        # the inputs are kept for reduction "none" (recomputed chunks) and for second-order gradients
        if options.reduction == "none":
            ctx.save_for_backward(outputs[1], *inputs)
        else:
            ctx.save_for_backward(*outputs[2:], *inputs)
        ctx.options, ctx.settings = options, (chunk_rows, softcap, kernels)
        ctx.has_bias = bias is not None
        return outputs[0]

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        saved = ctx.saved_tensors
        if creating_graph():  # second-order gradients: a differentiable recomputation
            inputs = saved[1:] if ctx.options.reduction == "none" else saved[3:]
            grads = differentiable_gradients(lambda: differentiable_loss(inputs, ctx.settings[1], ctx.options),
                                             inputs[:3], ctx.needs_input_grad[5:8], grad_loss)
            return (None,) * 5 + grads + (None,) * 9
        if ctx.options.reduction != "none":
            grad_hidden, grad_weight, grad_bias = saved[:3]
            if not torch.compiler.is_compiling() and bool(grad_loss == 1):
                grads = (grad_hidden, grad_weight, grad_bias)  # loss.backward(): no copy
            else:  # one rounding: the product is computed in the compute dtype
                scale = grad_loss.to(compute_dtype(grad_weight))
                grads = (grad_hidden * scale, grad_weight * scale, grad_bias * scale)
        else:
            row_stats, *inputs = saved
            hidden, weight, bias = inputs[:3]
            grads = (torch.empty_like(hidden), torch.empty_like(weight),
                     torch.empty_like(bias) if bias is not None else hidden.new_empty((0,)))
            launch(fused_linear_kd_backward, backward_body, (grad_loss, row_stats, *inputs, *grads, *ctx.settings),
                   ctx.options)
        grads = grads[:2] + ((grads[2] if ctx.has_bias else None),)
        return (None,) * 5 + grads + (None,) * 9


def fused_linear_kd_loss(options: KDOptions, compute_grads: bool, chunk_rows: int, softcap: float, kernels: bool,
                         *inputs: Optional[Tensor]) -> Tensor:
    """The chunked loss through `FusedLinearKDLossFunction`; `inputs` as in `forward_body`, up to labels."""
    return FusedLinearKDLossFunction.apply(options, compute_grads, chunk_rows, softcap, kernels, *inputs)
