"""Drop-ins for Liger-Kernel 0.8.5's distillation losses (`liger_kernel.transformers`).

Same class names, constructor arguments and defaults, forward signatures and numbers as
Liger-Kernel 0.8.5 (which runs only on GPUs through Triton; these run wherever kdfast does):

- `LigerKLDIVLoss(eps=1e-10, size_average=None, reduce=None, reduction="mean", log_target=False)`,
  a `torch.nn.KLDivLoss`: y_pred [BT, V] log-probabilities, y_true [BT, V] probabilities (or
  log-probabilities with `log_target`); element loss y_true·(log max(y_true, eps) − y_pred)
  (exp(y_true)·(y_true − y_pred) with `log_target`); "mean" divides by BT·V, "batchmean" by
  BT, "none" returns the float32 [BT, V] elements. An element-wise loss with the element-wise
  gradient −y_true: it has no softmax to fuse, so it is a memory-lean float32 autograd function
  (it saves only y_true), not a kernel call.
- `LigerJSD(beta=0.5, ignore_index=-100)`: forward(log_q, log_p, shift_labels=None) with the
  student's and teacher's log-probabilities [BT, V]; β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q,
  β = 0 forward KL(p‖q), β = 1 reverse KL(q‖p); mean over rows whose label is not
  `ignore_index` (all rows without labels); the loss has log_q's dtype. Runs the fused kernels
  on the log-probabilities as logits (their softmax is the distribution itself). Gradient note:
  Liger returns the element-wise partial derivative with respect to log_q; kdfast's differs
  from it by a multiple of q per row, which is exactly what backpropagation through the
  `log_softmax` that produced log_q removes, so the gradients of the logits and of everything
  before them are the same as Liger's.
- `LigerFusedLinearJSD(jsd_beta=0.5, ignore_index=-100, temperature=1.0, accum_dtype=None)`:
  forward(student_input [BT, H], student_weight [V, H], teacher_input [BT, H'], teacher_weight
  [V, H'], shift_labels [BT] or None): the JSD above of softmax(logits/T), no T² factor,
  mean over kept rows, float32 loss, on `fused_linear_kd_loss` (never holds [BT, V] logits).

Labels only mark kept rows (any value other than `ignore_index` is kept). Vocabulary entries
masked with −inf in both models contribute 0.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from kdfast.compat._common import SKIP, keep_rows
from kdfast.functional import fused_linear_kd_loss, kd_loss
from kdfast.ops import empty_for_writing

__all__ = ["LigerFusedLinearJSD", "LigerJSD", "LigerKLDIVLoss"]

_KL_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _jsd_options(beta: float) -> dict:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return {"divergence": "forward_kl"}
    if beta == 1.0:
        return {"divergence": "reverse_kl"}
    return {"divergence": "jsd", "beta": float(beta)}


_BLOCK = 1 << 17  # elements per block of the blocked KL sum: its temporary stays in the L2 cache


def _blocked_kl_sum(pred: Tensor, true: Tensor, log_target: bool, eps: float, compute: torch.dtype) -> Tensor:
    """Σ of Liger's KL elements over two same-shape tensors, as a 0-dim tensor of `compute` dtype.

    Walks both flattened tensors in blocks of `_BLOCK` elements: each block's log-ratio is built
    in one reused buffer and dotted with its weight (y_true, or exp(y_true) with `log_target`),
    the block sums added in float64, so the inputs are read once from memory and nothing of
    their size is allocated.
    """
    pred, true = pred.reshape(-1), true.reshape(-1)
    size = pred.numel()
    ratio = torch.empty(min(size, _BLOCK), dtype=compute, device=pred.device)
    weight = torch.empty_like(ratio) if log_target else None
    total = torch.zeros((), dtype=torch.float64, device=pred.device)
    for start in range(0, size, _BLOCK):
        stop = min(start + _BLOCK, size)
        out = ratio[: stop - start]
        p, t = pred[start:stop].to(compute), true[start:stop].to(compute)
        if log_target:  # exp(t)·(t − p)
            torch.sub(t, p, out=out)
            t = torch.exp(t, out=weight[: stop - start])
        else:  # t·(log max(t, eps) − p)
            torch.clamp(t, min=eps, out=out).log_().sub_(p)
        total += torch.dot(out, t).to(torch.float64)
    return total.to(compute)


class _ElementwiseKLDiv(torch.autograd.Function):
    """Liger's KL-divergence: float32 forward, gradient −y_true (−exp(y_true)) scaled by the reduction.

    For the scalar reductions the element losses are summed block by block (`_blocked_kl_sum`:
    one read of each input, no temporary of their size); "none" builds them in one buffer of
    the target's size. The backward reads only y_true.
    """

    @staticmethod
    def forward(ctx, y_pred: Tensor, y_true: Tensor, reduction: str, log_target: bool, eps: float) -> Tensor:
        compute = torch.float64 if y_pred.dtype == torch.float64 else torch.float32
        ctx.save_for_backward(y_true)
        ctx.reduction, ctx.log_target, ctx.pred_dtype = reduction, log_target, y_pred.dtype
        rows, vocab = y_pred.shape
        if reduction == "none":
            pred, true = y_pred.to(compute), y_true.to(compute)
            if log_target:
                elements = torch.sub(true, pred).mul_(true.exp())
            else:
                elements = true.clamp_min(eps).log_().sub_(pred).mul_(true)
            return elements.to(torch.float32)
        total = _blocked_kl_sum(y_pred, y_true, log_target, eps, compute)
        if reduction == "batchmean":
            total = total / rows
        elif reduction == "mean":
            total = total / (rows * vocab)
        return total.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (y_true,) = ctx.saved_tensors
        rows, vocab = y_true.shape
        scale = {"batchmean": 1.0 / rows, "mean": 1.0 / (rows * vocab)}.get(ctx.reduction, 1.0)
        factor = grad_output.to(torch.float32) * -scale
        weight = y_true.to(torch.float32)
        grad = empty_for_writing(weight.shape, torch.float32, weight.device)
        if ctx.log_target:
            torch.exp(weight, out=grad).mul_(factor)
        else:
            torch.mul(weight, factor, out=grad)
        return grad.to(ctx.pred_dtype), None, None, None, None


class LigerKLDIVLoss(nn.KLDivLoss):
    """Liger-Kernel 0.8.5 `LigerKLDIVLoss` (a `torch.nn.KLDivLoss` with `eps`).

    Args:
        eps: floor of y_true inside the log when `log_target` is False (default 1e-10).
        size_average, reduce, reduction, log_target: as `torch.nn.KLDivLoss` (reduction
            default "mean", which divides by BT·V).

    forward(y_pred [BT, V] log-probabilities, y_true [BT, V]) -> float32 scalar, or float32
    [BT, V] for reduction="none". Gradient to y_pred only, in its dtype.
    """

    def __init__(self, eps: float = 1e-10, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.reduction not in _KL_REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduction!r}; expected one of {_KL_REDUCTIONS}")
        self.eps = eps

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        if y_pred.dim() != 2 or y_pred.shape != y_true.shape:
            raise ValueError(f"LigerKLDIVLoss expects y_pred and y_true of the same shape [BT, V], got "
                             f"{tuple(y_pred.shape)} and {tuple(y_true.shape)}")
        return _ElementwiseKLDiv.apply(y_pred, y_true, self.reduction, self.log_target, self.eps)


class LigerJSD(nn.Module):
    """Liger-Kernel 0.8.5 `LigerJSD` (generalised JSD on log-probabilities) on the fused kernels.

    Args:
        beta: β in [0, 1] (default 0.5); 0 is forward KL(p‖q), 1 reverse KL(q‖p).
        ignore_index: label value of rows to skip (default -100).

    forward(log_q [BT, V] student log-probabilities, log_p [BT, V] teacher log-probabilities,
    shift_labels [BT] or None) -> scalar in log_q's dtype: the mean over kept rows (0 when none).
    """

    def __init__(self, beta: float = 0.5, ignore_index: int = -100):
        super().__init__()
        self.beta = beta
        self.ignore_index = ignore_index

    def forward(self, log_q: Tensor, log_p: Tensor, shift_labels: Optional[Tensor] = None) -> Tensor:
        if log_q.dim() != 2:
            raise ValueError(f"LigerJSD expects log_q of shape [BT, V], got {tuple(log_q.shape)}")
        if shift_labels is not None and tuple(shift_labels.shape) != (log_q.shape[0],):
            raise ValueError(f"the shape of shift_labels must be (BT,). Got: {tuple(shift_labels.shape)}")
        keep = keep_rows(shift_labels, self.ignore_index, log_q.shape[0])
        loss = kd_loss(log_q, log_p, keep, ignore_index=SKIP, reduction="mean", t2_scale=False,
                       **_jsd_options(self.beta))
        return loss.to(log_q.dtype)


class LigerFusedLinearJSD(nn.Module):
    """Liger-Kernel 0.8.5 `LigerFusedLinearJSD` on `kdfast.functional.fused_linear_kd_loss`.

    Args:
        jsd_beta: β in [0, 1] (default 0.5); 0 forward KL, 1 reverse KL.
        ignore_index: label value of rows to skip (default -100).
        temperature: T > 0 (default 1.0) dividing both models' logits; no T² factor.
        accum_dtype: None or the student weight's dtype (grad_weight is accumulated in the
            weight's dtype); any other dtype raises ValueError.

    forward(student_input [BT, H], student_weight [V, H], teacher_input [BT, H'],
    teacher_weight [V, H'], shift_labels [BT] or None) -> float32 scalar: the mean over kept
    rows of JSD_β(softmax(t/T), softmax(s/T)). Gradients to student_input and student_weight.
    """

    def __init__(self, jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 accum_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        _jsd_options(jsd_beta)
        self.jsd_beta = jsd_beta
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.accum_dtype = accum_dtype

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                shift_labels: Optional[Tensor] = None) -> Tensor:
        if self.accum_dtype is not None and self.accum_dtype != student_weight.dtype:
            raise ValueError(f"accum_dtype={self.accum_dtype} is not supported: kdfast accumulates grad_weight in "
                             f"the weight's dtype ({student_weight.dtype}); pass accum_dtype=None")
        keep = keep_rows(shift_labels, self.ignore_index, student_input.shape[0])
        return fused_linear_kd_loss(student_input, student_weight, (teacher_input, teacher_weight.detach()), keep,
                                    temperature=self.temperature, ignore_index=SKIP, reduction="mean",
                                    t2_scale=False, **_jsd_options(self.jsd_beta))
