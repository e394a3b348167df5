"""Benchmark harness of kdfast: the KD-loss comparison table and the building blocks every benchmark shares.

`main(argv)` (the entry point of `kdfast bench`, `python -m kdfast.benchmark` and
benches/bench_kd_loss.py) times kdfast against eager PyTorch, torch.compile and Liger-Kernel.
The parts are public so that the scripts and the pytest-benchmark suite in benches/ reuse them
instead of repeating them:

- `cases`: `Case`, `DTYPES`, `PASSES`, `PROVIDERS`, `DIVERGENCES`, `make_inputs`, `minimum_bytes`.
- `baselines`: `eager_kd_loss`, `Provider`, `ProviderUnavailable`, `make_provider`, `make_step`.
- `timing`: `synchronize`, `time_step`, `time_once`, `median_ms`, `time_cpu_and_wall`,
  `time_round_robin`, `time_within_budget`.
- `memory`: `malloc_for_timing`, `measure_peak_extra_mb`.
- `results`: `machine_name`, `git_commit`, `load_average`, `kdfast_backend`, `CSV_COLUMNS`,
  `csv_rows`, `append_csv`, `write_csv`, `default_csv_path`, `format_table`.
- `cli`: `main`, `build_parser`, `run_case`.

Imports go one way: baselines and results import cases; cli imports all of them; cases, timing
and memory import no other part. The harness uses kdfast's public API (`kdfast.functional`,
`kdfast.build_info`, `kdfast.__version__`), never `kdfast._C`.
"""

from kdfast.benchmark.baselines import Provider, ProviderUnavailable, eager_kd_loss, make_provider, make_step
from kdfast.benchmark.cases import DIVERGENCES, DTYPES, PASSES, PROVIDERS, Case, make_inputs, minimum_bytes
from kdfast.benchmark.cli import build_parser, main, run_case
from kdfast.benchmark.memory import malloc_for_timing, measure_peak_extra_mb
from kdfast.benchmark.results import (
    CSV_COLUMNS,
    append_csv,
    csv_rows,
    default_csv_path,
    format_number,
    format_table,
    git_commit,
    kdfast_backend,
    kdfast_version,
    load_average,
    load_note,
    machine_name,
    write_csv,
)
from kdfast.benchmark.timing import (
    median_ms,
    synchronize,
    time_cpu_and_wall,
    time_once,
    time_round_robin,
    time_step,
    time_within_budget,
)

__all__ = [
    "CSV_COLUMNS",
    "Case",
    "DIVERGENCES",
    "DTYPES",
    "PASSES",
    "PROVIDERS",
    "Provider",
    "ProviderUnavailable",
    "append_csv",
    "build_parser",
    "csv_rows",
    "default_csv_path",
    "eager_kd_loss",
    "format_number",
    "format_table",
    "git_commit",
    "kdfast_backend",
    "kdfast_version",
    "load_average",
    "load_note",
    "machine_name",
    "main",
    "make_inputs",
    "make_provider",
    "make_step",
    "malloc_for_timing",
    "measure_peak_extra_mb",
    "median_ms",
    "minimum_bytes",
    "run_case",
    "synchronize",
    "time_cpu_and_wall",
    "time_once",
    "time_round_robin",
    "time_step",
    "time_within_budget",
    "write_csv",
]
