"""Batches and model outputs for `kdfast.Distiller`.

A batch is a tensor (inputs only), a tuple/list `(inputs,)`, `(inputs, labels)` or
`(inputs, labels, teacher_logits)`, or a mapping whose `"labels"` and `"teacher_logits"`
entries are taken out (the rest are the inputs, passed as keyword arguments). `split_batch`
takes a batch apart, `to_device` moves nested tensors, `call_model` calls a model on inputs
and returns its logits (a tensor, a `logits` entry or attribute, or the first element of a
tuple), raising TypeError for anything else; `mean_teacher_logits` combines several
teachers' logits. `set_sampler_epoch` tells a loader's sampler
which epoch starts.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["Batch", "to_device", "split_batch", "call_model", "model_device", "batch_size", "mean_teacher_logits",
           "set_sampler_epoch"]

Batch = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]


def to_device(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor inside (nested mappings, lists, tuples) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {key: to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(value, device) for value in obj)
    return obj


def split_batch(batch: Batch) -> Tuple[Any, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Returns (inputs, labels or None, teacher_logits or None).

    Raises:
        TypeError: `batch` is none of the accepted forms.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        rest = {key: value for key, value in batch.items() if key not in ("labels", "teacher_logits")}
        return rest, batch.get("labels"), batch.get("teacher_logits")
    if isinstance(batch, (list, tuple)) and 1 <= len(batch) <= 3:
        items = list(batch) + [None] * (3 - len(batch))
        return items[0], items[1], items[2]
    raise TypeError(
        "a batch must be a tensor, a mapping, or a tuple/list (inputs[, labels[, teacher_logits]]); "
        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
    )


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """`model(**inputs)`, `model(*inputs)` or `model(inputs)`, reduced to its logits.

    Raises:
        TypeError: the output holds no logits in a recognised place.
    """
    if isinstance(inputs, Mapping):
        output = model(**inputs)
    elif isinstance(inputs, (list, tuple)):
        output = model(*inputs)
    else:
        output = model(inputs)
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"{type(model).__name__} returned {type(output).__name__}; expected logits as a tensor, "
        "an object or mapping with 'logits', or a tuple whose first element is the logits"
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else first buffer; else the CPU)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def batch_size(inputs: Any, logits: torch.Tensor) -> int:
    """Samples in a batch: the inputs' leading size when they are a tensor, else the logits'."""
    if isinstance(inputs, torch.Tensor) and inputs.dim() > 0:
        return int(inputs.shape[0])
    return int(logits.shape[0]) if logits.dim() > 1 else 1


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """Call `set_epoch(epoch)` on the loader's sampler (or its batch sampler's), when it has one
    (a `DistributedSampler` reshuffles per epoch that way)."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def mean_teacher_logits(teachers: List[nn.Module], weights: List[float], inputs: Any,
                        device: torch.device) -> torch.Tensor:
    """The weighted mean of the teachers' logits `[..., V]` on `device` (weights summing to 1).

    Each teacher runs on its own device, under the caller's grad and autocast modes. With one
    teacher its logits come back as they are (its dtype); with several, in float32.

    Raises:
        RuntimeError: there are no teachers.
    """
    if not teachers:
        raise RuntimeError("no teachers: pass teachers to Distiller or put 'teacher_logits' in every batch")
    combined: Optional[torch.Tensor] = None
    for teacher, weight in zip(teachers, weights):
        logits = call_model(teacher, to_device(inputs, model_device(teacher))).to(device)
        if len(teachers) == 1:
            return logits
        term = logits.float() * weight
        combined = term if combined is None else combined + term
    assert combined is not None
    return combined
