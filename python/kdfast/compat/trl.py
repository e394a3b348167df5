"""Drop-in for TRL's `GKDTrainer.generalized_jsd_loss` (trl 1.16.0, `trl.experimental.gkd`).

`generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
reduction="batchmean", num_items_in_batch=None)` with TRL's signature, defaults and numbers,
on the fused kernels. Per kept position, with p = softmax(t/T), q = softmax(s/T):
β = 0 is KL(p‖q), β = 1 is KL(q‖p), otherwise β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q.
No T² factor. Rows whose label is −100 (fixed, as in TRL) are dropped; other label values only
mark kept rows. Reductions as TRL: with `num_items_in_batch` the sum divided by it;
"batchmean" the sum over the kept rows' count (at least 1) with labels, otherwise over
`student_logits.size(0)` (the batch, not the tokens, for [B, T, V] logits); "sum"; "mean" the
sum over (rows × V) elements (NaN when no row is kept, as TRL's mean of an empty tensor).
TRL's "none" returns the element-wise [rows, V] divergence, which the fused kernels never
build: it raises ValueError here.

The loss has the type-promoted dtype of the logits (bfloat16 for bfloat16 logits), as TRL's,
but is computed in float32 and rounded once, so it is more accurate than TRL's bfloat16 math.
Vocabulary entries masked with −inf in both models contribute 0 (the limit 0·log 0); TRL's
formula gives NaN there.
"""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from kdfast.compat._common import SKIP, keep_rows, kept_count, result_dtype
from kdfast.functional import kd_loss

__all__ = ["generalized_jsd_loss"]

_REDUCTIONS = ("batchmean", "sum", "mean")


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
) -> Tensor:
    """TRL 1.16 `GKDTrainer.generalized_jsd_loss` on the fused kernels.

    Args:
        student_logits: [B, T, V] (or [rows, V]) float32, bfloat16 or float16; gets the gradient.
        teacher_logits: same shape, any floating dtype; a constant.
        labels: None or [B, T] integers; positions equal to −100 are dropped.
        beta: β in [0, 1] (default 0.5); 0 and 1 select forward and reverse KL.
        temperature: T > 0 (default 1.0); no T² scaling.
        reduction: "batchmean" (default), "sum" or "mean"; "none" raises ValueError.
        num_items_in_batch: None, or the global kept-token count (int or tensor) to divide the sum by.

    Returns:
        A 0-dim tensor in the promoted dtype of the two logits' dtypes.
    """
    if reduction not in _REDUCTIONS:
        if reduction == "none":
            raise ValueError("generalized_jsd_loss: reduction='none' returns TRL's element-wise [rows, V] "
                             "divergence, which kdfast's fused kernels do not build; use 'sum', 'mean' or "
                             "'batchmean', or kdfast.functional.kd_loss(..., reduction='none') for per-row losses")
        raise ValueError(f"generalized_jsd_loss: unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd_loss: beta must be in [0, 1], got {beta}")
    vocab = student_logits.shape[-1]
    rows = student_logits.numel() // vocab if vocab else 0
    keep = keep_rows(labels, -100, rows)
    if beta == 0:
        options = {"divergence": "forward_kl"}
    elif beta == 1:
        options = {"divergence": "reverse_kl"}
    else:
        options = {"divergence": "jsd", "beta": float(beta)}
    total = kd_loss(student_logits.reshape(rows, vocab), teacher_logits.reshape(rows, vocab), keep,
                    temperature=temperature, ignore_index=SKIP, reduction="sum", t2_scale=False, **options)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        loss = total / num_items_in_batch
    elif reduction == "batchmean":
        denom = kept_count(keep, rows).clamp_min(1) if keep is not None else max(student_logits.size(0), 1)
        loss = total / denom
    elif reduction == "sum":
        loss = total
    else:
        loss = total / (kept_count(keep, rows) * vocab)
    return loss.to(result_dtype(student_logits, teacher_logits))
