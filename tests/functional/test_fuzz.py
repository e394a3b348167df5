"""Randomised fuzz of every public loss entry point against the float64 oracle.

Each seeded case (tests/fuzz_cases.py) draws an entry point — `kdfast.functional` kd_loss,
sparse_kd_loss, compress_topk, multi_teacher_kd_loss (dense and SoftLabels teachers),
fused_linear_kd_loss, or the `kdfast.KDLoss`-style modules — with random shapes, dtypes,
memory layouts (vocabulary stride 2, row slices, transposed rows), values (ordinary, ±1e4,
±1e30, up to the dtype's finite range, with NaN, ±inf and fully masked rows), temperatures
(inside [1e-20, 1e20] and beyond), options, labels (ignored, out of range, int32) and the odd
invalid option. Each result must be an exception from the entry point and the oracle alike
(ValueError, TypeError or RuntimeError, with a message) or the oracle's loss and gradient
within float32 accuracy, NaN and ±inf exactly where the oracle has them (tests/fp32_rows.py).
The cases run on the selected CPU variant (and CUDA where visible); a subset runs again on
every other CPU variant the machine supports, in a subprocess (the variant is chosen once
per process, `KDFAST_CPU_VARIANT`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz_cases import check_case, draw_case
from kdfast.ops._native import native_module

CASES = 400
VARIANT_CASES = 80
TESTS_DIR = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("seed", range(CASES))
def test_fuzz_case(device, seed):
    check_case(draw_case(seed, device))


def _other_cpu_variants():
    info = native_module().build_info()
    return [name for name in info["cpu_variants"] if name != info["cpu_variant_selected"]]


@pytest.mark.parametrize("variant", _other_cpu_variants())
def test_fuzz_on_other_cpu_variants(variant):
    environment = dict(os.environ, KDFAST_CPU_VARIANT=variant,
                       PYTHONPATH=os.pathsep.join([str(TESTS_DIR)] + sys.path))
    script = (f"import kdfast.ops._native as n; assert n.native_module().build_info()['cpu_variant_selected'] == "
              f"{variant!r}; from fuzz_cases import check_seeds; check_seeds(range({VARIANT_CASES}))")
    completed = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
