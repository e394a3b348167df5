"""Peak memory of one benchmark step, and the glibc malloc settings timed CPU calls run under.

`measure_peak_extra_mb(step, device)` is the memory one call holds at its peak beyond what
was allocated before it, in MB (10^6 bytes): torch.cuda's allocator statistics on CUDA, the
Linux peak resident set (/proc/self) on the CPU. `malloc_for_timing()` pins glibc (through
ctypes `mallopt`) to the state a long-running PyTorch process settles in; the CPU measurement
changes that state for its one call and restores it. Where libc or /proc lack a feature the
settings are left alone and the CPU measurement returns None. Depends on torch only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Callable, Optional

import torch

__all__ = ["malloc_for_timing", "measure_peak_extra_mb"]

_MB = 1e6  # peak memory is reported in MB = 10^6 bytes

# glibc mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> None:
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return
    try:
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    except Exception:
        pass


def malloc_for_timing() -> None:
    """Pins glibc to the state a long-running PyTorch process settles in.

    Blocks up to 32 MiB come from (and return to) the heap, larger ones are mmap-ed. Timed
    calls run in this state; it is restored after each memory measurement, which changes it
    (see `_cpu_peak_extra_mb`).
    """
    _set_malloc_thresholds(32 << 20, 64 << 20)


def _malloc_for_measuring() -> None:
    # Blocks of 1 MiB and more are mmap-ed and unmapped when freed, so a temporary cannot hide
    # in heap memory that an earlier call left resident.
    _set_malloc_thresholds(1 << 20, 128 << 10)
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        try:
            libc.malloc_trim(0)
        except Exception:
            pass


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_peak_extra_mb(step: Callable[[], object]) -> Optional[float]:
    """Peak resident memory of one call above the resident memory before it (Linux only).

    Writing "5" to /proc/self/clear_refs resets VmHWM (the peak RSS) to the current RSS; after
    the call, VmHWM − VmRSS(before) is the memory the call held at its peak (temporaries,
    outputs and the gradient). During this call glibc mmaps every block of 1 MiB or more and
    the heap is trimmed first, so memory freed by earlier calls does not mask temporaries.
    Returns None where /proc does not support this.
    """
    gc.collect()
    _malloc_for_measuring()
    try:
        rss_before = _status_kb("VmRSS")
        if rss_before is None:
            return None
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            return None
        peak_after_reset = _status_kb("VmHWM")
        if peak_after_reset is None or peak_after_reset > rss_before + 4096:
            return None  # the reset did not take effect (kernel older than 4.0 or restricted /proc)
        result = step()
        peak = _status_kb("VmHWM")
        del result
    finally:
        malloc_for_timing()
    if peak is None:
        return None
    return max(peak - rss_before, 0) * 1024 / _MB


def measure_peak_extra_mb(step: Callable[[], object], device: str) -> Optional[float]:
    """MB (10^6 bytes) of memory one call holds at its peak beyond what was allocated before.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus
    memory_allocated before. CPU: the peak-RSS reset described in `_cpu_peak_extra_mb`.

    Args:
        step: the call to measure (called once).
        device: "cpu" or a CUDA device.

    Returns:
        The peak extra memory in MB, or None where the CPU measurement is not supported.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del result
        return (peak - before) / _MB
    return _cpu_peak_extra_mb(step)
