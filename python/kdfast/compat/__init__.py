"""Drop-in replacements for the distillation losses of other libraries, on kdfast's kernels.

Switching is a change of import: each class or function has the peer's name, constructor
arguments and defaults, forward signature, input layout (logits or log-probabilities),
reductions, ignore-index handling and return dtype, and reproduces the peer's numbers
(within float32 rounding), not kdfast's own conventions. Options the kernels cannot express
raise ValueError naming the option. Mirrored versions and behavioural notes: docs/migration.md.

- `kdfast.compat.liger`: Liger-Kernel 0.8.5 `LigerKLDIVLoss`, `LigerJSD`, `LigerFusedLinearJSD`.
- `kdfast.compat.torchtune`: torchtune 0.6.1 `ForwardKLLoss`, `ReverseKLLoss`,
  `SymmetricKLLoss` and their `...WithChunkedOutputLoss` variants.
- `kdfast.compat.trl`: TRL 1.16 `GKDTrainer.generalized_jsd_loss` as `generalized_jsd_loss`.
- `kdfast.compat.torchdistill`: torchdistill 1.1.5 `KDLoss`.

This package imports `kdfast.functional` only.
"""

from kdfast.compat import liger, torchdistill, torchtune, trl

__all__ = ["liger", "torchdistill", "torchtune", "trl"]
