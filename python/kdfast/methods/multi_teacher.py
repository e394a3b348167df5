"""Multi-teacher KD in plain PyTorch under its historical import path, `kdfast.methods.multi_teacher`.

The implementation is the float64 oracle `kdfast.reference.multi_teacher`; this module only
re-exports it.
"""

from kdfast.reference.multi_teacher import multi_teacher_kd_loss

__all__ = ["multi_teacher_kd_loss"]
