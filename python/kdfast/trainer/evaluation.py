"""Evaluation sums of `kdfast.Distiller`: one batch at a time, then metrics.

`new_totals` starts a float64 CPU tensor of sums; `add_batch` adds one batch's student
logits, teacher logits `[..., V]` and labels (int64 `[...]` or None) to it, leaving out rows
whose label is `ignore_index`; `metrics_from_totals` turns the sums (of one process, or
all-reduced over ranks) into the metrics documented by `Distiller.evaluate`, and raises
ValueError when no row was valid. Labels whose count differs from the logits' rows raise
ValueError.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch.nn import functional as F

__all__ = ["new_totals", "add_batch", "metrics_from_totals"]

# Positions in the sums tensor.
_LOSS, _ROWS, _CORRECT, _TEACHER_CORRECT, _AGREE, _CE, _LABELLED = range(7)


def new_totals() -> torch.Tensor:
    """Zeroed sums: loss, rows, correct, teacher correct, agreement, cross-entropy, labelled batches."""
    return torch.zeros(7, dtype=torch.float64)


def add_batch(totals: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              labels: Optional[torch.Tensor], loss: Callable[..., torch.Tensor], ignore_index: int) -> None:
    """Add one batch to `totals` in place; `loss` is called on the float32 student logits."""
    student_logits = student_logits.float()
    vocab = student_logits.shape[-1]
    flat_student = student_logits.reshape(-1, vocab)
    flat_teacher = teacher_logits.float().reshape(-1, vocab)
    student_pred = flat_student.argmax(-1)
    teacher_pred = flat_teacher.argmax(-1)
    if labels is not None:
        flat_labels = labels.reshape(-1)
        if flat_labels.numel() != flat_student.shape[0]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape)}")
        valid = flat_labels != ignore_index
        rows = int(valid.sum())
        if rows == 0:
            return
        totals[_CORRECT] += (student_pred[valid] == flat_labels[valid]).sum().item()
        totals[_TEACHER_CORRECT] += (teacher_pred[valid] == flat_labels[valid]).sum().item()
        totals[_CE] += F.cross_entropy(flat_student, flat_labels, ignore_index=ignore_index, reduction="sum").item()
        totals[_LABELLED] += 1
    else:
        valid = torch.ones_like(student_pred, dtype=torch.bool)
        rows = int(valid.numel())
    totals[_AGREE] += (student_pred[valid] == teacher_pred[valid]).sum().item()
    totals[_LOSS] += float(loss(student_logits, teacher_logits, labels)) * rows
    totals[_ROWS] += rows


def metrics_from_totals(totals: torch.Tensor) -> Dict[str, float]:
    """`loss`, `agreement`, `rows` and, when some batch had labels, `accuracy`, `teacher_accuracy`, `ce`."""
    rows = totals[_ROWS].item()
    if rows == 0:
        raise ValueError("the evaluation loader produced no valid rows")
    metrics = {"loss": totals[_LOSS].item() / rows, "agreement": totals[_AGREE].item() / rows, "rows": int(rows)}
    if totals[_LABELLED].item() > 0:
        metrics.update(accuracy=totals[_CORRECT].item() / rows, teacher_accuracy=totals[_TEACHER_CORRECT].item() / rows,
                       ce=totals[_CE].item() / rows)
    return metrics
