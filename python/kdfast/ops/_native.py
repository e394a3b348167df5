"""Lazy access to the compiled core, and the codes and limits it exports.

`native_module()` imports `kdfast._C` on first use and raises a clear ImportError naming the
fix when it is missing; importing kdfast itself never fails for that reason. `facts()` reads,
once, the integer codes of the core's enums, its row-statistics widths, its CUDA limits and
whether it was built with CUDA kernels, all exported by csrc/python/bindings.cpp from the
tables in csrc/include/kdfast/types.h; nothing here repeats a number from C++. The
predicates below are constants to `torch.compile` (evaluated once while tracing), so the
ops' device checks never break a graph. `empty_for_writing` allocates a large CPU output with
the kernels' page policy for fresh gradients.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Tuple

import torch

__all__ = [
    "NativeFacts",
    "cuda_limit",
    "device_and_stream",
    "empty_for_writing",
    "facts",
    "has_cuda_kernels",
    "has_cuda_topk_kernels",
    "native_available",
    "native_module",
    "row_stats_width",
]

@functools.lru_cache(maxsize=None)
def _load():
    try:
        from kdfast import _C
    except ImportError as error:  # pragma: no cover - depends on the installation
        return None, error
    return _C, None


def native_available() -> bool:
    """True when the compiled core `kdfast._C` can be imported."""
    return _load()[0] is not None


def native_module():
    """The compiled core; raises ImportError with the reason when it is missing."""
    module, error = _load()
    if module is None:
        raise ImportError(
            "kdfast's compiled kernels (kdfast._C) could not be loaded: "
            f"{error}. Reinstall kdfast (pip install --force-reinstall kdfast, or "
            "pip install . in a source checkout); kdfast.reference.* works without them."
        ) from error
    return module


@dataclasses.dataclass(frozen=True)
class NativeFacts:
    """What the compiled core says about itself (codes keyed by torch dtype or mode name)."""

    dtype_codes: Dict[torch.dtype, int]
    index_dtype_codes: Dict[torch.dtype, int]
    divergence_codes: Dict[str, int]
    reduction_codes: Dict[str, int]
    tail_codes: Dict[str, int]
    combine_codes: Dict[str, int]
    kd_row_stats: int
    sparse_row_stats: int
    multi_teacher_row_stats_base: int
    multi_teacher_stats_per_teacher: int
    cuda_max_teachers: int
    cuda_max_topk: int
    cuda_max_sparse_vocab: int
    has_cuda: bool
    has_cuda_topk: bool

    def multi_teacher_row_stats(self, num_teachers: int) -> int:
        """Width of the multi-teacher kernels' per-row statistics for M teachers."""
        return self.multi_teacher_row_stats_base + self.multi_teacher_stats_per_teacher * num_teachers


@functools.lru_cache(maxsize=None)
def facts() -> NativeFacts:
    """The core's exported codes and limits (read once); raises ImportError without the core."""
    core = native_module()
    limits = dict(core.limits)
    return NativeFacts(
        dtype_codes={getattr(torch, name): code for name, code in core.dtype_codes.items()},
        index_dtype_codes={getattr(torch, name): code for name, code in core.index_dtype_codes.items()},
        divergence_codes=dict(core.divergence_codes),
        reduction_codes=dict(core.reduction_codes),
        tail_codes=dict(core.tail_codes),
        combine_codes=dict(core.combine_codes),
        kd_row_stats=int(core.kd_row_stats),
        sparse_row_stats=int(core.sparse_row_stats),
        multi_teacher_row_stats_base=int(core.multi_teacher_row_stats_base),
        multi_teacher_stats_per_teacher=int(core.multi_teacher_stats_per_teacher),
        cuda_max_teachers=int(limits["cuda_max_teachers"]),
        cuda_max_topk=int(limits["cuda_max_topk"]),
        cuda_max_sparse_vocab=int(limits["cuda_max_sparse_vocab"]),
        has_cuda=bool(core.has_cuda),
        has_cuda_topk=bool(core.has_cuda_topk),
    )


@torch.compiler.assume_constant_result
def has_cuda_kernels() -> bool:
    """True when the compiled core was built with CUDA kernels."""
    return native_available() and facts().has_cuda


@torch.compiler.assume_constant_result
def has_cuda_topk_kernels() -> bool:
    """True when the compiled core has the CUDA top-k compression and sparse-loss kernels."""
    return native_available() and facts().has_cuda and facts().has_cuda_topk


@torch.compiler.assume_constant_result
def row_stats_width(kind: str, num_teachers: int = 0) -> int:
    """Columns of a kernel family's per-row statistics: kind "kd", "sparse" or "multi_teacher"."""
    if kind == "kd":
        return facts().kd_row_stats
    if kind == "sparse":
        return facts().sparse_row_stats
    return facts().multi_teacher_row_stats(num_teachers)


@torch.compiler.assume_constant_result
def cuda_limit(name: str) -> int:
    """A CUDA kernel limit: "max_teachers", "max_topk" or "max_sparse_vocab"."""
    return getattr(facts(), "cuda_" + name)


def device_and_stream(tensor: torch.Tensor) -> Tuple[int, int]:
    """(device_index, stream handle) for the core: (-1, 0) on the CPU."""
    if tensor.device.type == "cuda":
        index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
        return index, torch.cuda.current_stream(index).cuda_stream
    return -1, 0


def empty_for_writing(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty(shape)` for an output about to be written once from start to end, with the
    page policy the CPU kernels give their fresh gradients (KDFAST_HUGE_PAGES: transparent huge
    pages for multi-megabyte buffers where the system offers them, so first-touch page faults
    cost far less). Any device; the advice applies to CPU tensors of 8 MiB and more."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.device.type == "cpu" and not torch.compiler.is_compiling() and native_available():
        advise = getattr(native_module(), "advise_fresh_output", None)
        if advise is not None:
            advise(out.data_ptr(), out.numel() * out.element_size())
    return out
