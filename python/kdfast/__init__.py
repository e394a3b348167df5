"""kdfast: fused knowledge-distillation losses for PyTorch.

Public names only. The compiled core (`kdfast._C`) is loaded lazily: importing kdfast
never fails because the native library is missing; calling a kernel does, with a clear
error, while `kdfast.reference` keeps working.
"""

from kdfast import functional, reference
from kdfast._build import build_info
from kdfast._version import __version__
from kdfast.contract.softlabels import SoftLabels
from kdfast.functional import compress_topk, uld_loss
from kdfast.losses import FusedLinearKDLoss, KDLoss, MultiTeacherKDLoss, SparseKDLoss
from kdfast.onpolicy import OnPolicyDistiller
from kdfast.store import (
    CorruptShardError,
    ManifestError,
    SoftLabelStore,
    SoftLabelStoreError,
    SoftLabelStoreWriter,
    SoftLabelWindowDataset,
    StoreMismatchError,
)
from kdfast.trainer import CheckpointError, Distiller

__all__ = [
    "CheckpointError",
    "CorruptShardError",
    "Distiller",
    "FusedLinearKDLoss",
    "KDLoss",
    "ManifestError",
    "MultiTeacherKDLoss",
    "OnPolicyDistiller",
    "SoftLabelStore",
    "SoftLabelStoreError",
    "SoftLabelStoreWriter",
    "SoftLabelWindowDataset",
    "SoftLabels",
    "StoreMismatchError",
    "SparseKDLoss",
    "build_info",
    "compress_topk",
    "functional",
    "reference",
    "uld_loss",
    "__version__",
]
