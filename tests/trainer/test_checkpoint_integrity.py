"""Tests that a damaged checkpoint is never loaded: `atomic_save` seals, `read_checkpoint` verifies.

A seeded fuzz flips random bytes of a real Distiller checkpoint and truncates it at random
offsets: every case must raise `CheckpointError` naming the file and leave the Distiller
untouched. Empty and foreign files raise the same error; a sealed file still loads with
plain `torch.load`; an unsealed checkpoint (as older kdfast wrote) loads with a warning.
"""

from __future__ import annotations

import pickle
import random
import zipfile

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.trainer import CheckpointError, Distiller, atomic_save
from kdfast.trainer.checkpoint import verify_checkpoint_file

FEATURES, CLASSES = 5, 4


def make_distiller(seed: int) -> Distiller:
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, CLASSES))
    teacher = nn.Linear(FEATURES, CLASSES)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.01)
    return Distiller(student, teacher, optimizer=optimizer, progress=False)


def student_weights(distiller: Distiller):
    return [parameter.detach().clone() for parameter in distiller.student.parameters()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path, bytes, student weights) of a checkpoint after two optimizer steps."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(16, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES, (16,), generator=generator)
    distiller = make_distiller(0)
    distiller.fit(DataLoader(TensorDataset(inputs, labels), batch_size=8), epochs=1)
    path = tmp_path_factory.mktemp("checkpoint") / "good.pt"
    distiller.save_checkpoint(path)
    return path, path.read_bytes(), student_weights(distiller)


def assert_rejected(path, match: str = "") -> None:
    """Loading `path` raises CheckpointError naming it, and restores nothing."""
    fresh = make_distiller(1)
    before = student_weights(fresh)
    with pytest.raises(CheckpointError, match=match) as caught:
        fresh.load_checkpoint(path)
    assert str(path) in str(caught.value) and caught.value.path == str(path)
    assert all(torch.equal(a, b) for a, b in zip(before, student_weights(fresh)))
    assert fresh.step == 0


def test_a_sealed_checkpoint_loads_with_kdfast_and_with_torch_load(checkpoint):
    path, data, weights = checkpoint
    assert data[-78:].startswith(b"kdfast-sha256:")
    with open(path, "rb") as handle:
        assert verify_checkpoint_file(handle, str(path)) is True
    assert torch.load(path, weights_only=True)["step"] == 2
    restored = make_distiller(1)
    restored.load_checkpoint(path)
    assert restored.step == 2
    assert all(torch.equal(a, b) for a, b in zip(weights, student_weights(restored)))


@pytest.mark.parametrize("case", range(40))
def test_random_byte_flips_are_always_rejected(checkpoint, tmp_path, case):
    path, data, _ = checkpoint
    rng = random.Random(case)
    damaged = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 8])):
        position = rng.randrange(len(damaged))
        damaged[position] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
    target = tmp_path / "flipped.pt"
    target.write_bytes(bytes(damaged))
    assert_rejected(target, "fails its SHA-256 checksum|truncated or damaged|not a torch.save archive")


@pytest.mark.parametrize("case", range(25))
def test_random_truncations_are_always_rejected(checkpoint, tmp_path, case):
    path, data, _ = checkpoint
    cut = random.Random(1000 + case).randrange(1, len(data))
    if case == 0:
        cut = len(data) - 1  # the last byte of the checksum
    target = tmp_path / "truncated.pt"
    target.write_bytes(data[:cut])
    assert_rejected(target, "truncated or damaged|not a torch.save archive")


def test_an_empty_file_is_rejected(tmp_path):
    target = tmp_path / "empty.pt"
    target.write_bytes(b"")
    assert_rejected(target, "is empty")


@pytest.mark.parametrize("kind", ["text", "numpy", "zip", "other object", "random bytes"])
def test_foreign_files_are_rejected(tmp_path, kind):
    target = tmp_path / f"foreign-{kind.replace(' ', '-')}.pt"
    if kind == "text":
        target.write_text("step: 3\n")
    elif kind == "numpy":
        with open(target, "wb") as handle:
            np.save(handle, np.arange(10))
    elif kind == "zip":
        with zipfile.ZipFile(target, "w") as archive:
            archive.writestr("data.txt", "not a checkpoint")
    elif kind == "other object":
        atomic_save({"weights": torch.zeros(3)}, target)
    else:
        target.write_bytes(bytes(random.Random(5).randrange(256) for _ in range(4096)))
    if kind == "zip":  # a plain zip looks like an unsealed torch.save archive until torch reads it
        with pytest.warns(UserWarning, match="cannot be verified"):
            assert_rejected(target, "cannot be loaded")
    else:
        assert_rejected(target, "not a torch.save archive|not a kdfast Distiller checkpoint")


def test_a_checkpoint_without_a_seal_loads_with_a_warning(checkpoint, tmp_path):
    path, _, weights = checkpoint
    state = torch.load(path, weights_only=True)
    older = tmp_path / "older.pt"
    torch.save(state, older)  # what kdfast wrote before checkpoints were sealed
    restored = make_distiller(1)
    with pytest.warns(UserWarning, match="carries no checksum.*cannot be verified"):
        restored.load_checkpoint(older)
    assert all(torch.equal(a, b) for a, b in zip(weights, student_weights(restored)))
    older.write_bytes(older.read_bytes()[:-30])
    assert_rejected(older, "truncated or damaged")


def test_a_sealed_checkpoint_missing_entries_is_rejected(checkpoint, tmp_path):
    state = torch.load(checkpoint[0], weights_only=True)
    del state["optimizer"]
    atomic_save(state, tmp_path / "partial.pt")
    assert_rejected(tmp_path / "partial.pt", r"lacks the entries \['optimizer'\]")


def test_checkpoint_error_is_a_value_error_that_pickles_with_its_path():
    error = CheckpointError("checkpoint 'x.pt' is empty", "x.pt")
    clone = pickle.loads(pickle.dumps(error))
    assert isinstance(clone, ValueError) and clone.path == "x.pt" and str(clone) == str(error)
