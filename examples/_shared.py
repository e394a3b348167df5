"""Output and dependency helpers shared by the example scripts (not an example itself).

- `SMOKE_NOTE`: the line a `--smoke` run prints at the top of its output and beside every
  table, so that nobody mistakes its numbers for results.
- `markdown_table(header, rows, align)`: a Markdown table whose columns are padded to a
  common width, readable in a terminal and valid Markdown when pasted; `significant(x)`
  writes a measurement with three significant digits.
- `require(module, extra, packages)`: import an optional package or exit with the `pip`
  line that installs it the way kdfast itself was installed
  (`kdfast.contract.install.install_hint`).
- `require_at_least_one(args, names)`: exit with a message naming the first integer option
  below 1; `write_results(args, **fields)`: `{"arguments": vars(args), **fields}` as
  `args.out/results.json`.

The scripts import this file by putting their own folder on `sys.path`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from typing import Any, Sequence

from kdfast.contract.install import install_hint

SMOKE_NOTE = "SMOKE RUN (--smoke): a seconds-long check that the script works; its numbers are not meaningful."


def significant(value: float, digits: int = 3) -> str:
    """`value` rounded to `digits` significant digits, never in exponent notation (12,345; 20.8; 0.816)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A Markdown table with padded columns.

    Args:
        header: the column titles.
        rows: one sequence of cells per row (each `str()`-ed); as many cells as titles.
        align: one character per column, "l" or "r" (default: first column left, the rest right).

    Returns:
        The table as lines joined by newlines, without a trailing newline.
    """
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError("every row and `align` need one entry per column")
    cells = [[str(cell) for cell in row] for row in [list(header), *rows]]
    widths = [max(3, *(len(row[column]) for row in cells)) for column in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = [cell.ljust(width) if side == "l" else cell.rjust(width)
                  for cell, width, side in zip(row, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (width + 1) + ":" if side == "r" else "-" * (width + 2))
                          for width, side in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def require(module: str, extra: str, packages: Sequence[str], purpose: str):
    """Import and return `module`, or exit with a message naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"{purpose} needs {', '.join(packages)}: {install_hint(extra, packages)}") from None


def require_at_least_one(args: Any, names: Sequence[str]) -> None:
    """Exit with "--option must be >= 1, got N" for the first of `names` (argparse dests) below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def write_results(args: Any, **fields: Any) -> None:
    """Writes {"arguments": vars(args), **fields} to `args.out`/results.json (indented JSON)."""
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"arguments": vars(args), **fields}, handle, indent=1)
