"""pytest configuration for the benchmark suites in benches/ (not part of the unit tests).

Adds `--bench-device` (cpu or cuda, default cpu) and `--bench-rounds` (timed rounds per
benchmark, default 5) and registers the `large` marker carried by the V=128256 cases, so
that `-k "not large"` or `-m large` selects by size.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("kdfast benchmarks")
    group.addoption("--bench-device", default="cpu", help="device for the benchmark suites: cpu or cuda")
    group.addoption("--bench-rounds", type=int, default=5, help="timed rounds per benchmark (default 5)")


def pytest_configure(config):
    config.addinivalue_line("markers", "large: a large-vocabulary case (V=128256), slow on CPU")


@pytest.fixture(scope="session")
def bench_device(request) -> str:
    import torch

    device = request.config.getoption("--bench-device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda requested but CUDA is not available")
    return device


@pytest.fixture(scope="session")
def bench_rounds(request) -> int:
    return max(1, request.config.getoption("--bench-rounds"))
