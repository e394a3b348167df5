"""Custom-op layer: the only code that touches the compiled core `kdfast._C`.

Each op is a `torch.library.custom_op` with a fake (meta) kernel and, where it has a
gradient, `register_autograd`. Ops take 2-D `[rows, vocab]` tensors whose last dimension is
contiguous; shaping, validation and the choice between kernels and the pure-PyTorch
fallback happen in `kdfast.functional`.
"""

from kdfast.ops import (
    fused_linear,  # noqa: F401  (registers torch.ops.kdfast.fused_linear_kd_*)
    kd_loss,  # noqa: F401  (registers torch.ops.kdfast.kd_loss_*)
    multi_teacher,  # noqa: F401  (registers torch.ops.kdfast.multi_teacher_kd_*)
    sparse,  # noqa: F401  (registers torch.ops.kdfast.topk_compress, sparse_kd_*)
)
from kdfast.ops._native import native_available, native_module  # noqa: F401
