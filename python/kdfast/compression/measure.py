"""What a compressed student costs: serialised size and CPU latency.

`model_bytes(model)` is the size of `torch.save(model.state_dict())` in bytes (dense storage:
a pruned layer stores its zeros; a torchao-quantised layer stores int8 values and float
scales). `nonzero_parameters(model)` counts the weights a sparse format would have to keep.
`latency_ms(model, inputs)` is the median wall time of one forward pass in milliseconds under
`torch.inference_mode()`, after warm-up calls, on the current torch thread setting.
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Any

import torch
from torch import nn

__all__ = ["latency_ms", "model_bytes", "nonzero_parameters"]


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict as written by `torch.save`."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def nonzero_parameters(model: nn.Module) -> int:
    """Number of non-zero entries of the float parameters, pruning masks applied (not for quantised models)."""
    total, seen = 0, set()
    for module in model.modules():
        for name, tensor in module.named_parameters(recurse=False):
            if id(tensor) in seen:  # a tied weight (an lm_head sharing the embedding) counts once
                continue
            seen.add(id(tensor))
            if name.endswith("_orig"):  # a pruned layer: count what its mask keeps
                tensor = tensor * getattr(module, name[: -len("_orig")] + "_mask")
            total += int(torch.count_nonzero(tensor.detach()))
    return total


def latency_ms(model: nn.Module, inputs: Any, repeats: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of `model(inputs)` over `repeats` calls (after `warmup` calls), eval mode."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for index in range(warmup + repeats):
                started = time.perf_counter()
                model(inputs)
                if index >= warmup:
                    times.append((time.perf_counter() - started) * 1e3)
    finally:
        model.train(was_training)
    return statistics.median(times)
