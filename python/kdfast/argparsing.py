"""Command-line conventions shared by the `kdfast` subcommands: user errors are one line and exit 2.

`CommandParser` is an `argparse.ArgumentParser` whose own errors (unknown option, bad
choice, missing argument) print `PROG: error: MESSAGE (see PROG --help)` on one line to
stderr and exit with status 2, without the usage block; subparsers made from it inherit
the behaviour. `UsageError` is what a command raises for a user error found after parsing
(a missing file, an option out of range, a teacher that returns the wrong shape);
`report_error(prog, message)` prints it as `PROG: error: MESSAGE` with the message folded
onto one line and returns `EXIT_USAGE` (2). Tracebacks are left to genuine bugs.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["EXIT_OK", "EXIT_USAGE", "CommandParser", "UsageError", "one_line", "report_error"]

EXIT_OK = 0
EXIT_USAGE = 2


class UsageError(Exception):
    """A user error (bad option, unreadable input): reported as one line, exit status 2."""


def one_line(message: object) -> str:
    """`message` as text with every run of whitespace, newlines included, folded into one space."""
    return " ".join(str(message).split())


def report_error(prog: str, message: object) -> int:
    """Prints `PROG: error: MESSAGE` (one line) to stderr and returns `EXIT_USAGE`."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


class CommandParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose parse errors are one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")
