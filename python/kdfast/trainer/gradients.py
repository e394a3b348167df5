"""Which parameters a `kdfast.Distiller` step updates, and how their gradients are treated.

`step_parameters` lists the parameters of one optimizer step: the student's, then every
other parameter in the Distiller's optimiser (such as a loss module's regressor), each once.
`average_and_clip` divides their summed micro-batch gradients by the number of micro-batches
and clips their joint L2 norm. `trainable_parameters` lists what the default optimiser
updates: the student's parameters and those a loss asks for with `trainable_parameters()`.
`clip_at_each_step` clips, for the duration of a `with` block, the gradients of optimisers
that step on their own (a loss module's discriminator optimiser) right before each of their
steps, each optimiser separately.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["step_parameters", "average_and_clip", "trainable_parameters", "clip_at_each_step"]


def _unique(parameters: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    seen, unique = set(), []
    for parameter in parameters:
        if id(parameter) not in seen:
            seen.add(id(parameter))
            unique.append(parameter)
    return unique


def step_parameters(student: nn.Module, optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    """The student's parameters, then the optimiser's other parameters, in group order, each once."""
    return _unique([*student.parameters(), *(p for group in optimizer.param_groups for p in group["params"])])


def trainable_parameters(student: nn.Module, loss: Any) -> List[torch.Tensor]:
    """The student's parameters, then `loss.trainable_parameters()` when the loss has that
    method (the parameters it asks the student's optimiser to update), each once."""
    method = getattr(loss, "trainable_parameters", None)
    return _unique([*student.parameters(), *(method() if callable(method) else [])])


def average_and_clip(parameters: List[torch.Tensor], micro_batches: int,
                     max_grad_norm: Optional[float]) -> Optional[float]:
    """Divide the gradients by `micro_batches`, then clip their joint L2 norm to `max_grad_norm`.

    Args:
        parameters: the parameters of the step; those without a gradient are skipped.
        micro_batches: how many micro-batch gradients were summed (>= 1).
        max_grad_norm: the clipping norm, or None for no clipping.

    Returns:
        The joint norm before clipping as a Python float, or None without clipping.
    """
    if micro_batches > 1:
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad.div_(micro_batches)
    if max_grad_norm is None:
        return None
    return float(torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm))


@contextlib.contextmanager
def clip_at_each_step(optimizers: Iterable[torch.optim.Optimizer], max_grad_norm: Optional[float]) -> Iterator[None]:
    """Inside the block, every `step()` of each optimiser first clips the joint L2 norm of that
    optimiser's gradients to `max_grad_norm` (nothing happens when it is None). The hooks are
    removed on leaving the block, also on an exception."""
    if max_grad_norm is None:
        yield
        return

    def clip(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if parameters:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)

    handles = [optimizer.register_step_pre_hook(clip) for optimizer in optimizers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
