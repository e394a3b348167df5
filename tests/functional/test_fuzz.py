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

import pytest

from cpu_variants import other_cpu_variants, run_on_cpu_variant
from fuzz_cases import check_case, draw_case

CASES = 400
VARIANT_CASES = 80


@pytest.mark.parametrize("seed", range(CASES))
def test_fuzz_case(device, seed):
    check_case(draw_case(seed, device))


@pytest.mark.parametrize("variant", other_cpu_variants())
def test_fuzz_on_other_cpu_variants(variant):
    run_on_cpu_variant(variant, f"from fuzz_cases import check_seeds; check_seeds(range({VARIANT_CASES}))")
