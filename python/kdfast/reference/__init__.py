"""Pure-PyTorch implementations of every kdfast loss: the test oracle and the fallback.

Written with plain tensor operations and autograd, straight from the loss contract in
docs/design.md, so that they are easy to read and check: `dense` (kd_loss), `sparse`
(compress_topk, sparse_kd_loss), `multi_teacher` (multi_teacher_kd_loss) and `uld` (uld_loss). The compiled
kernels are tested against them in float64, and they run wherever `kdfast._C` has no kernels
(e.g. MPS): slower, never wrong. They import only `kdfast.contract`.
"""

from kdfast.reference.dense import compute_dtype_for, divergence_from_log_probs, kd_loss, kd_loss_rows
from kdfast.reference.multi_teacher import multi_teacher_kd_loss
from kdfast.reference.sparse import compress_topk, sparse_kd_loss, sparse_kd_loss_rows
from kdfast.reference.uld import uld_loss

__all__ = [
    "compress_topk",
    "compute_dtype_for",
    "divergence_from_log_probs",
    "kd_loss",
    "kd_loss_rows",
    "multi_teacher_kd_loss",
    "sparse_kd_loss",
    "sparse_kd_loss_rows",
    "uld_loss",
]
