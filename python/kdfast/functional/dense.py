"""`kd_loss`: the fused dense distillation loss of the functional API.

Validates its arguments (metadata only, so it traces under `torch.compile(fullgraph=True)`),
flattens `[..., V]` inputs to rows without copying when the vocabulary dimension is
contiguous, and runs `kdfast.ops.kd_loss` (the custom op under torch.compile, its body
directly in eager mode). CPU and CUDA tensors run the compiled kernels; tensors on other
devices (or CUDA when kdfast was built without CUDA kernels) use `kdfast.reference`, which
computes the same contract in plain PyTorch. With `process_group` the vocabulary is sharded
and `kdfast.vocab_parallel` computes the loss. On the CPU, when the student needs a gradient,
the loss and the gradient come from one pass over the logits (`kdfast.ops.kd_loss`);
`inplace_backward=True` writes that gradient over the student logits' own storage.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdfast import vocab_parallel
from kdfast.contract.options import KDOptions
from kdfast.contract.validation import check_kd_inputs
from kdfast.functional._rows import as_rows, uses_kernels
from kdfast.ops import kd_loss as kd_ops
from kdfast.reference import dense as reference

__all__ = ["kd_loss", "kd_loss_with_options"]


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    t2_scale: bool = True,
    process_group=None,
    inplace_backward: bool = False,
) -> Tensor:
    """Fused distillation loss α·CE(s, y) + (1−α)·τ·D(softmax(t/T), softmax(s/T)).

    Per row, with p = softmax(t/T) (teacher), q = softmax(s/T), r = softmax(s):
    D is `forward_kl` Σ p(log p − log q), `reverse_kl` Σ q(log q − log p), `jsd`
    β·KL(p‖m) + (1−β)·KL(q‖m) with m = βp + (1−β)q, or `tvd` ½Σ|p − q|;
    CE = −(1−ε)·log r_y − (ε/V)·Σ log r_i; τ = T² when `t2_scale` else 1.
    A term whose weight (α or 1−α) is 0 is not computed at all.

    Args:
        student_logits: [..., V] float32, bfloat16, float16 or float64. Receives the gradient.
        teacher_logits: [..., V], same shape; its dtype may differ from the student's
            (float64 is used for both when either is float64). Treated as a constant.
        labels: [...] int64 class indices in [0, V), or None (then every row is valid and
            `alpha` must be 0). Rows whose label equals `ignore_index` contribute 0 and get
            a zero gradient.
        divergence: "forward_kl" (default), "reverse_kl", "jsd" or "tvd".
        temperature: T in [1e-20, 1e20] (default 1.0).
        alpha: weight of the hard-label cross-entropy, in [0, 1] (default 0.0).
        beta: JSD mixture weight in (0, 1) (default 0.5); ignored by other divergences.
        ignore_index: label value of rows to skip (default -100).
        reduction: "mean" (default: sum over valid rows / number of valid rows, 0 when no
            row is valid), "sum", "batchmean" (sum / number of rows) or "none" (per-row
            losses with the leading shape [...]).
        label_smoothing: ε in [0, 1) for the cross-entropy term (default 0.0).
        t2_scale: scale the divergence by T² (default True), keeping gradient magnitudes
            comparable across temperatures.
        process_group: None, or the torch.distributed group the vocabulary is sharded over
            (tensor-parallel lm_head): each rank passes its logits shard [..., V_r] of student
            and teacher (slices in rank order) and the global labels; the exact full-vocabulary
            loss is computed by all-reducing row statistics (`kdfast.vocab_parallel`).
        inplace_backward: write the student gradient over the student logits' storage (CPU), so
            that training needs no [..., V] memory for it (default False). The forward pass then
            overwrites `student_logits` with the gradient of the loss (for grad_output = 1) when
            the student requires grad, and the backward pass hands that storage out (scaled in
            place when grad_output is not 1). Use it when nothing else reads the logits
            afterwards: a later backward through another use of them fails autograd's
            "modified by an inplace operation" check. Refused (ValueError) for a leaf logits
            tensor that requires grad or a view of one, off the CPU, and with `process_group`;
            a backward with create_graph=True, or a second backward, raises RuntimeError. Where
            the logits must be copied anyway (a float64 teacher with a lower-precision student,
            a non-contiguous vocabulary dimension) the gradient goes into that copy; rows taken
            with a step (a strided view, rows not contiguous) get a fresh gradient buffer.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [...] for reduction="none".
        The student gradient has the student's dtype. In a backward pass with
        create_graph=True the gradient is recomputed with differentiable PyTorch operations
        and carries a graph, so second-order gradients (e.g. a gradient penalty) are exact;
        with `process_group` such a backward raises RuntimeError.

    Raises:
        TypeError: logits not floating, labels not int64.
        ValueError: mismatched shapes or vocabularies, bad options (T ≤ 0, α outside [0, 1],
            α > 0 without labels, unknown divergence or reduction, …), mixed devices, or
            labels outside [0, V) that are not `ignore_index` (CPU). On CUDA tensors such
            labels do not raise, because checking would need a device-to-host
            synchronisation: their rows get a NaN loss and gradient, so "mean", "sum" and
            "batchmean" are NaN. Check labels beforehand where an error is needed.
    """
    check_kd_inputs(
        student_logits, teacher_logits, labels, divergence=divergence, temperature=temperature, alpha=alpha,
        beta=beta, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )
    options = KDOptions.of(divergence=divergence, reduction=reduction, temperature=temperature, alpha=alpha,
                           beta=beta, label_smoothing=label_smoothing, t2_scale=t2_scale, ignore_index=ignore_index)
    if inplace_backward:
        if process_group is not None:
            raise ValueError("kd_loss: inplace_backward=True is not supported with process_group")
        kd_ops.check_inplace_student(student_logits)
    if process_group is not None:
        vocab = student_logits.shape[-1]
        return vocab_parallel.kd_loss(
            as_rows(student_logits, vocab), as_rows(teacher_logits, vocab),
            labels.reshape(-1) if labels is not None else None, process_group, soft=False, options=options,
            leading_shape=student_logits.shape[:-1],
        )
    return kd_loss_with_options(student_logits, teacher_logits, labels, options, inplace_backward=inplace_backward)


def kd_loss_with_options(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor],
                         options: KDOptions, *, inplace_backward: bool = False) -> Tensor:
    """`kd_loss` on inputs it has validated, with its options as a `KDOptions` (which may set
    the dense-only options `teacher_entropy` and `divergence_weight`, as `kdfast.compat` does);
    no process group. Same shapes, dtypes and reductions as `kd_loss`."""
    if not uses_kernels(student_logits.device):
        return reference.kd_loss(student_logits, teacher_logits, labels, reduction=options.reduction,
                                 **options.row_options())
    if student_logits.dtype == torch.float64 or teacher_logits.dtype == torch.float64:
        student_logits = student_logits.to(torch.float64)
        teacher_logits = teacher_logits.to(torch.float64)
    vocab = student_logits.shape[-1]
    leading_shape = student_logits.shape[:-1]
    student_rows = as_rows(student_logits, vocab)
    teacher_rows = as_rows(teacher_logits.detach(), vocab)
    label_rows = labels.reshape(-1).contiguous() if labels is not None else None
    loss = kd_ops.kd_loss(student_rows, teacher_rows, label_rows, options, inplace=inplace_backward)
    if options.reduction == "none":
        loss = loss.reshape(leading_shape)
    return loss
