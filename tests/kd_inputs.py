"""Seeded dense KD inputs for the tests: `build_kd_inputs` (the `make_kd_inputs` fixture of
conftest.py calls it on the test's device). A plain module, so that test files can import it
without importing a conftest (several folders have their own).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def build_kd_inputs(
    leading_shape: Sequence[int],
    vocab_size: int,
    *,
    seed: int,
    device: str = "cpu",
    student_dtype: torch.dtype = torch.float32,
    teacher_dtype: Optional[torch.dtype] = None,
    logit_scale: float = 3.0,
    ignored_fraction: float = 0.0,
    ignore_index: int = -100,
    with_labels: bool = True,
):
    """Returns (student_logits, teacher_logits, labels) with fresh seeded values.

    Logits are N(0, logit_scale²) (student and teacher drawn independently) and rounded to
    their dtypes; labels are uniform in [0, V), and about `ignored_fraction` of the rows
    (never all, unless the fraction is 1) are set to `ignore_index`.
    """
    teacher_dtype = student_dtype if teacher_dtype is None else teacher_dtype
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(leading_shape) + (vocab_size,)
    student = (torch.randn(shape, generator=generator, dtype=torch.float64) * logit_scale).to(student_dtype)
    teacher = (torch.randn(shape, generator=generator, dtype=torch.float64) * logit_scale).to(teacher_dtype)
    labels = None
    if with_labels:
        labels = torch.randint(0, vocab_size, tuple(leading_shape), generator=generator, dtype=torch.long)
        if ignored_fraction >= 1.0:
            labels.fill_(ignore_index)
        elif ignored_fraction > 0.0:
            ignored = torch.rand(tuple(leading_shape), generator=generator) < ignored_fraction
            flat_ignored = ignored.reshape(-1)
            if flat_ignored.numel() > 1:
                flat_ignored[0] = True
                flat_ignored[-1] = False
            labels[ignored] = ignore_index
        labels = labels.to(device)
    return student.to(device), teacher.to(device), labels
