"""Magnitude pruning on a schedule (`kdfast.compression`): the masks have the promised sparsity
(50% per layer; exactly 2 zeros in every 4 consecutive input weights) once the schedule is done
and keep it through further training steps, the effective weights are zero where the masks are,
the schedule ramps as documented, and unsupported layers or settings are refused by name.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.compression import (
    PruningSchedule,
    finish_pruning,
    mask_2_4,
    mask_unstructured,
    nonzero_parameters,
    prepare_pruning,
    pruned_layers,
    sparsity,
)
from kdfast.losses import KDLoss
from kdfast.trainer import Distiller


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))


def loader(seed: int = 0, rows: int = 192) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, 32, generator=generator)
    labels = inputs[:, :8].argmax(dim=1)
    return DataLoader(TensorDataset(inputs, labels), batch_size=32, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def check_2_4(weight: torch.Tensor) -> None:
    zeros = (weight.reshape(-1, 4) == 0).sum(dim=1)
    assert torch.equal(zeros, torch.full_like(zeros, 2))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_schedule_reaches_the_promised_sparsity_and_training_keeps_it(pattern):
    student, teacher, data = mlp(0), mlp(1), loader()
    assert prepare_pruning(student, pattern) == ["0", "2"]
    schedule = PruningSchedule(student, 0.5, pattern, start_step=2, end_step=8, frequency=3)
    distiller = Distiller(student, teacher, KDLoss(temperature=2.0, alpha=0.5), callbacks=[schedule], progress=False)
    distiller.fit(data, epochs=2)  # 12 steps: the schedule ends at step 8, then 4 recovery steps
    before = {name: module.weight_orig.detach().clone() for name, module in pruned_layers(student)}
    assert sparsity(student) == {"0": 0.5, "2": 0.5}
    distiller.fit(data, epochs=4)  # more steps after the schedule: the masks hold
    for name, module in pruned_layers(student):
        assert not torch.equal(before[name], module.weight_orig)  # it did train
        effective = module.weight_orig * module.weight_mask
        assert float((effective == 0).float().mean()) == 0.5
        if pattern == "2:4":
            check_2_4(effective)
    finish_pruning(student)
    assert not pruned_layers(student)
    for index in (0, 2):
        assert float((student[index].weight == 0).float().mean()) == 0.5
        if pattern == "2:4":
            check_2_4(student[index].weight)
    assert nonzero_parameters(student) == (32 * 48 + 48 * 8) // 2 + 48 + 8


def test_unstructured_ramp_is_cubic_monotone_and_masks_only_grow():
    student = mlp()
    prepare_pruning(student)
    schedule = PruningSchedule(student, 0.6, start_step=3, end_step=9, frequency=2)
    targets = [schedule.target(step) for step in range(12)]
    assert targets[:3] == [0.0, 0.0, 0.0] and targets[9:] == [0.6] * 3
    assert all(a <= b for a, b in zip(targets, targets[1:]))
    assert targets[6] == pytest.approx(0.6 * (1 - 0.5 ** 3))
    assert [step for step in range(12) if schedule.due(step)] == [3, 5, 7, 9]
    pruned_before = None
    for step in range(1, 12):
        schedule.update(step)
        zero = student[0].weight_mask == 0
        if pruned_before is not None:
            assert bool((zero | ~pruned_before).all())  # pruned entries stay pruned
        pruned_before = zero
    assert float(zero.float().mean()) == pytest.approx(0.6, abs=1 / zero.numel())


@pytest.mark.parametrize("shape", [(6, 8), (3, 16), (5, 4)])
def test_mask_2_4_keeps_the_two_largest_of_every_four(shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    mask = mask_2_4(weight)
    groups, kept = weight.abs().reshape(-1, 4), mask.reshape(-1, 4).bool()
    assert torch.equal(kept.sum(dim=1), torch.full((groups.shape[0],), 2))
    assert bool((groups[kept].reshape(-1, 2).min(dim=1).values >= groups[~kept].reshape(-1, 2).max(dim=1).values).all())


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.9])
def test_mask_unstructured_prunes_the_smallest_magnitudes(fraction):
    weight = torch.randn(10, 12, generator=torch.Generator().manual_seed(1))
    mask = mask_unstructured(weight, fraction)
    pruned = int(round(fraction * weight.numel()))
    assert int((mask == 0).sum()) == pruned
    if 0 < pruned < weight.numel():
        assert weight.abs()[mask == 0].max() <= weight.abs()[mask == 1].min()


@pytest.mark.parametrize("build, pattern, message", [
    (lambda: nn.Sequential(nn.Linear(30, 8)), "2:4", "in_features=30"),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(16, 8)), "2:4", "2:4 applies to Linear"),
    (lambda: nn.Sequential(nn.ReLU()), "unstructured", "no nn.Linear or convolution"),
    (lambda: mlp(), "1:4", "pattern must be one of"),
])
def test_unsupported_layers_are_refused_by_name(build, pattern, message):
    with pytest.raises(ValueError, match=message):
        prepare_pruning(build(), pattern)


def test_convolutions_prune_unstructured():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(16, 8))
    prepare_pruning(model, "unstructured")
    PruningSchedule(model, 0.5, start_step=1).update(1)
    assert sparsity(model) == {"0": 0.5, "2": 0.5}


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 1.0}, "sparsity must be in"),
    ({"pattern": "2:4", "sparsity": 0.6}, "always 0.5"),
    ({"start_step": 0}, "1 <= start_step"),
    ({"start_step": 5, "end_step": 4}, "1 <= start_step"),
    ({"frequency": 0}, "frequency >= 1"),
])
def test_bad_schedules_are_refused(kwargs, message):
    model = mlp()
    prepare_pruning(model)
    with pytest.raises(ValueError, match=message):
        PruningSchedule(model, **kwargs)


def test_schedule_and_double_preparation_need_the_right_state():
    with pytest.raises(ValueError, match="call prepare_pruning"):
        PruningSchedule(mlp())
    model = mlp()
    prepare_pruning(model)
    with pytest.raises(ValueError, match="already has a pruning mask"):
        prepare_pruning(model)
