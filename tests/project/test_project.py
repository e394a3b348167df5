"""Project-wide rules checked on every test run: the import layers, lint, file sizes, one version.

- `lint-imports` (import-linter, configured in pyproject.toml) must keep the layers contract:
  imports in python/kdfast only go downward.
- `ruff check` (configured in pyproject.toml) must report nothing for the whole tree.
- No Python file of the package is longer than 500 lines.
- The version is written once (python/kdfast/_version.py) and is what `kdfast.__version__` says.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kdfast

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "python" / "kdfast"
MAX_LINES = 500


def _tool(name: str) -> str:
    """The console script `name` next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it is part of the [test] extra")
    return found


def test_imports_only_go_downward():
    result = subprocess.run([_tool("lint-imports"), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken" in result.stdout


def test_ruff_reports_nothing():
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_package_file_over_the_line_limit():
    too_long = {str(path.relative_to(ROOT)): count for path in PACKAGE.rglob("*.py")
                if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not too_long, f"files over {MAX_LINES} lines: {too_long}"


def test_one_version_source():
    text = (PACKAGE / "_version.py").read_text(encoding="utf-8")
    (written,) = re.findall(r'^__version__ = "([^"]+)"$', text, re.M)
    assert kdfast.__version__ == written
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject and not re.search(r"^version\s*=", pyproject, re.M)
