"""The wheel configuration agrees with itself: Python versions, platforms, CUDA and the workflows.

- `[tool.cibuildwheel]` builds exactly the CPython versions from `requires-python`'s lower bound
  up to 3.13, for manylinux_2_28 x86_64 and aarch64 and no musllinux, with the CUDA kernels
  required (`KDFAST_CUDA=ON`) and the compiler the before-all step installs.
- Its test step runs the suite from copied sources (`test-sources`) that include everything
  the tests read from the checkout (`tests`, `examples`, `docs`, `mkdocs.yml`, ...).
- `.github/workflows/tests.yml` runs `.ci/run` (the README's test command) and
  `.github/workflows/wheels.yml` runs cibuildwheel for both architectures and uploads the wheels.
"""

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli", reason="tomli is needed to read pyproject.toml before Python 3.11")

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
NEWEST_PYTHON = (3, 13)


def _config():
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)


def _workflow(name):
    yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of mkdocs) is not installed")
    path = WORKFLOWS / name
    if not path.exists():
        pytest.skip(f"{path} is not part of this copy of the sources")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_wheels_cover_the_supported_pythons():
    config = _config()
    (lowest,) = re.findall(r"^>=\s*3\.(\d+)$", config["project"]["requires-python"])
    wanted = {f"cp3{minor}-*" for minor in range(int(lowest), NEWEST_PYTHON[1] + 1)}
    cibw = config["tool"]["cibuildwheel"]
    assert set(cibw["build"]) == wanted
    assert "*-musllinux_*" in cibw["skip"]
    assert cibw["manylinux-x86_64-image"] == cibw["manylinux-aarch64-image"] == "manylinux_2_28"
    assert set(cibw["linux"]["archs"]) == {"x86_64", "aarch64"}


def test_wheels_require_the_cuda_kernels_from_the_installed_compiler():
    linux = _config()["tool"]["cibuildwheel"]["linux"]
    environment = linux["environment"]
    assert environment["KDFAST_CUDA"] == "ON"
    (version,) = re.findall(r"/usr/local/cuda-(\d+\.\d+)/bin/nvcc$", environment["CUDACXX"])
    installs = " ".join(linux["before-all"])
    assert f"cuda-nvcc-{version.replace('.', '-')}" in installs
    assert f"cuda-cudart-devel-{version.replace('.', '-')}" in installs
    # sm_100 needs CUDA 12.8 or newer
    assert tuple(int(part) for part in version.split(".")) >= (12, 8)
    assert "auditwheel repair" in linux["repair-wheel-command"]


def test_wheel_tests_copy_what_the_suite_reads():
    cibw = _config()["tool"]["cibuildwheel"]
    sources = set(cibw["test-sources"])
    assert {"tests", "examples", "docs", "python", "mkdocs.yml", "pyproject.toml", "README.md"} <= sources
    for source in sources:
        assert (ROOT / source).exists(), source
    assert "pytest" in cibw["test-command"] and "tests" in cibw["test-command"].split()


def test_tests_workflow_runs_the_readme_command():
    jobs = _workflow("tests.yml")["jobs"]
    commands = [step.get("run", "") for job in jobs.values() for step in job["steps"]]
    assert any(command.strip() == "bash .ci/run" for command in commands)


def test_wheels_workflow_builds_both_architectures_and_uploads_them():
    jobs = _workflow("wheels.yml")["jobs"]
    matrix = jobs["wheel"]["strategy"]["matrix"]
    assert set(matrix["arch"]) == {"x86_64", "aarch64"}
    assert set(matrix["python"]) == {pattern.split("-")[0] for pattern in _config()["tool"]["cibuildwheel"]["build"]}
    uses = [step.get("uses", "") for step in jobs["wheel"]["steps"]]
    assert any(use.startswith("pypa/cibuildwheel@") for use in uses)
    assert any(use.startswith("actions/upload-artifact@") for use in uses)
