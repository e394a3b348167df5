"""Checks that run again on the CPU instruction-set variants other than the selected one.

The variant is chosen once per process (`KDFAST_CPU_VARIANT`), so such a check runs as a
script in a subprocess with that variable set. The script can import the test modules
(tests/ and tests/functional/ are on its path); the helper first asserts that the variant
was selected, then fails with the script's stderr when the script fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kdfast

TESTS_DIR = Path(__file__).resolve().parent


def other_cpu_variants() -> list[str]:
    """The compiled CPU variants this machine runs, the selected one left out."""
    info = kdfast.build_info()
    return [name for name in info["cpu_variants"] if name != info["cpu_variant_selected"]]


def run_on_cpu_variant(variant: str, script: str, timeout: float = 600) -> None:
    """Runs the Python `script` in a subprocess on CPU variant `variant`; asserts it succeeds."""
    prelude = f"import kdfast\nassert kdfast.build_info()['cpu_variant_selected'] == {variant!r}\n"
    environment = dict(os.environ, KDFAST_CPU_VARIANT=variant,
                       PYTHONPATH=os.pathsep.join([str(TESTS_DIR / "functional"), str(TESTS_DIR)] + sys.path))
    completed = subprocess.run([sys.executable, "-c", prelude + script], env=environment, capture_output=True,
                               text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-4000:]
