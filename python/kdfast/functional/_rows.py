"""Shared shaping of the functional losses: [..., V] inputs as [rows, V] rows.

`as_rows` flattens without copying whenever the vocabulary dimension is contiguous;
`stand_in` builds a zero-stride tensor that carries a shape, dtype and device for the
metadata checks without allocating a row of logits; `uses_kernels` says whether a device
runs the compiled dense kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdfast.ops._native import has_cuda_kernels

__all__ = ["as_rows", "stand_in", "uses_kernels"]


def as_rows(logits: Tensor, vocab: int) -> Tensor:
    """[..., V] -> [rows, V] with a contiguous last dimension (a view whenever possible)."""
    rows = logits.reshape(-1, vocab)
    if rows.stride(-1) != 1 and vocab > 1:
        rows = rows.contiguous()
    return rows


def stand_in(leading_shape, vocab: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A [..., vocab] tensor of one stored element (zero strides): it carries the shape, dtype
    and device the metadata checks need, without allocating a row of logits."""
    shape = tuple(leading_shape) + (vocab,)
    return torch.empty_strided(shape, (0,) * len(shape), dtype=dtype, device=device)


def uses_kernels(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    return device.type == "cuda" and has_cuda_kernels()

