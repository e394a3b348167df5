"""Argument checks of `kdfast.Distiller`.

`teachers_and_weights` normalises the teachers argument to a list of modules and their
weights to a list summing to 1; `check_loop_settings` checks the loop's numeric and choice
arguments; `planned_steps` checks `fit`'s epochs and max_steps and counts the steps ahead.
They raise TypeError/ValueError naming the argument and the value seen.
"""

from __future__ import annotations

import math
import os
from typing import Any, List, Optional, Sequence, Tuple, Union

from torch import nn

__all__ = ["teachers_and_weights", "check_loop_settings", "planned_steps"]


def teachers_and_weights(student: nn.Module, teachers: Union[nn.Module, Sequence[nn.Module], None],
                         teacher_weights: Optional[Sequence[float]]) -> Tuple[List[nn.Module], List[float]]:
    """The teachers as a list and their weights normalised to sum 1 (default: equal).

    Raises:
        TypeError: the student or a teacher is not an `nn.Module`.
        ValueError: the student is one of the teachers; the weights do not match the teachers
            in number, or are negative, non-finite or all zero.
    """
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    if teachers is None:
        teacher_list: List[nn.Module] = []
    elif isinstance(teachers, nn.Module):
        teacher_list = [teachers]
    else:
        teacher_list = list(teachers)
    for index, teacher in enumerate(teacher_list):
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teachers[{index}] must be a torch.nn.Module, got {type(teacher).__name__}")
        if teacher is student:
            raise ValueError("the student cannot also be one of its teachers")
    if teacher_weights is not None:
        weights = [float(w) for w in teacher_weights]
        if len(weights) != len(teacher_list):
            raise ValueError(f"teacher_weights has {len(weights)} entries for {len(teacher_list)} teacher(s)")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"teacher_weights must be finite, non-negative and not all zero, got {weights}")
    else:
        weights = [1.0] * len(teacher_list)
    total_weight = sum(weights) if weights else 1.0
    return teacher_list, [w / total_weight for w in weights]


def check_loop_settings(accumulation_steps: int, max_grad_norm: Optional[float], scheduler_interval: str,
                        checkpoint_path: Optional[Union[str, os.PathLike]], checkpoint_every: Optional[int],
                        eval_every: Optional[int]) -> None:
    """Raise ValueError unless the loop arguments are valid (see `Distiller`)."""
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
    if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {max_grad_norm!r}")
    if scheduler_interval not in ("step", "epoch"):
        raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
    for name, value in (("checkpoint_every", checkpoint_every), ("eval_every", eval_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
    if checkpoint_every is not None and checkpoint_path is None:
        raise ValueError("checkpoint_every needs a checkpoint_path")


def planned_steps(loader: Any, epochs: int, accumulation_steps: int,
                  max_steps: Optional[int]) -> Tuple[Optional[int], Optional[int]]:
    """Check `fit`'s arguments and return (batches per epoch, total optimizer steps of the run),
    each None when the loader has no `len()` (the total is `max_steps` then, if given).

    Raises:
        ValueError: `epochs` is not an int >= 1 or `max_steps` neither None nor an int >= 1.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be an int >= 1 or None, got {max_steps!r}")
    try:
        batches_per_epoch: Optional[int] = len(loader)
    except TypeError:
        batches_per_epoch = None
    total_steps = None
    if batches_per_epoch is not None:
        total_steps = epochs * math.ceil(batches_per_epoch / accumulation_steps)
    if max_steps is not None:
        total_steps = max_steps if total_steps is None else min(total_steps, max_steps)
    return batches_per_epoch, total_steps
