"""The functional API: fused knowledge-distillation losses on plain tensors.

`kd_loss` (dense teacher logits), `sparse_kd_loss` and `compress_topk` (top-k soft labels),
`multi_teacher_kd_loss` (M teachers), `fused_linear_kd_loss` (lm_head + loss, chunked) and
`uld_loss` (Universal Logit Distillation across vocabularies, over each side's sorted top-k).
Each validates its arguments from metadata, flattens `[..., V]` to rows and runs the custom
ops of `kdfast.ops`, or `kdfast.reference` on devices without kernels. This layer imports
`kdfast.contract`, `kdfast.reference`, `kdfast.ops` and `kdfast.vocab_parallel` only.
"""

from kdfast.functional.dense import kd_loss
from kdfast.functional.fused_linear import fused_linear_kd_loss
from kdfast.functional.multi_teacher import multi_teacher_kd_loss
from kdfast.functional.sparse import compress_topk, sparse_kd_loss
from kdfast.functional.uld import uld_loss

__all__ = ["compress_topk", "fused_linear_kd_loss", "kd_loss", "multi_teacher_kd_loss", "sparse_kd_loss", "uld_loss"]
