"""Argument checks and reductions shared by the `kdfast.methods` losses.

Every public method validates its inputs through these functions so that bad input raises
a `TypeError` or `ValueError` naming the argument and the shapes or dtypes seen, and so
that all methods reduce per-row losses the same way as the dense loss contract in
DESIGN.md ("none", "sum", "mean" over valid rows, "batchmean" over all rows).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

ROW_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def require_float_tensor(name: str, value) -> torch.Tensor:
    """Return `value` if it is a floating-point tensor, else raise TypeError naming it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def require_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def require_non_negative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def require_choice(name: str, value: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def require_same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        seen = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all inputs must be on one device, got {seen}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (half types are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_labels(labels, leading_shape: torch.Size, vocab_size: int, ignore_index: int,
                 device: torch.device, logits_name: str = "student_logits") -> torch.Tensor:
    """Validate int64 class labels of shape `leading_shape`; return them unchanged."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must have dtype torch.int64, got {labels.dtype} "
                        f"(labels.shape={tuple(labels.shape)}); convert with labels.long()")
    if labels.shape != leading_shape:
        raise ValueError(f"labels must have shape {tuple(leading_shape)} (the leading shape of "
                         f"{logits_name}), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {logits_name} is on {device}")
    valid = labels != ignore_index
    if bool(((labels < 0) | (labels >= vocab_size))[valid].any()):
        bad = labels[valid & ((labels < 0) | (labels >= vocab_size))][0].item()
        raise ValueError(f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}, "
                         f"got {bad}")
    return labels


def reduce_rows(row_losses: torch.Tensor, reduction: str,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
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
