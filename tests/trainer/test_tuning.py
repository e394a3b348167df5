"""Tests for `kdfast.tuning`: fold construction, candidate generation, ranking, the printed
and CSV tables, input errors, and the ready-made distillation objective on a small
synthetic classification task."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from kdfast import tuning


def test_kfold_partitions_every_sample_once():
    splits = tuning.kfold_indices(23, 4, seed=3)
    assert len(splits) == 4
    seen = torch.cat([val for _, val in splits]).sort().values
    assert torch.equal(seen, torch.arange(23))
    for train, val in splits:
        assert set(train.tolist()).isdisjoint(val.tolist())
        assert len(train) + len(val) == 23
        assert len(val) in (5, 6)
    again = tuning.kfold_indices(23, 4, seed=3)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(splits, again))
    other = tuning.kfold_indices(23, 4, seed=4)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(splits, other))


def test_kfold_stratified_balances_classes():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    splits = tuning.kfold_indices(20, 3, labels=labels, seed=0)
    for _, val in splits:
        counts = torch.bincount(labels[val], minlength=3)
        assert counts[0] in (3, 4) and counts[1] in (2, 3) and counts[2] == 1
    sizes = [len(val) for _, val in splits]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("num_samples, folds, match", [(10, 1, "folds"), (3, 4, "num_samples"), (10, 2.0, "folds")])
def test_kfold_rejects_bad_settings(num_samples, folds, match):
    with pytest.raises(ValueError, match=match):
        tuning.kfold_indices(num_samples, folds)


def test_kfold_rejects_wrong_label_length():
    with pytest.raises(ValueError, match="labels has 4 entries"):
        tuning.kfold_indices(5, 2, labels=[0, 1, 0, 1])


def test_grid_and_random_candidates():
    grid = tuning.grid_candidates([0.1, 0.9], [1.0, 2.0, 4.0])
    assert (len(grid) == 6 and grid[0] == {"alpha": 0.1, "temperature": 1.0}
            and grid[-1] == {"alpha": 0.9, "temperature": 4.0})
    draws = tuning.random_candidates(50, alpha_range=(0.2, 0.6), temperature_range=(2.0, 5.0), seed=1)
    assert len(draws) == 50
    assert all(0.2 <= d["alpha"] <= 0.6 and 2.0 <= d["temperature"] <= 5.0 for d in draws)
    assert draws == tuning.random_candidates(50, alpha_range=(0.2, 0.6), temperature_range=(2.0, 5.0), seed=1)
    assert len({d["alpha"] for d in draws}) > 40


@pytest.mark.parametrize("call, match", [
    (lambda: tuning.grid_candidates([1.5], [1.0]), "alpha"),
    (lambda: tuning.grid_candidates([0.5], [0.0]), "temperature"),
    (lambda: tuning.grid_candidates([], [1.0]), "non-empty"),
    (lambda: tuning.random_candidates(0), "trials"),
    (lambda: tuning.random_candidates(3, temperature_range=(4.0, 2.0)), "low <= high"),
])
def test_candidate_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _peaked_objective(calls):
    """Score peaks at alpha=0.5, T=4 and varies slightly by fold."""

    def objective(params, train_index, val_index, fold):
        calls.append((params["alpha"], params["temperature"], fold, len(train_index), len(val_index)))
        return -abs(params["alpha"] - 0.5) - abs(math.log(params["temperature"] / 4.0)) + 0.01 * fold

    return objective


def test_grid_search_ranks_and_prints_table(tmp_path, capsys):
    calls = []
    result = tuning.search_kd_hyperparameters(
        _peaked_objective(calls), 30, alphas=(0.1, 0.5, 0.9), temperatures=(1.0, 4.0), folds=3,
        metric="accuracy", csv_path=tmp_path / "search.csv")
    assert len(calls) == 6 * 3
    assert all(train + val == 30 and val == 10 for *_, train, val in calls)
    assert result.best.params == {"alpha": 0.5, "temperature": 4.0}
    means = [trial.mean for trial in result.trials]
    assert means == sorted(means, reverse=True)
    assert result.best.fold_scores == pytest.approx([0.0, 0.01, 0.02])
    assert result.best.std == pytest.approx(0.01)
    printed = capsys.readouterr().out
    table = result.table()
    assert table in printed
    lines = table.splitlines()
    assert lines[0].startswith("| rank | alpha | temperature | accuracy mean ± std | fold 0")
    assert len(lines) == 2 + 6 and lines[2].startswith("| 1 | 0.5 | 4 |")
    rows = list(csv.DictReader(open(tmp_path / "search.csv", encoding="utf-8")))
    assert len(rows) == 6 and float(rows[0]["alpha"]) == 0.5 and float(rows[0]["mean"]) == pytest.approx(0.01)


def test_minimize_and_explicit_candidates(capsys):
    result = tuning.search_kd_hyperparameters(
        lambda params, *_: params["alpha"] + params["extra"], 10, folds=2, maximize=False, verbose=False,
        candidates=[{"alpha": 0.7, "temperature": 2, "extra": 0.0}, {"alpha": 0.2, "temperature": 3, "extra": 1.0},
                    {"alpha": 0.3, "temperature": 1, "extra": 0.0}])
    assert [trial.params["alpha"] for trial in result.trials] == [0.3, 0.7, 0.2]
    assert capsys.readouterr().out == ""


def test_random_search_uses_trials():
    calls = []
    result = tuning.search_kd_hyperparameters(_peaked_objective(calls), 12, method="random", trials=4, folds=2,
                                              verbose=False, seed=5)
    assert len(result.trials) == 4 and len(calls) == 8
    assert sorted(t.params["alpha"] for t in result.trials) == sorted(
        c["alpha"] for c in tuning.random_candidates(4, seed=5))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="bayes"), "method"),
    (dict(candidates=[]), "empty"),
    (dict(candidates=[{"alpha": 0.5}]), "lacks"),
    (dict(candidates=[{"alpha": -0.1, "temperature": 2.0}]), "alpha"),
])
def test_search_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tuning.search_kd_hyperparameters(lambda *_: 0.0, 10, folds=2, verbose=False, **kwargs)


def test_search_rejects_non_finite_scores():
    with pytest.raises(ValueError, match="nan"):
        tuning.search_kd_hyperparameters(lambda *_: float("nan"), 10, folds=2, verbose=False,
                                         candidates=[{"alpha": 0.5, "temperature": 2.0}])


def _blobs(seed=0, n=120, classes=3, dim=6):
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(classes, dim, generator=generator)
    labels = torch.arange(n) % classes
    inputs = centres[labels] + torch.randn(n, dim, generator=generator)
    return inputs, labels


def test_distillation_objective_learns_and_is_deterministic():
    torch.set_num_threads(1)
    inputs, labels = _blobs()
    teacher_logits = 4.0 * nn.functional.one_hot(labels, 3).float()
    objective = tuning.distillation_objective(lambda: nn.Linear(6, 3), inputs, labels,
                                              teacher_logits=teacher_logits, epochs=5, batch_size=32, lr=5e-2)
    splits = tuning.kfold_indices(len(labels), 3, labels=labels)
    train, val = splits[0]
    first = objective({"alpha": 0.5, "temperature": 2.0}, train, val, 0)
    assert first > 0.8  # well-separated blobs: far above the 1/3 of chance
    assert objective({"alpha": 0.5, "temperature": 2.0}, train, val, 0) == first

    result = tuning.search_kd_hyperparameters(objective, len(labels), labels=labels, folds=3, verbose=False,
                                              candidates=[{"alpha": 0.5, "temperature": 2.0}])
    assert all(0.0 <= s <= 1.0 for s in result.best.fold_scores)


def test_distillation_objective_with_live_teacher_and_errors():
    inputs, labels = _blobs(n=30)
    teacher = nn.Linear(6, 3)
    objective = tuning.distillation_objective(lambda: nn.Linear(6, 3), inputs, labels, teacher=teacher, epochs=1)
    score = objective({"alpha": 0.0, "temperature": 1.0}, torch.arange(20), torch.arange(20, 30), 0)
    assert 0.0 <= score <= 1.0
    with pytest.raises(ValueError, match="exactly one"):
        tuning.distillation_objective(lambda: nn.Linear(6, 3), inputs, labels)
    with pytest.raises(ValueError, match="labels must be int64"):
        tuning.distillation_objective(lambda: nn.Linear(6, 3), inputs, labels.float(), teacher=teacher)
    with pytest.raises(ValueError, match="teacher_logits must be"):
        tuning.distillation_objective(lambda: nn.Linear(6, 3), inputs, labels, teacher_logits=torch.zeros(5, 3))
