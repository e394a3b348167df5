"""The KD-loss comparison table: `main(argv)` behind `kdfast bench`, `python -m kdfast.benchmark` and benches/.

For each case (dtype, rows N, vocab V, divergence; temperature and alpha fixed per run) it
times, in one process and on the same inputs, the providers `kdfast`
(`kdfast.functional.kd_loss`), `eager` (the loss contract of docs/design.md written with
`torch.nn.functional`), `compile` (`torch.compile` of that function, compiled before timing)
and, on CUDA when importable, `liger` (Liger-Kernel). Two passes are measured: `fwd` (loss
only, under `torch.no_grad`) and `fwd+bwd` (loss plus the gradient of the scalar loss with
respect to the student logits). Reported per row: median wall time over adaptive repeats after
warmup, effective GB/s against the minimum bytes moved, speed-ups against eager and compile,
and peak memory above the inputs. The table goes to stdout, progress to stderr, and rows are
appended to a CSV file only where asked: `--out PATH`, or `<csv_dir>/kd_loss_<device>.csv`
when the caller passes `csv_dir` (benches/bench_kd_loss.py passes benches/results/);
`--no-csv` writes none. Every option is checked before anything runs (the loss options
against the loss contract, the device against this machine, `--out` for writability); a
bad one is one line `PROG: error: ...` on stderr and exit status 2. A provider that fails
(out of memory, compile error, wrong result) gets a row whose status says so, and the run
continues. `main` returns 0 on success (also when providers failed) and 2 on bad options.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from kdfast.argparsing import EXIT_OK, CommandParser, report_error
from kdfast.benchmark.baselines import Provider, ProviderUnavailable, make_provider, make_step
from kdfast.benchmark.cases import DIVERGENCES, DTYPES, PASSES, PROVIDERS, Case, make_inputs, minimum_bytes
from kdfast.benchmark.memory import malloc_for_timing, measure_peak_extra_mb
from kdfast.benchmark.results import (
    append_csv,
    csv_rows,
    default_csv_path,
    format_number,
    format_table,
    git_commit,
    kdfast_backend,
    kdfast_version,
    load_note,
    machine_name,
)
from kdfast.benchmark.timing import synchronize, time_step
from kdfast.contract.validation import check_kd_inputs

__all__ = ["build_parser", "main", "run_case"]

_DEFAULT_DTYPES = ("float32", "bfloat16")
_DEFAULT_ROWS = (256, 1024)
_DEFAULT_VOCAB = (32000, 128256)
_QUICK_ROWS = (16,)
_QUICK_VOCAB = (1000,)
# Tolerance of the cross-check of a provider's loss and gradient against eager's, relative to
# the largest magnitude: summation-order noise in float32, one rounding step of the gradient
# for the 16-bit dtypes.
_CHECK_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


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
    """Measures every provider × pass for one case.

    Args:
        case: the configuration to measure.
        providers: provider names (run in PROVIDERS order, eager first as the cross-check).
        passes: "fwd" and/or "fwd+bwd".
        options: the parsed options (seed, warmup, repeats, min_repeats, budget, no_memory).
        notes: list that collects one note per skipped provider (appended to in place).
        progress: receives one line per measurement.

    Returns:
        One result dict per attempted (provider, pass): case, pass_name, provider, median_ms,
        repeats, peak_extra_mb, status.
    """
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
            if provider.kind == "floor" and pass_name != "fwd+bwd":
                continue
            try:
                step = make_step(provider, pass_name, student, teacher, labels)
                # First call(s): compilation and the cross-check against eager's result.
                for _ in range(provider.extra_warmup + 1):
                    loss, gradient = _losses_and_gradient(_first_call(step, provider, progress))
                    if provider.kind == "inplace" and gradient is not None:
                        gradient = gradient.clone()  # the next call overwrites it
                synchronize(case.device)
                if name == "eager":
                    check_loss, check_gradient = loss, gradient
                elif check_loss is not None and provider.kind != "floor":
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
                     f"{format_number(row['median_ms'], 3):>10} ms  {row['status']}")
        check_loss = check_gradient = None
    del student, teacher, labels
    _free_memory(case.device)
    return results


def _attach_metrics(results: List[Dict[str, object]]) -> None:
    """Adds GB/s, the speed-ups against eager / compile of the same case and pass, and the time
    as a multiple of the add-out floor (`times_floor`)."""
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
        floor_ms = baseline.get((row["case"], row["pass_name"], "add-out"))
        row["times_floor"] = median_ms / floor_ms if valid and floor_ms else None


# ----------------------------------------------------------------------------- command line


def _csv_list(text: str) -> List[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _int_list(text: str) -> List[int]:
    try:
        return [int(item) for item in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser of the KD-loss table.

    Args:
        prog: program name shown in usage and help (default: from sys.argv).

    Returns:
        The parser.
    """
    parser = CommandParser(
        prog=prog,
        description="Time the dense KD loss (kdfast vs eager PyTorch vs torch.compile vs Liger-Kernel) "
                    "forward and forward+backward and print a table; --out PATH also appends the rows to a CSV file.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--dtypes", type=_csv_list, default=None,
                        help="comma list of float32,bfloat16,float16 (default: float32,bfloat16)")
    parser.add_argument("--rows", type=_int_list, default=None, help="comma list of N (default: 256,1024)")
    parser.add_argument("--vocab", type=_int_list, default=None, help="comma list of V (default: 32000,128256)")
    parser.add_argument("--divergence", type=_csv_list, default=["forward_kl"],
                        help=f"comma list of {','.join(DIVERGENCES)} (default: forward_kl)")
    parser.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the hard-label CE (default: %(default)s)")
    parser.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight (default: %(default)s)")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="label smoothing of the hard-label CE (default: %(default)s)")
    parser.add_argument("--passes", type=_csv_list, default=list(PASSES),
                        help="comma list of fwd,fwd+bwd (default: both)")
    parser.add_argument("--providers", type=_csv_list, default=None,
                        help=f"comma list of {','.join(PROVIDERS)} (default: all; liger only with --device cuda; "
                             "--quick leaves out compile unless named here)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="most timed repeats per measurement (default: %(default)s)")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest timed repeats (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timed calls aimed at per measurement; slow providers get fewer "
                             "repeats, never under --min-repeats (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: leave PyTorch's setting, all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes (N=16, V=1000), few repeats: a smoke test that takes seconds")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="CSV file to append the rows to (default: none; benches/bench_kd_loss.py appends to "
                             "benches/results/kd_loss_<device>.csv)")
    parser.add_argument("--no-csv", action="store_true", help="write no CSV file, whatever --out or the script says")
    return parser


def _check_device(device: str) -> Optional[str]:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return f"unknown device {device!r}; expected cpu, cuda or cuda:N"
    if parsed.type == "cpu":
        return None
    if parsed.type != "cuda":
        return f"unsupported device {device!r}; expected cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return f"--device {device}: torch.cuda.is_available() is False (torch {torch.__version__})"
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
    return None


def _check_loss_options(options: argparse.Namespace) -> Optional[str]:
    """The loss options against the loss contract itself (kdfast.contract), on metadata-only tensors."""
    logits = torch.empty(1, 2, device="meta")
    labels = torch.zeros(1, dtype=torch.int64, device="meta")
    for divergence in options.divergence:
        try:
            check_kd_inputs(logits, logits, labels, divergence=divergence, temperature=options.temperature,
                            alpha=options.alpha, beta=options.beta, ignore_index=-100, reduction="mean",
                            label_smoothing=options.label_smoothing)
        except (TypeError, ValueError) as error:
            message = str(error)
            return message.split(": ", 1)[1] if message.startswith("kd_loss: ") else message
    return None


def _check_out(path: str) -> Optional[str]:
    target = Path(path).resolve()
    if target.is_dir():
        return f"--out {path} is a directory; expected a CSV file path"
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"--out {path}: {parent} is a file, not a directory"
    if not os.access(parent if not target.exists() else target, os.W_OK):
        return f"--out {path}: not writable"
    return None


def _resolve_options(options: argparse.Namespace) -> Optional[str]:
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
    for name in ("divergence", "providers", "passes"):
        if not getattr(options, name):
            return f"--{name} names nothing"
    if any(n <= 0 for n in options.rows) or any(v <= 0 for v in options.vocab):
        return "--rows and --vocab must be positive"
    if options.repeats < 1 or options.min_repeats < 1:
        return "--repeats and --min-repeats must be at least 1"
    if options.min_repeats > options.repeats:
        return f"--min-repeats {options.min_repeats} exceeds --repeats {options.repeats}"
    if not (math.isfinite(options.budget) and options.budget > 0):
        return f"--budget must be a positive number of seconds, got {options.budget}"
    if options.warmup < 0:
        return f"--warmup must be >= 0, got {options.warmup}"
    if options.threads is not None and options.threads < 1:
        return "--threads must be at least 1"
    problem = _check_device(options.device) or _check_loss_options(options)
    if problem:
        return problem
    if options.out is not None and not options.no_csv:
        return _check_out(options.out)
    return None


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None,
         csv_dir: Union[str, os.PathLike, None] = None) -> int:
    """Runs the KD-loss comparison table.

    Args:
        argv: command-line arguments (default: sys.argv[1:]); `--help` lists them.
        prog: program name for usage and help.
        csv_dir: where `kd_loss_<device>.csv` is appended to when `--out` is not given
            (default None: no CSV without `--out`).

    Returns:
        0 on success (also when some providers failed), 2 on bad options.
    """
    parser = build_parser(prog)
    options = parser.parse_args(argv)
    if options.out is None and csv_dir is not None:
        options.out = str(default_csv_path(options.device, csv_dir))
    error = _resolve_options(options)
    if error:
        return report_error(parser.prog, error)
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
             f"torch {torch.__version__}, kdfast {kdfast_version()} ({backend}), "
             f"T={options.temperature} alpha={options.alpha}, {len(cases)} cases")
    notes: List[str] = []
    if backend == "reference" and "kdfast" in options.providers:
        notes.append("kdfast: native extension not built; timings are of the pure-PyTorch reference path")
    results: List[Dict[str, object]] = []
    for index, case in enumerate(cases, 1):
        progress(f"[{index}/{len(cases)}] {case.label()}")
        results.extend(run_case(case, options.providers, options.passes, options, notes, progress))
    _attach_metrics(results)

    print(f"kd_loss: {machine_name(device)}, {device}, torch {torch.__version__}, kdfast {kdfast_version()} "
          f"({backend}), commit {git_commit()}, T={options.temperature}, alpha={options.alpha}, "
          f"label_smoothing={options.label_smoothing}{load_note(device)}")
    print(format_table(results))
    print("GB/s = minimum bytes / time; minimum bytes = N*V*(size_s + size_t) + N*8 for fwd, "
          "+ N*V*size_s (gradient) for fwd+bwd. peak MB = memory held at the peak of one call "
          "beyond what was allocated before it (10^6 bytes).")
    for note in notes:
        print(f"note: {note}")
    if options.out is not None and not options.no_csv and results:
        written = append_csv(csv_rows(results, device), Path(options.out))
        print(f"CSV: {len(results)} rows appended to {written}")
    sys.stdout.flush()
    return EXIT_OK
