"""Side-by-side benchmark of the dense KD loss: kdfast against eager PyTorch, torch.compile and Liger-Kernel.

`main(argv)` is the entry point behind `kdfast bench` and `benches/bench_kd_loss.py`. For each
case (dtype, rows N, vocab V, divergence; temperature and alpha fixed per run) it times, in one
process and on the same inputs, the providers `kdfast` (`kdfast.functional.kd_loss`), `eager`
(the loss contract of DESIGN.md written with `torch.nn.functional`, see `eager_kd_loss`),
`compile` (`torch.compile` of that function, compiled before timing) and, on CUDA when
importable, `liger` (Liger-Kernel's KL-divergence / JSD and cross-entropy losses combined the
same way). Two passes are measured: `fwd` (loss only, under `torch.no_grad`) and `fwd+bwd`
(loss plus the gradient of the scalar loss with respect to the student logits; the teacher
needs no gradient). Reported per row: median wall time over adaptive repeats after warmup,
effective GB/s against the minimum bytes moved (`minimum_bytes`), speed-ups against eager and
compile, and peak memory above the inputs. The table goes to stdout and rows are appended to a
CSV file. A provider that fails (out of memory, compile error, wrong result) gets a row whose
status says so, and the run continues. The building blocks (`Case`, `make_inputs`, `make_provider`,
`make_step`, `time_step`) are public so that the pytest-benchmark suite in `benches/` reuses
them instead of repeating the formulas.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import dataclasses
import datetime
import functools
import gc
import inspect
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "CSV_COLUMNS",
    "Case",
    "DIVERGENCES",
    "PASSES",
    "PROVIDERS",
    "Provider",
    "ProviderUnavailable",
    "eager_kd_loss",
    "main",
    "make_inputs",
    "make_provider",
    "make_step",
    "measure_peak_extra_mb",
    "minimum_bytes",
    "synchronize",
    "time_step",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
PASSES = ("fwd", "fwd+bwd")
# Order in which providers run within a case: eager first, so that its loss and gradient can
# serve as the cross-check for the others.
PROVIDERS = ("eager", "compile", "liger", "kdfast")
_DISPLAY_ORDER = ("kdfast", "liger", "compile", "eager")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

CSV_COLUMNS = (
    "timestamp",
    "machine",
    "cores",
    "threads",
    "commit",
    "device",
    "dtype",
    "N",
    "V",
    "divergence",
    "temperature",
    "alpha",
    "pass",
    "provider",
    "median_ms",
    "gbps",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "peak_extra_mb",
    "torch_version",
    "kdfast_version",
    "kdfast_backend",
    "repeats",
    "status",
)

_DEFAULT_DTYPES = ("float32", "bfloat16")
_DEFAULT_ROWS = (256, 1024)
_DEFAULT_VOCAB = (32000, 128256)
_QUICK_ROWS = (16,)
_QUICK_VOCAB = (1000,)
# Every this-many-th row (starting with row 0) carries ignore_index: "a few rows ignored".
_IGNORED_ROW_STRIDE = 16
# Tolerance of the cross-check of a provider's loss and gradient against eager's, relative to
# the largest magnitude: summation-order noise in float32, one rounding step of the gradient
# for the 16-bit dtypes.
_CHECK_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
_MB = 1e6  # peak memory is reported in MB = 10^6 bytes


# ----------------------------------------------------------------------------- cases, inputs


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration: shape, dtype and the loss hyper-parameters."""

    device: str
    dtype: torch.dtype
    rows: int
    vocab: int
    divergence: str = "forward_kl"
    temperature: float = 2.0
    alpha: float = 0.5
    beta: float = 0.5
    ignore_index: int = -100
    label_smoothing: float = 0.0
    t2_scale: bool = True

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def loss_kwargs(self) -> Dict[str, object]:
        """Keyword arguments shared by `kdfast.functional.kd_loss` and `eager_kd_loss`."""
        return dict(
            divergence=self.divergence,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            t2_scale=self.t2_scale,
        )

    def label(self) -> str:
        return f"{self.dtype_name} N={self.rows} V={self.vocab} {self.divergence}"


def make_inputs(case: Case, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic student logits, teacher logits [N, V] (case dtype) and int64 labels [N].

    Logits are N(0, 2²), drawn in float32 on the device and cast to the case dtype.
    Rows 0, 16, 32, ... carry `ignore_index`. None of the tensors requires grad.
    """
    generator = torch.Generator(device=case.device).manual_seed(seed)
    shape = (case.rows, case.vocab)
    student = (torch.randn(shape, generator=generator, device=case.device) * 2.0).to(case.dtype)
    teacher = (torch.randn(shape, generator=generator, device=case.device) * 2.0).to(case.dtype)
    labels = torch.randint(0, case.vocab, (case.rows,), generator=generator, device=case.device)
    labels[::_IGNORED_ROW_STRIDE] = case.ignore_index
    return student, teacher, labels


def minimum_bytes(case: Case, pass_name: str, with_labels: bool = True) -> int:
    """Minimum bytes any implementation must move for one call (the GB/s denominator).

    Each input is read once and each output written once:
      fwd:      bytes = N·V·(size_s + size_t) + N·8           (student, teacher, int64 labels)
      fwd+bwd:  bytes = fwd bytes + N·V·size_s                 (student gradient written once)
    The scalar loss (4 bytes) is neglected. size_s = size_t = the case dtype's element size.
    """
    element = torch.empty((), dtype=case.dtype).element_size()
    total = case.rows * case.vocab * (element + element)
    if with_labels:
        total += case.rows * 8
    if pass_name == "fwd+bwd":
        total += case.rows * case.vocab * element
    return total


# ----------------------------------------------------------------------------- the eager baseline


def _divergence_rows(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, divergence: str,
                     beta: float) -> torch.Tensor:
    """Row-wise D(p, q) from log p (teacher) and log q (student), via torch.nn.functional.

    F.kl_div(input, target, log_target=True) is Σ exp(target)·(target − input), i.e.
    KL(target ‖ exp(input)) summed over the last dim.
    """
    if divergence == "forward_kl":  # Σ p (log p − log q)
        return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":  # Σ q (log q − log p)
        return F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True).sum(-1)
    if divergence == "jsd":  # β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q
        mixture_log_probs = torch.logaddexp(teacher_log_probs + math.log(beta), student_log_probs + math.log1p(-beta))
        teacher_to_mixture = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
        student_to_mixture = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True).sum(-1)
        return beta * teacher_to_mixture + (1.0 - beta) * student_to_mixture
    if divergence == "tvd":  # ½ Σ |p − q|
        return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")


def eager_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor] = None,
                  *, divergence: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.0, beta: float = 0.5,
                  ignore_index: int = -100, label_smoothing: float = 0.0, t2_scale: bool = True) -> torch.Tensor:
    """The KD loss with reduction "mean", written as a user would with torch.nn.functional.

    Args:
        student_logits: [..., V] float32/bfloat16/float16 (float64 is kept as float64).
        teacher_logits: [..., V]; detached (a constant).
        labels: int64 [...] or None (every row valid; alpha must then be 0).
        divergence, temperature, alpha, beta, ignore_index, label_smoothing, t2_scale: as in
            `kdfast.functional.kd_loss`.

    Returns:
        Scalar: Σ over valid rows of α·CE + (1−α)·τ·D, divided by the number of valid rows
        (0 when none is valid). Computed in float32 (float64 for float64 inputs); autograd
        returns the student gradient in the student's dtype. The CE term is skipped when α = 0.
    """
    vocab = student_logits.shape[-1]
    compute_dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    student = student_logits.reshape(-1, vocab).to(compute_dtype)
    teacher = teacher_logits.detach().reshape(-1, vocab).to(compute_dtype)

    student_log_probs = F.log_softmax(student / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher / temperature, dim=-1)
    divergence_scale = (1.0 - alpha) * (temperature * temperature if t2_scale else 1.0)
    row_loss = divergence_scale * _divergence_rows(teacher_log_probs, student_log_probs, divergence, beta)

    if labels is None:
        if alpha != 0:
            raise ValueError("eager_kd_loss: alpha > 0 needs labels")
        return row_loss.mean()
    flat_labels = labels.reshape(-1)
    if alpha != 0:
        cross_entropy = F.cross_entropy(student, flat_labels, ignore_index=ignore_index,
                                        label_smoothing=label_smoothing, reduction="none")
        row_loss = row_loss + alpha * cross_entropy
    valid_rows = flat_labels != ignore_index
    row_loss = torch.where(valid_rows, row_loss, 0.0)
    return row_loss.sum() / valid_rows.sum().clamp_min(1)


# ----------------------------------------------------------------------------- providers


class ProviderUnavailable(Exception):
    """The provider does not apply here (not importable, wrong device, unsupported divergence)."""


@dataclasses.dataclass
class Provider:
    """A loss callable `fn(student, teacher, labels) -> scalar loss` plus how to drive it.

    `mutates_student`: the callable overwrites the student logits in place (Liger's
    cross-entropy stores its gradient there), so it must be given a private copy.
    `extra_warmup`: calls to make before the regular warmup (torch.compile compiles on the first).
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    mutates_student: bool = False
    extra_warmup: int = 0


def _raise_compile_limits() -> None:
    # Each (shape, dtype, grad mode) gets its own static graph of the same function; raise the
    # per-function recompile limit (8 by default) so that a full table never falls back to eager.
    config = torch._dynamo.config
    for attribute in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, attribute):
            setattr(config, attribute, max(getattr(config, attribute), 512))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)


def _make_liger_fn(case: Case) -> Callable:
    if case.device != "cuda":
        raise ProviderUnavailable("liger runs on CUDA only")
    if case.divergence not in ("forward_kl", "jsd"):
        raise ProviderUnavailable(f"Liger-Kernel has no {case.divergence} loss with a student gradient")
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerJSD, LigerKLDIVLoss
    except Exception as error:  # ImportError, or Triton failing to initialise
        raise ProviderUnavailable(f"liger_kernel not importable ({type(error).__name__}: {error})") from None

    temperature, alpha, beta, ignore_index = case.temperature, case.alpha, case.beta, case.ignore_index
    divergence_scale = (1.0 - alpha) * (temperature * temperature if case.t2_scale else 1.0)
    cross_entropy = LigerCrossEntropyLoss(ignore_index=ignore_index, label_smoothing=case.label_smoothing,
                                          reduction="mean")
    kl_sum = LigerKLDIVLoss(reduction="sum", log_target=True)
    jsd_parameters = inspect.signature(LigerJSD.__init__).parameters
    jsd = LigerJSD(beta=beta, ignore_index=ignore_index) if "ignore_index" in jsd_parameters else LigerJSD(beta=beta)
    jsd_takes_labels = len(inspect.signature(jsd.forward).parameters) >= 3

    def liger_kd_loss(student, teacher, labels):
        # Temperature softmax in PyTorch (upcast to float32 as in eager), divergence in Liger.
        # The divergence runs first: Liger's cross-entropy overwrites `student` with its gradient.
        student_log_probs = F.log_softmax(student.float() / temperature, dim=-1)
        teacher_log_probs = F.log_softmax(teacher.float() / temperature, dim=-1)
        valid_rows = (labels != ignore_index).nonzero().squeeze(1)
        valid_count = max(int(valid_rows.numel()), 1)
        if case.divergence == "forward_kl":
            # LigerKLDIVLoss(y_pred=log q, y_true=log p) = Σ p (log p − log q); it has no
            # ignore_index, so the valid rows are selected first.
            divergence = kl_sum(student_log_probs[valid_rows], teacher_log_probs[valid_rows]) / valid_count
        elif jsd_takes_labels:  # mean over rows whose label is not ignore_index
            divergence = jsd(student_log_probs, teacher_log_probs, labels)
        else:
            divergence = jsd(student_log_probs[valid_rows], teacher_log_probs[valid_rows])
        loss = divergence_scale * divergence.float()
        if alpha != 0:
            loss = loss + alpha * cross_entropy(student, labels).float()
        return loss

    return liger_kd_loss


def make_provider(name: str, case: Case) -> Provider:
    """Builds provider `name` for `case`; raises ProviderUnavailable when it does not apply."""
    kwargs = case.loss_kwargs()
    if name == "eager":
        return Provider(name, functools.partial(eager_kd_loss, **kwargs))
    if name == "compile":
        _raise_compile_limits()
        return Provider(name, torch.compile(functools.partial(eager_kd_loss, **kwargs), dynamic=False),
                        extra_warmup=1)
    if name == "kdfast":
        from kdfast import functional

        return Provider(name, functools.partial(functional.kd_loss, reduction="mean", **kwargs))
    if name == "liger":
        return Provider(name, _make_liger_fn(case), mutates_student=True)
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def make_step(provider: Provider, pass_name: str, student: torch.Tensor, teacher: torch.Tensor,
              labels: torch.Tensor) -> Callable[[], object]:
    """A no-argument callable running one `pass_name` call of the provider on these inputs.

    fwd: the loss under torch.no_grad (returns the loss).
    fwd+bwd: the loss with a student that requires grad, then torch.autograd.grad of the
    scalar loss (returns (loss, student gradient); nothing accumulates into .grad).
    """
    if provider.mutates_student:
        student = student.clone()
    student = student.detach()
    fn = provider.fn
    if pass_name == "fwd":

        def forward_step():
            with torch.no_grad():
                return fn(student, teacher, labels)

        return forward_step
    if pass_name == "fwd+bwd":
        student.requires_grad_(True)

        def forward_backward_step():
            loss = fn(student, teacher, labels)
            (gradient,) = torch.autograd.grad(loss, student)
            return loss, gradient

        return forward_backward_step
    raise ValueError(f"unknown pass {pass_name!r}; expected one of {PASSES}")


# ----------------------------------------------------------------------------- timing and memory


def synchronize(device: str) -> None:
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


def _time_once(step: Callable[[], object], device: str, flush: _L2Flusher) -> float:
    """Milliseconds of one call: CUDA events on the current stream, else time.perf_counter."""
    if device.startswith("cuda"):
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


def time_step(step: Callable[[], object], device: str, *, warmup: int = 2, max_repeats: int = 20,
              min_repeats: int = 3, budget_s: float = 2.0) -> Tuple[float, int]:
    """Median milliseconds of `step` and the number of timed repeats.

    After `warmup` untimed calls, one timed call estimates the cost; the repeat count is then
    budget_s / estimate clamped to [min_repeats, max_repeats] (slow providers get few repeats).
    """
    for _ in range(warmup):
        step()
    synchronize(device)
    flush = _L2Flusher(device)
    samples = [_time_once(step, device, flush)]
    estimate_s = max(samples[0], 1e-3) / 1e3
    repeats = int(min(max(budget_s / estimate_s, min_repeats), max_repeats))
    while len(samples) < max(repeats, 1):
        samples.append(_time_once(step, device, flush))
    return statistics.median(samples), len(samples)


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


# glibc mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


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
    """Pins glibc to the state a long-running PyTorch process settles in: blocks up to 32 MiB
    come from (and return to) the heap, larger ones are mmap-ed. Timed calls run in this state;
    it is restored after each memory measurement, which changes it (see `_cpu_peak_extra_mb`)."""
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


# ----------------------------------------------------------------------------- environment facts


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short commit of the checkout holding this file (or the cwd), "+dirty" with local changes."""
    candidates = [Path(__file__).resolve().parents[2], Path.cwd()]
    for root in candidates:
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10)
            if commit.returncode != 0:
                continue
            changes = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                     capture_output=True, text=True, timeout=10)
            dirty = "+dirty" if changes.returncode == 0 and changes.stdout.strip() else ""
            return commit.stdout.strip() + dirty
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown"


def kdfast_backend(device: str = "cpu") -> str:
    """"compiled" when kdfast's native kernels serve `device`, else "reference" (pure-PyTorch path)."""
    try:
        import kdfast._C  # noqa: F401
    except Exception:
        return "reference"
    if device.startswith("cuda"):
        try:
            from kdfast.ops._native import has_cuda_kernels
        except Exception:
            return "compiled"
        return "compiled" if has_cuda_kernels() else "reference"
    return "compiled"


def _load_note(device: str) -> str:
    """", load average X (Y cores)" on the CPU: timings there are only as steady as the machine is idle."""
    if device.startswith("cuda") or not hasattr(os, "getloadavg"):
        return ""
    try:
        return f", load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)"
    except OSError:
        return ""


def _kdfast_version() -> str:
    try:
        import kdfast

        return str(getattr(kdfast, "__version__", "unknown"))
    except Exception:
        return "unknown"


# ----------------------------------------------------------------------------- running cases


def _losses_and_gradient(result: object) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(result, tuple):
        return result[0].detach(), result[1]
    return result.detach(), None


def _relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.float(), reference.float()
    scale = reference.abs().max().item()
    return (value - reference).abs().max().item() / max(scale, 1e-12)


def _short_error(error: BaseException) -> str:
    message = " ".join(str(error).split())
    return f"failed: {type(error).__name__}: {message[:160]}"


def _free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _first_call(step: Callable[[], object], provider: Provider, progress: Callable[[str], None]) -> object:
    """Runs `step`; a provider that compiles gets one retry, since a compiler cache shared with
    other processes can lose a file mid-build (a transient error, not the provider's)."""
    if not provider.extra_warmup:
        return step()
    try:
        return step()
    except Exception as error:
        progress(f"  {provider.name}: first call failed ({type(error).__name__}); retrying once")
        return step()


def run_case(case: Case, providers: Sequence[str], passes: Sequence[str], options: argparse.Namespace,
             notes: List[str], progress: Callable[[str], None]) -> List[Dict[str, object]]:
    """Measures every provider × pass for one case; returns one result dict per attempted pair."""
    student, teacher, labels = make_inputs(case, seed=options.seed)
    built: Dict[str, Provider] = {}
    for name in providers:
        try:
            built[name] = make_provider(name, case)
        except ProviderUnavailable as reason:
            note = f"{name}: skipped ({reason})"
            if note not in notes:
                notes.append(note)
    results: List[Dict[str, object]] = []
    for pass_name in passes:
        check_loss, check_gradient = None, None
        for name in [p for p in PROVIDERS if p in built]:
            provider = built[name]
            row: Dict[str, object] = dict(case=case, pass_name=pass_name, provider=name, median_ms=math.nan,
                                          repeats=0, peak_extra_mb=None, status="ok")
            step = None
            try:
                step = make_step(provider, pass_name, student, teacher, labels)
                # First call(s): compilation and the cross-check against eager's result.
                for _ in range(provider.extra_warmup + 1):
                    loss, gradient = _losses_and_gradient(_first_call(step, provider, progress))
                synchronize(case.device)
                if name == "eager":
                    check_loss, check_gradient = loss, gradient
                elif check_loss is not None:
                    difference = _relative_difference(loss, check_loss)
                    if gradient is not None and check_gradient is not None:
                        difference = max(difference, _relative_difference(gradient, check_gradient))
                    if not difference <= _CHECK_RTOL.get(case.dtype, 1e-4):
                        row["status"] = f"differs from eager: rel {difference:.2e}"
                del loss, gradient
                median_ms, repeats = time_step(step, case.device, warmup=max(options.warmup - 1, 0),
                                               max_repeats=options.repeats, min_repeats=options.min_repeats,
                                               budget_s=options.budget)
                row["median_ms"], row["repeats"] = median_ms, repeats
                if not options.no_memory:
                    row["peak_extra_mb"] = measure_peak_extra_mb(step, case.device)
            except Exception as error:  # OOM, compile errors, kernel errors: report and go on
                row["status"] = _short_error(error)
                detail = "".join(traceback.format_exception_only(type(error), error)).strip()
                progress(f"  {name} {pass_name} failed; last lines of the error:\n"
                         + "\n".join("    " + line for line in detail.splitlines()[-12:]))
            finally:
                del step
                _free_memory(case.device)
            results.append(row)
            progress(f"  {case.label()} {pass_name:<7} {name:<8} "
                     f"{_format_number(row['median_ms'], 3):>10} ms  {row['status']}")
        check_loss = check_gradient = None
    del student, teacher, labels
    _free_memory(case.device)
    return results


def _attach_metrics(results: List[Dict[str, object]]) -> None:
    """Adds GB/s and the speed-ups against eager / compile of the same case and pass."""
    baseline: Dict[Tuple[Case, str, str], float] = {}
    for row in results:
        if row["status"] == "ok" or str(row["status"]).startswith("differs"):
            baseline[(row["case"], row["pass_name"], row["provider"])] = row["median_ms"]
    for row in results:
        median_ms = row["median_ms"]
        valid = isinstance(median_ms, float) and math.isfinite(median_ms) and median_ms > 0
        row["gbps"] = minimum_bytes(row["case"], row["pass_name"]) / (median_ms * 1e-3) / 1e9 if valid else None
        for reference in ("eager", "compile"):
            reference_ms = baseline.get((row["case"], row["pass_name"], reference))
            row[f"speedup_vs_{reference}"] = reference_ms / median_ms if valid and reference_ms else None


# ----------------------------------------------------------------------------- output


def _format_number(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def format_table(results: List[Dict[str, object]]) -> str:
    """One aligned plain-text table: cases in run order, then pass, kdfast first within a group."""
    header = ("dtype", "N", "V", "divergence", "pass", "provider", "median ms", "GB/s", "x eager", "x compile",
              "peak MB", "status")
    order = {name: index for index, name in enumerate(_DISPLAY_ORDER)}
    case_order: Dict[Case, int] = {}
    for row in results:
        case_order.setdefault(row["case"], len(case_order))
    ordered = sorted(enumerate(results), key=lambda item: (
        case_order[item[1]["case"]], PASSES.index(item[1]["pass_name"]), order.get(item[1]["provider"], 99),
        item[0]))
    lines = []
    for _, row in ordered:
        case = row["case"]
        lines.append((case.dtype_name, str(case.rows), str(case.vocab), case.divergence, row["pass_name"],
                      row["provider"], _format_number(row["median_ms"], 3), _format_number(row["gbps"], 1),
                      _format_number(row["speedup_vs_eager"], 2), _format_number(row["speedup_vs_compile"], 2),
                      _format_number(row["peak_extra_mb"], 1), _clip(str(row["status"]), 72)))
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) if lines else len(header[i])
              for i in range(len(header))]
    numeric = {1, 2, 6, 7, 8, 9, 10}

    def render(cells):
        return "  ".join(cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
                         for i, cell in enumerate(cells)).rstrip()

    out = [render(header), render(["-" * width for width in widths])]
    previous_group = None
    for line in lines:
        group = line[:5]
        if previous_group is not None and group[:4] != previous_group[:4]:
            out.append("")
        previous_group = group
        out.append(render(line))
    return "\n".join(out)


def csv_rows(results: List[Dict[str, object]], device: str) -> List[Dict[str, object]]:
    """The CSV records (columns CSV_COLUMNS) for the results of one run."""
    timestamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    common = dict(timestamp=timestamp, machine=machine_name(device), cores=os.cpu_count(),
                  threads=torch.get_num_threads(), commit=git_commit(), torch_version=torch.__version__,
                  kdfast_version=_kdfast_version(), kdfast_backend=kdfast_backend(device))
    records = []
    for row in results:
        case = row["case"]
        records.append(dict(common, device=device, dtype=case.dtype_name, N=case.rows, V=case.vocab,
                            divergence=case.divergence, temperature=case.temperature, alpha=case.alpha,
                            **{"pass": row["pass_name"]}, provider=row["provider"],
                            median_ms=_csv_number(row["median_ms"], 4), gbps=_csv_number(row["gbps"], 2),
                            speedup_vs_eager=_csv_number(row["speedup_vs_eager"], 3),
                            speedup_vs_compile=_csv_number(row["speedup_vs_compile"], 3),
                            peak_extra_mb=_csv_number(row["peak_extra_mb"], 1), repeats=row["repeats"],
                            status=row["status"]))
    return records


def _csv_number(value, digits: int) -> str:
    """Fixed-point with `digits` decimals, or `digits` significant digits for values below 1."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if abs(value) < 1:
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"


def append_csv(records: List[Dict[str, object]], path: Path) -> Path:
    """Appends records to `path` (header written when the file is new). If an existing file has
    other columns, writes next to it with a timestamped name instead; returns the path used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as existing:
            header = next(csv.reader(existing), None)
        if header != list(CSV_COLUMNS):
            path = path.with_name(f"{path.stem}.{datetime.datetime.now():%Y%m%d-%H%M%S}{path.suffix}")
    new_file = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as output:
        writer = csv.DictWriter(output, fieldnames=CSV_COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerows(records)
    return path


def default_csv_path(device: str) -> Path:
    """benches/results/kd_loss_<device>.csv when run from the repository root, else ./kd_loss_<device>.csv."""
    cwd = Path.cwd()
    name = f"kd_loss_{device.split(':')[0]}.csv"
    if (cwd / "benches").is_dir() and (cwd / "pyproject.toml").is_file():
        return cwd / "benches" / "results" / name
    return cwd / name


# ----------------------------------------------------------------------------- command line


def _csv_list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _int_list(text: str) -> List[int]:
    return [int(item) for item in _csv_list(text)]


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Time the dense KD loss (kdfast vs eager PyTorch vs torch.compile vs Liger-Kernel) "
                    "forward and forward+backward; print a table and append CSV rows.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtypes", type=_csv_list, default=None,
                        help="comma list of float32,bfloat16,float16 (default: float32,bfloat16)")
    parser.add_argument("--rows", type=_int_list, default=None, help="comma list of N (default: 256,1024)")
    parser.add_argument("--vocab", type=_int_list, default=None, help="comma list of V (default: 32000,128256)")
    parser.add_argument("--divergence", type=_csv_list, default=["forward_kl"],
                        help=f"comma list of {','.join(DIVERGENCES)} (default: forward_kl)")
    parser.add_argument("--temperature", type=float, default=2.0, help="default: 2.0")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label CE (default: 0.5)")
    parser.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight (default: 0.5)")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="default: 0.0")
    parser.add_argument("--passes", type=_csv_list, default=list(PASSES), help="comma list of fwd,fwd+bwd")
    parser.add_argument("--providers", type=_csv_list, default=None,
                        help=f"comma list of {','.join(PROVIDERS)} (default: all; liger only with --device cuda; "
                             "--quick leaves out compile unless named here)")
    parser.add_argument("--repeats", type=int, default=20, help="most timed repeats per measurement (default: 20)")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest timed repeats (default: 3)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed calls aimed at per measurement; slow providers get fewer "
                             "repeats, never under --min-repeats (default: 2.0)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default: 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: leave PyTorch's setting, all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes (N=16, V=1000), few repeats: a smoke test that takes seconds")
    parser.add_argument("--out", default=None,
                        help="CSV file to append to (default: benches/results/kd_loss_<device>.csv from the "
                             "repository root, else ./kd_loss_<device>.csv)")
    parser.add_argument("--no-csv", action="store_true", help="print the table only")
    return parser


def _resolve_options(options: argparse.Namespace, parser: argparse.ArgumentParser) -> Optional[str]:
    """Fills defaults that depend on --quick and validates; returns an error message or None."""
    options.dtypes = options.dtypes or list(_DEFAULT_DTYPES)
    options.rows = options.rows or list(_QUICK_ROWS if options.quick else _DEFAULT_ROWS)
    options.vocab = options.vocab or list(_QUICK_VOCAB if options.quick else _DEFAULT_VOCAB)
    if options.providers is None:
        options.providers = [p for p in PROVIDERS if not (options.quick and p == "compile")]
    if options.quick:
        options.repeats = min(options.repeats, 5)
        options.budget = min(options.budget, 0.2)
        options.warmup = min(options.warmup, 1)
    for dtype in options.dtypes:
        if dtype not in DTYPES:
            return f"unknown dtype {dtype!r}; expected float32, bfloat16 or float16"
    for divergence in options.divergence:
        if divergence not in DIVERGENCES:
            return f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}"
    for provider in options.providers:
        if provider not in PROVIDERS:
            return f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}"
    for pass_name in options.passes:
        if pass_name not in PASSES:
            return f"unknown pass {pass_name!r}; expected fwd or fwd+bwd"
    if any(n <= 0 for n in options.rows) or any(v <= 0 for v in options.vocab):
        return "--rows and --vocab must be positive"
    if options.repeats < 1 or options.min_repeats < 1:
        return "--repeats and --min-repeats must be at least 1"
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        return "--device cuda requested but torch.cuda.is_available() is False"
    if not (options.device == "cpu" or options.device.startswith("cuda")):
        return f"unsupported device {options.device!r}; expected cpu or cuda"
    if options.threads is not None and options.threads < 1:
        return "--threads must be at least 1"
    return None


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Runs the benchmark; returns 0 on success (also when some providers failed), 2 on bad options."""
    parser = build_parser(prog)
    options = parser.parse_args(argv)
    error = _resolve_options(options, parser)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = options.device
    if device == "cpu":
        malloc_for_timing()
    if options.threads is not None:
        torch.set_num_threads(options.threads)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    cases = [Case(device=device, dtype=DTYPES[dtype], rows=rows, vocab=vocab, divergence=divergence,
                  temperature=options.temperature, alpha=options.alpha, beta=options.beta,
                  label_smoothing=options.label_smoothing)
             for dtype in options.dtypes for rows in options.rows for vocab in options.vocab
             for divergence in options.divergence]
    backend = kdfast_backend(device)
    progress(f"kd_loss benchmark on {machine_name(device)} ({device}, {torch.get_num_threads()} threads), "
             f"torch {torch.__version__}, kdfast {_kdfast_version()} ({backend}), "
             f"T={options.temperature} alpha={options.alpha}, {len(cases)} cases")
    notes: List[str] = []
    if backend == "reference" and "kdfast" in options.providers:
        notes.append("kdfast: native extension not built; timings are of the pure-PyTorch reference path")
    results: List[Dict[str, object]] = []
    for index, case in enumerate(cases, 1):
        progress(f"[{index}/{len(cases)}] {case.label()}")
        results.extend(run_case(case, options.providers, options.passes, options, notes, progress))
    _attach_metrics(results)

    print(f"kd_loss: {machine_name(device)}, {device}, torch {torch.__version__}, kdfast {_kdfast_version()} "
          f"({backend}), commit {git_commit()}, T={options.temperature}, alpha={options.alpha}, "
          f"label_smoothing={options.label_smoothing}{_load_note(device)}")
    print(format_table(results))
    print("GB/s = minimum bytes / time; minimum bytes = N*V*(size_s + size_t) + N*8 for fwd, "
          "+ N*V*size_s (gradient) for fwd+bwd. peak MB = memory held at the peak of one call "
          "beyond what was allocated before it (10^6 bytes).")
    for note in notes:
        print(f"note: {note}")
    if not options.no_csv and results:
        path = Path(options.out) if options.out else default_csv_path(device)
        written = append_csv(csv_rows(results, device), path)
        print(f"CSV: {len(results)} rows appended to {written}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
