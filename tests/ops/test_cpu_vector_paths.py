"""Host check of the CPU kernels' hand-written vector paths, one build per instruction-set
variant this machine runs: the bfloat16 conversions of convert.h (the AVX-512 store and the
widening loads) against their scalar rules bit for bit, and memory_policy.h's streaming copy
against memcpy at every alignment (`cpu_convert_check.cpp`); exp_lanes.h's FlooredExp against
float64 (`cpu_floored_exp_check.cpp`). The variants' compiler flags are
read from CMakeLists.txt, so the check builds what the package builds. Skipped without a C++
compiler on PATH or off x86-64.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import kdfast

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).with_name("cpu_convert_check.cpp")
FLOORED_EXP_SOURCE = Path(__file__).with_name("cpu_floored_exp_check.cpp")
COMPILER = shutil.which("c++") or shutil.which("g++")

pytestmark = pytest.mark.skipif(COMPILER is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="needs a C++ compiler on x86-64")


def _variant_flags() -> dict[str, list[str]]:
    text = (ROOT / "CMakeLists.txt").read_text()
    pattern = r"set\(KDFAST_FLAGS_(\w+) ([^)]*)\)"
    return {name: flags.replace('"', "").split() for name, flags in re.findall(pattern, text)}


def _runnable_variants() -> list[str]:
    return list(kdfast.build_info()["cpu_variants"])


def _build_and_run(source: Path, variant: str, tmp_path: Path) -> str:
    """Builds `source` with the variant's flags, runs it and returns its last line of output."""
    flags = _variant_flags()
    assert variant in flags, f"CMakeLists.txt sets no KDFAST_FLAGS_{variant}"
    binary = tmp_path / f"{source.stem}_{variant}"
    command = [COMPILER, "-std=c++17", "-O2", f"-DKDFAST_CPU_VARIANT={variant}", *flags[variant],
               f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cpu'}", "-o", str(binary), str(source)]
    built = subprocess.run(command, capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr[-4000:]
    result = subprocess.run([str(binary)], capture_output=True, text=True, check=False, timeout=300)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-4000:]
    return summary


@pytest.mark.parametrize("variant", _runnable_variants())
def test_vector_paths_match_their_scalar_rules(variant, tmp_path):
    summary = _build_and_run(SOURCE, variant, tmp_path)
    assert summary.endswith(" 0 failures"), summary
    assert int(summary.split()[1]) > 1_000_000, summary


@pytest.mark.parametrize("variant", _runnable_variants())
def test_floored_exp_within_its_stated_error(variant, tmp_path):
    """FlooredExp (exp_lanes.h), the AVX-512 variant's exp of compress_topk's float split:
    relative error below 2e-7 over x / T in [-86, 0] for T from 1e-30 to 1e30, the floor's value
    below it (-inf included), exp(0) = 1 and NaN kept (cpu_floored_exp_check.cpp)."""
    summary = _build_and_run(FLOORED_EXP_SOURCE, variant, tmp_path)
    if summary == "not built in this variant":
        assert variant != "avx512", "the AVX-512 variant must build FlooredExp"
        pytest.skip(f"FlooredExp is not part of the {variant} variant")
    assert summary.endswith(" 0 failures"), summary
    assert int(summary.split()[1]) > 10_000_000, summary
