"""Custom-op layer: the only code that touches the compiled core `kdfast._C`.

Each op is an out-variant `torch.library.custom_op` defined by `_op.define_op`: it writes
into outputs its caller allocated, so its fake kernel does nothing, and each loss family has
one `torch.autograd.Function` that calls it (through the dispatcher only under
torch.compile). Ops take 2-D `[rows, vocab]` tensors whose last dimension is contiguous;
shaping, validation and the choice between kernels and the pure-PyTorch fallback happen in
`kdfast.functional`.
"""

from kdfast.ops import (
    fused_linear,  # noqa: F401  (registers torch.ops.kdfast.fused_linear_kd_*)
    kd_loss,  # noqa: F401  (registers torch.ops.kdfast.kd_loss_*)
    multi_teacher,  # noqa: F401  (registers torch.ops.kdfast.multi_teacher_kd_*)
    sparse,  # noqa: F401  (registers torch.ops.kdfast.topk_compress, sparse_kd_*)
)
from kdfast.ops._buffers import cached_gradient_bytes, release_cached_gradients  # noqa: F401
from kdfast.ops._native import empty_for_writing, native_available, native_module  # noqa: F401
