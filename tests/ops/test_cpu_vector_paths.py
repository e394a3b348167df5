"""Host check of the CPU kernels' hand-written vector paths, one build per instruction-set
variant this machine runs: the bfloat16 conversions of convert.h (the AVX-512 store and the
widening loads) against their scalar rules bit for bit, and memory_policy.h's streaming copy
against memcpy at every alignment (`cpu_convert_check.cpp`). The variants' compiler flags are
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
COMPILER = shutil.which("c++") or shutil.which("g++")

pytestmark = pytest.mark.skipif(COMPILER is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="needs a C++ compiler on x86-64")


def _variant_flags() -> dict[str, list[str]]:
    text = (ROOT / "CMakeLists.txt").read_text()
    pattern = r"set\(KDFAST_FLAGS_(\w+) ([^)]*)\)"
    return {name: flags.replace('"', "").split() for name, flags in re.findall(pattern, text)}


def _runnable_variants() -> list[str]:
    return list(kdfast.build_info()["cpu_variants"])


@pytest.mark.parametrize("variant", _runnable_variants())
def test_vector_paths_match_their_scalar_rules(variant, tmp_path):
    flags = _variant_flags()
    assert variant in flags, f"CMakeLists.txt sets no KDFAST_FLAGS_{variant}"
    binary = tmp_path / f"check_{variant}"
    command = [COMPILER, "-std=c++17", "-O2", f"-DKDFAST_CPU_VARIANT={variant}", *flags[variant],
               f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'cpu'}", "-o", str(binary), str(SOURCE)]
    built = subprocess.run(command, capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr[-4000:]
    result = subprocess.run([str(binary)], capture_output=True, text=True, check=False, timeout=300)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0 and summary.endswith(" 0 failures"), summary
    assert int(summary.split()[1]) > 1_000_000, summary
