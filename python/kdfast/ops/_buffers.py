"""Reused host buffers for the one-pass kernels' fresh [rows, V] gradients.

A CPU training step allocates the loss's N×V gradient, autograd consumes it (the lm_head's
backward, or `.grad` of a leaf), and it is freed; glibc serves blocks this large (above its
32 MiB mmap ceiling) with fresh mappings, so every step pays first-touch page faults on the
whole gradient again: about 13 ms of a 43 ms fwd+bwd at N=256, V=128256 float32 on the machine
measured, even with transparent huge pages. `gradient_buffer` instead hands out a tensor over a
cached block of the same size whose previous tensor is gone: the pages stay mapped (and, where
the system offers them, huge), so a steady-state step writes the gradient without faults.

Contract: a block is handed out again only when no tensor refers to it any more (the tensor
returned keeps the block's owner alive; the pool checks that owner's reference count), so a
gradient that autograd stored as `.grad`, or that the caller kept, is never overwritten. A
request takes the smallest idle block that holds it and is at most twice its size; when none
does, every idle block is dropped before a new one is made, so the cache holds at most the
gradients alive at once plus the idle blocks of the last sizes asked for (steps of varying
sizes cost what plain allocations cost, never more memory). Only CPU gradients of at least
`MIN_BYTES`, never while tracing for torch.compile.
`KDFAST_GRADIENT_CACHE=0` turns it off (plain `torch.empty`); `release_cached_gradients()`
returns the idle blocks to the system. The returned tensor is an ordinary contiguous CPU
tensor, except that it cannot be resized or moved into shared memory (its storage is not
torch's allocation).
"""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import List

import numpy as np
import torch

from kdfast.ops._native import empty_for_writing

__all__ = ["MIN_BYTES", "cached_gradient_bytes", "gradient_buffer", "release_cached_gradients"]

MIN_BYTES = 32 << 20  # glibc maps blocks above 32 MiB afresh on every allocation
_ALIGN = 2 << 20  # blocks start on a 2 MiB boundary, so that huge pages can cover them whole

_lock = threading.Lock()
_blocks: List[np.ndarray] = []  # each MIN_BYTES or more, plus _ALIGN bytes of slack


def _enabled() -> bool:
    return os.environ.get("KDFAST_GRADIENT_CACHE", "1") != "0"


def _idle(blocks: List[np.ndarray], index: int) -> bool:
    """Whether no tensor refers to blocks[index]: its only references are the list's and the
    argument getrefcount itself receives."""
    return sys.getrefcount(blocks[index]) == 2


def gradient_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape` and `dtype` for a gradient the caller writes
    whole (`torch.empty`'s contract); on the CPU, for `MIN_BYTES` and more, over a cached block."""
    device = torch.device(device)
    if device.type != "cpu" or not _enabled() or torch.compiler.is_compiling():
        return empty_for_writing(shape, dtype, device)
    numel = math.prod(int(size) for size in shape)
    nbytes = numel * dtype.itemsize
    if nbytes < MIN_BYTES:
        return empty_for_writing(shape, dtype, device)
    with _lock:
        fits = [i for i in range(len(_blocks))
                if nbytes + _ALIGN <= _blocks[i].nbytes <= 2 * nbytes + _ALIGN and _idle(_blocks, i)]
        if fits:
            index = min(fits, key=lambda i: _blocks[i].nbytes)
        else:
            _drop_idle()
            _blocks.append(np.empty(nbytes + _ALIGN, dtype=np.uint8))
            index = len(_blocks) - 1
        offset = (-_blocks[index].ctypes.data) % _ALIGN
        flat = torch.frombuffer(_blocks[index], dtype=dtype, count=numel, offset=offset)
    return flat.view(tuple(int(size) for size in shape))


def _drop_idle() -> int:
    """Drops the idle blocks (the caller holds the lock); returns their bytes."""
    idle = [_idle(_blocks, i) for i in range(len(_blocks))]
    released = sum(block.nbytes for block, free in zip(_blocks, idle) if free)
    _blocks[:] = [block for block, free in zip(_blocks, idle) if not free]
    return released


def cached_gradient_bytes() -> int:
    """Bytes held by the cache, idle blocks and blocks in use alike."""
    with _lock:
        return sum(block.nbytes for block in _blocks)


def release_cached_gradients() -> int:
    """Drops the idle blocks (returned to the system once freed); returns the bytes released."""
    with _lock:
        return _drop_idle()
