"""Prints the side-by-side KD-loss comparison table and appends it to benches/results/.

Measures `kdfast.functional.kd_loss` against the same loss written in eager PyTorch, its
`torch.compile` version and (with `--device cuda`, when installed) Liger-Kernel, forward and
forward+backward, reporting median ms, effective GB/s against the minimum bytes moved, the
speed-ups against eager and compile, and peak memory above the inputs. All logic and options
live in `kdfast.benchmark` (the same as `kdfast bench`); `--help` lists them. Unlike `kdfast
bench`, which writes a CSV file only with `--out`, this script appends to
benches/results/kd_loss_<device>.csv unless `--out` or `--no-csv` says otherwise. Example:
`python benches/bench_kd_loss.py --device cuda --dtypes bfloat16`.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from kdfast.benchmark import main
except ImportError:  # run from a checkout without installing: use python/ next to benches/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    from kdfast.benchmark import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    sys.exit(main(prog="bench_kd_loss.py", csv_dir=RESULTS))
