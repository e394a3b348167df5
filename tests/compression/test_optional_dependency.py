"""torchao is optional: importing `kdfast.compression` does not import it, pruning works without
it, and the quantisation functions raise ImportError with the `pip` line that installs it when
it is missing (simulated by hiding it from the import system). Runs with or without torchao.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from kdfast import compression


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.fixture
def without_torchao(monkeypatch):
    for name in [name for name in sys.modules if name == "torchao" or name.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an absent package looks like to import


@pytest.mark.parametrize("call", [
    lambda: compression.prepare_qat(mlp(), "a8w4"),
    lambda: compression.quantise_ptq(mlp(), "w4"),
    lambda: compression.load_torchao(),
    lambda: compression.distil_into_quantised(mlp(), [torch.randn(4, 64)], max_steps=1),
])
def test_missing_torchao_gives_the_install_line(without_torchao, call):
    with pytest.raises(ImportError, match=r"needs torchao: pip install .*torchao"):
        call()


def test_pruning_needs_no_torchao(without_torchao):
    model = mlp()
    compression.prepare_pruning(model, "2:4")
    compression.PruningSchedule(model, pattern="2:4").update(1)
    assert compression.sparsity(model) == {"0": 0.5, "2": 0.5}


def test_importing_kdfast_compression_does_not_import_torchao():
    code = "import sys, kdfast.compression; print('torchao' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
