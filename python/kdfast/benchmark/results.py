"""What a benchmark run records: machine, commit and versions, the KD-loss table and its CSV rows.

Environment facts (`machine_name`, `git_commit`, `load_average`, and `kdfast_backend`, read
from `kdfast.build_info()`) go into every result row. `CSV_COLUMNS`, `csv_rows` and
`format_table` turn the result dicts of the KD-loss table (keys case, pass_name, provider,
median_ms, repeats, peak_extra_mb, status, gbps, speedup_vs_eager, speedup_vs_compile) into CSV
records and the printed table. `append_csv` and `write_csv` write any benchmark's records;
appending never mixes two headers in one file. Nothing here picks a file on its own: callers
pass the path (`default_csv_path(device, directory)` names the KD-loss table's file).
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch

from kdfast._build import build_info
from kdfast._version import __version__ as _kdfast_version
from kdfast.benchmark.cases import PASSES, Case

__all__ = ["CSV_COLUMNS", "append_csv", "csv_rows", "default_csv_path", "format_number", "format_table",
           "git_commit", "kdfast_backend", "kdfast_version", "load_average", "load_note", "machine_name", "write_csv"]

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

# Order of the providers within a group of the printed table.
_DISPLAY_ORDER = ("kdfast", "kdfast-inplace", "kdfast-2pass", "liger", "compile", "eager", "add-out", "add-fresh")


# ----------------------------------------------------------------------------- environment facts


def machine_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU model (from /proc/cpuinfo where it exists).

    Args:
        device: "cpu" or a CUDA device.

    Returns:
        A human-readable name.
    """
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
    """Short commit of the checkout holding this package (or the cwd), "+dirty" with local changes.

    Returns:
        e.g. "1a2b3c4" or "1a2b3c4+dirty"; "unknown" outside a git checkout.
    """
    candidates = [Path(__file__).resolve().parents[3], Path.cwd()]
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


def load_average() -> float:
    """The 1-minute load average of the machine, NaN where the OS does not report one."""
    if not hasattr(os, "getloadavg"):
        return math.nan
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def kdfast_backend(device: str = "cpu") -> str:
    """Which path `kdfast.functional` takes on `device`, from `kdfast.build_info()`.

    Args:
        device: "cpu" or a CUDA device.

    Returns:
        "compiled" when kdfast's native kernels serve `device`, else "reference" (pure-PyTorch path).
    """
    info = build_info()
    if not info.get("native"):
        return "reference"
    if device.startswith("cuda") and not info.get("cuda"):
        return "reference"
    return "compiled"


def kdfast_version() -> str:
    """kdfast's version string (`kdfast.__version__`)."""
    return _kdfast_version


def load_note(device: str) -> str:
    """", load average X (Y cores)" on the CPU: timings there are only as steady as the machine is idle."""
    load = load_average()
    if device.startswith("cuda") or math.isnan(load):
        return ""
    return f", load average {load:.1f} ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------- the KD-loss table


def format_number(value, digits: int) -> str:
    """`value` with `digits` decimals, "-" for None, NaN or infinity."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def format_table(results: List[Dict[str, object]]) -> str:
    """One aligned plain-text table: cases in run order, then pass, kdfast first within a group.

    Args:
        results: result dicts of the KD-loss table, metrics attached.

    Returns:
        The table, lines joined with newlines.
    """
    header = ("dtype", "N", "V", "divergence", "pass", "provider", "median ms", "GB/s", "x eager", "x compile",
              "/ floor", "peak MB", "status")
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
                      row["provider"], format_number(row["median_ms"], 3), format_number(row["gbps"], 1),
                      format_number(row["speedup_vs_eager"], 2), format_number(row["speedup_vs_compile"], 2),
                      format_number(row.get("times_floor"), 2), format_number(row["peak_extra_mb"], 1),
                      _clip(str(row["status"]), 72)))
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) if lines else len(header[i])
              for i in range(len(header))]
    numeric = {1, 2, 6, 7, 8, 9, 10, 11}

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


def _csv_number(value, digits: int) -> str:
    """Fixed-point with `digits` decimals, or `digits` significant digits for values below 1."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if abs(value) < 1:
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"


def csv_rows(results: List[Dict[str, object]], device: str) -> List[Dict[str, object]]:
    """The CSV records (columns CSV_COLUMNS) for the results of one KD-loss table run.

    Args:
        results: result dicts, metrics attached.
        device: the device the run used.

    Returns:
        One record per result, with the machine, commit and versions of this run.
    """
    timestamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    common = dict(timestamp=timestamp, machine=machine_name(device), cores=os.cpu_count(),
                  threads=torch.get_num_threads(), commit=git_commit(), torch_version=torch.__version__,
                  kdfast_version=kdfast_version(), kdfast_backend=kdfast_backend(device))
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


# ----------------------------------------------------------------------------- CSV files


def append_csv(records: List[Dict[str, object]], path: Path, columns: Sequence[str] = CSV_COLUMNS) -> Path:
    """Appends records to a CSV file, writing the header when the file is new or empty.

    If an existing file has other columns, the records go next to it under a timestamped name
    (`<stem>.<YYYYmmdd-HHMMSS><suffix>`) instead.

    Args:
        records: dicts keyed by the column names.
        path: the CSV file; missing folders are created.
        columns: the header (default: the KD-loss table's CSV_COLUMNS).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as existing:
            header = next(csv.reader(existing), None)
        if header != list(columns):
            path = path.with_name(f"{path.stem}.{datetime.datetime.now():%Y%m%d-%H%M%S}{path.suffix}")
    new_file = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as output:
        writer = csv.DictWriter(output, fieldnames=list(columns))
        if new_file:
            writer.writeheader()
        writer.writerows(records)
    return path


def write_csv(records: List[Dict[str, object]], path: Path, columns: Sequence[str]) -> Path:
    """Writes records to a new CSV file (replacing any file there), header first.

    Args:
        records: dicts keyed by the column names.
        path: the CSV file; missing folders are created.
        columns: the header.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as output:
        writer = csv.DictWriter(output, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(records)
    return path


def default_csv_path(device: str, directory: Union[str, os.PathLike]) -> Path:
    """`directory`/kd_loss_<device type>.csv: where a script that keeps its results appends the KD-loss rows."""
    return Path(directory) / f"kd_loss_{device.split(':')[0]}.csv"
