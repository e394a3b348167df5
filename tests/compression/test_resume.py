"""Checkpoints of a `Distiller` run whose student is compressed (fake-quantised for QAT, or
pruned on a schedule) resume exactly: stopping mid-run, loading the checkpoint into a freshly
prepared student and finishing gives bit-for-bit the parameters, masks and losses of an
uninterrupted run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.compression import PruningSchedule, prepare_pruning, prepare_qat
from kdfast.losses import KDLoss
from kdfast.trainer import Distiller

EPOCHS = 2


def student(kind: str, seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 8))
    callbacks = []
    if kind == "qat":
        pytest.importorskip("torchao", reason="quantisation-aware training needs torchao (the quant extra)")
        prepare_qat(model, "a8w4")
    else:
        prepare_pruning(model, kind)
        callbacks = [PruningSchedule(model, 0.5, kind, start_step=2, end_step=6, frequency=2)]
    return model, callbacks


def distiller(kind: str, seed: int, path=None):
    model, callbacks = student(kind, seed)
    torch.manual_seed(99)
    teacher = nn.Sequential(nn.Linear(32, 8))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return Distiller(model, teacher, KDLoss(temperature=2.0, alpha=0.5), optimizer, scheduler, seed=0,
                     checkpoint_path=path, progress=False, callbacks=callbacks)


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(160, 32, generator=generator)
    return DataLoader(TensorDataset(inputs, inputs[:, :8].argmax(dim=1)), batch_size=32, shuffle=True)


@pytest.mark.parametrize("kind", ["qat", "unstructured", "2:4"])
def test_checkpoint_resume_equals_uninterrupted_run(kind, tmp_path):
    whole = distiller(kind, seed=0)
    whole.fit(data(), epochs=EPOCHS)

    path = tmp_path / "run.pt"
    first = distiller(kind, seed=0, path=path)
    first.fit(data(), epochs=EPOCHS, max_steps=7)  # stops mid-epoch 2, after the schedule's first masks
    assert first.step == 7
    resumed = distiller(kind, seed=5)  # another initialisation: everything must come from the file
    resumed.fit(data(), epochs=EPOCHS, resume_from=path)

    assert resumed.step == whole.step == EPOCHS * 5
    expected, got = whole.student.state_dict(), resumed.student.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert [entry["loss"] for entry in resumed.history["train"]] == [entry["loss"] for entry in whole.history["train"]]
