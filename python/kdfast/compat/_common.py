"""Shared pieces of the drop-in losses: masks from peer labels, row counts, result dtypes.

Peers treat labels as a padding mask only (any value other than `ignore_index` is a kept row,
even one outside [0, V)), while `kdfast.functional.kd_loss` checks labels against the
vocabulary. `keep_rows` turns peer labels into kdfast labels that carry only the mask: 0 for a
kept row, `SKIP` for an ignored one (passed as kdfast's `ignore_index`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["SKIP", "keep_rows", "kept_count", "result_dtype"]

SKIP = -1  # the ignore_index kdfast sees: keep_rows maps ignored rows to it and kept rows to 0


def keep_rows(labels: Optional[Tensor], ignore_index: int, rows: int) -> Optional[Tensor]:
    """Peer labels (any shape with `rows` elements, any integer values) -> int64 [rows] mask labels."""
    if labels is None:
        return None
    if labels.numel() != rows:
        raise ValueError(f"labels have {labels.numel()} elements but the logits have {rows} rows")
    flat = labels.reshape(-1)
    return torch.where(flat != ignore_index, 0, SKIP).to(torch.int64)


def kept_count(mask_labels: Optional[Tensor], rows: int) -> Tensor:
    """Number of kept rows as an int64 0-dim tensor."""
    if mask_labels is None:
        return torch.tensor(rows)
    return (mask_labels != SKIP).sum()


def result_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a peer computing in the inputs' own precision returns (type promotion)."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype
