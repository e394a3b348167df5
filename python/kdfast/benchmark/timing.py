"""Timing of benchmark steps: CUDA events on the GPU, `time.perf_counter` / `time.process_time` on the CPU.

A step is a no-argument callable. `time_step` is the adaptive median used by the KD-loss table
(warmup, cold L2 cache on CUDA, repeats fitted to a time budget); `median_ms`, `time_once`,
`time_cpu_and_wall`, `time_round_robin` and `time_within_budget` are the plainer timers the
other benchmarks use. Every time is in milliseconds. This module depends on torch only.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

__all__ = ["median_ms", "synchronize", "time_cpu_and_wall", "time_once", "time_round_robin", "time_step",
           "time_within_budget"]

Step = Callable[[], object]


def synchronize(device: str) -> None:
    """Waits for the queued CUDA work when `device` is a CUDA device; no-op on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _L2Flusher:
    """Overwrites a buffer larger than the GPU's L2 cache so that each timed call starts cold."""

    def __init__(self, device: str):
        self.buffer = None
        if device.startswith("cuda"):
            self.buffer = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def time_once(step: Step, device: str, flush: Optional[Callable[[], None]] = None) -> float:
    """Milliseconds of one call: CUDA events on the current stream, else time.perf_counter.

    Args:
        step: the call to time.
        device: "cpu" or a CUDA device.
        flush: on CUDA, called (untimed) before the call, e.g. to evict the L2 cache.

    Returns:
        Wall milliseconds of the call.
    """
    if device.startswith("cuda"):
        if flush is not None:
            flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    step()
    return (time.perf_counter() - begin) * 1e3


def time_step(step: Step, device: str, *, warmup: int = 2, max_repeats: int = 20,
              min_repeats: int = 3, budget_s: float = 2.0) -> Tuple[float, int]:
    """Median milliseconds of `step` and the number of timed repeats.

    After `warmup` untimed calls, one timed call estimates the cost; the repeat count is then
    budget_s / estimate clamped to [min_repeats, max_repeats] (slow providers get few repeats).
    On CUDA every timed call starts with a cold L2 cache.

    Args:
        step: the call to time.
        device: "cpu" or a CUDA device.
        warmup: untimed calls first.
        max_repeats, min_repeats: bounds of the number of timed calls.
        budget_s: seconds of timed calls aimed at.

    Returns:
        (median ms, number of timed calls).
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    flush = _L2Flusher(device)
    samples = [time_once(step, device, flush)]
    estimate_s = max(samples[0], 1e-3) / 1e3
    repeats = int(min(max(budget_s / estimate_s, min_repeats), max_repeats))
    while len(samples) < max(repeats, 1):
        samples.append(time_once(step, device, flush))
    return statistics.median(samples), len(samples)


def median_ms(step: Step, device: str, repeats: int, warmup: int = 1) -> float:
    """Median of `repeats` timed calls (`time_once`, no cache flush) after `warmup` untimed ones.

    Args:
        step: the call to time.
        device: "cpu" or a CUDA device.
        repeats: timed calls.
        warmup: untimed calls first.

    Returns:
        Median milliseconds.
    """
    for _ in range(warmup):
        step()
    return statistics.median([time_once(step, device) for _ in range(repeats)])


def time_cpu_and_wall(step: Step, device: str = "cpu") -> Tuple[float, float]:
    """(CPU ms, wall ms) of one call.

    On the CPU: time.process_time (CPU time of the whole process, all threads) and
    time.perf_counter. On CUDA both are the CUDA-event time of the call.

    Args:
        step: the call to time.
        device: "cpu" or a CUDA device.

    Returns:
        (cpu ms, wall ms).
    """
    if device.startswith("cuda"):
        elapsed = time_once(step, device)
        return elapsed, elapsed
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    step()
    cpu_ms = (time.process_time() - cpu_start) * 1e3
    return cpu_ms, (time.perf_counter() - wall_start) * 1e3


def time_round_robin(steps: Mapping[str, Step], repeats: int, device: str = "cpu") -> Dict[str, Tuple[float, float]]:
    """Median (CPU ms, wall ms) per named step, calls interleaved round-robin.

    After one warm-up call of each step, every round makes one timed call of each, so that a
    change in the machine's speed during the run reaches every step alike and their ratios
    stay comparable.

    Args:
        steps: name -> step.
        repeats: rounds.
        device: "cpu" or a CUDA device (see `time_cpu_and_wall`).

    Returns:
        name -> (median cpu ms, median wall ms).
    """
    for step in steps.values():
        step()
    times = {name: ([], []) for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            cpu_ms, wall_ms = time_cpu_and_wall(step, device)
            times[name][0].append(cpu_ms)
            times[name][1].append(wall_ms)
    return {name: (statistics.median(cpu), statistics.median(wall)) for name, (cpu, wall) in times.items()}


def time_within_budget(step: Step, *, repeats: int, min_repeats: int, budget_s: float,
                       warmup: int = 1) -> Tuple[float, float, int]:
    """Median wall and CPU milliseconds on the CPU, stopping at `repeats` calls or once the budget is spent.

    Args:
        step: the call to time.
        repeats: most timed calls.
        min_repeats: timed calls made even past the budget.
        budget_s: wall seconds of timed calls after which no further call starts.
        warmup: untimed calls first.

    Returns:
        (median wall ms, median cpu ms, number of timed calls).
    """
    for _ in range(warmup):
        step()
    walls, cpus = [], []
    spent_s = 0.0
    while len(walls) < repeats and (len(walls) < min_repeats or spent_s < budget_s):
        cpu_ms, wall_ms = time_cpu_and_wall(step, "cpu")
        walls.append(wall_ms)
        cpus.append(cpu_ms)
        spent_s += wall_ms / 1e3
    return statistics.median(walls), statistics.median(cpus), len(walls)
