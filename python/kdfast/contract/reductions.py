"""Row reductions of the loss contract, shared by every implementation.

Per-row losses (ignored rows already 0) become the reduced loss: "none" keeps them, "sum"
adds them, "mean" divides the sum by the number of valid rows (0 with zero gradient when no
row is valid) and "batchmean" by the number of rows. `reduction_scale` gives the same rule
as a 0-dim tensor factor without reading tensor data (no host synchronisation).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["ROW_REDUCTIONS", "reduce_rows", "reduction_scale"]

ROW_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def reduce_rows(row_losses: Tensor, reduction: str,
                valid: Optional[Tensor] = None) -> Tensor:
    """Reduce per-row losses (invalid rows already zero) as the loss contract prescribes.

    "none" returns `row_losses`; "sum" their sum; "mean" the sum over the number of valid
    rows (0 with zero gradient when none is valid); "batchmean" the sum over all rows.
    """
    if reduction == "none":
        return row_losses
    total = row_losses.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(row_losses.numel(), 1)
    count = row_losses.numel() if valid is None else valid.sum()
    if isinstance(count, torch.Tensor):
        return total / count.clamp_min(1).to(total.dtype)
    return total / max(count, 1)


def reduction_scale(labels: Optional[Tensor], rows: int, reduction: str, ignore_index: int, dtype, device) -> Tensor:
    """The factor a summed loss takes for `reduction` ("sum": 1, "batchmean": 1/rows, "mean":
    1/valid rows, 1 when no row is valid), as a 0-dim tensor (no host synchronisation)."""
    if reduction == "mean":
        valid = (labels != ignore_index).sum() if labels is not None else torch.tensor(rows, device=device)
        return 1.0 / valid.clamp(min=1).to(dtype)
    if reduction == "batchmean":
        return torch.tensor(1.0 / max(rows, 1), dtype=dtype, device=device)
    return torch.ones((), dtype=dtype, device=device)
