"""Hyper-parameter search for the KD weight α and temperature T with k-fold cross-validation.

`search_kd_hyperparameters` scores every candidate `{"alpha": α, "temperature": T}` (a grid,
random draws, or a list the caller gives) on the same k folds of a training set and returns a
`SearchResult` whose table (best first: mean ± sample std of the validation score over the
folds, then each fold's score) is printed and can be written as CSV. The caller supplies the
objective `objective(params, train_index, val_index, fold) -> float` (higher is better unless
`maximize=False`); `distillation_objective` builds one for classification that trains a fresh
student with `kdfast.Distiller` and `kdfast.KDLoss` on the training part of each fold and
returns its accuracy on the held-out part. Every candidate sees identical folds, so the
comparison between candidates is paired. The teacher is fixed during the search: train it on
data that excludes your final test set, and keep the test set out of the search.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.losses import KDLoss
from kdfast.trainer import Distiller

__all__ = [
    "SearchResult",
    "TrialResult",
    "distillation_objective",
    "grid_candidates",
    "kfold_indices",
    "random_candidates",
    "search_kd_hyperparameters",
]

Objective = Callable[[Dict[str, float], torch.Tensor, torch.Tensor, int], float]


# --------------------------------------------------------------------------------------
# Folds and candidates
# --------------------------------------------------------------------------------------


def kfold_indices(
    num_samples: int,
    folds: int = 5,
    *,
    labels: Optional[Union[torch.Tensor, Sequence[int], np.ndarray]] = None,
    seed: int = 0,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Split `range(num_samples)` into `folds` shuffled folds.

    Args:
        num_samples: number of samples N (>= folds).
        folds: k >= 2 (default 5).
        labels: optional class labels `[N]` (ints); when given the folds are stratified: each
            class's samples are shuffled and dealt round-robin across the folds, so every fold
            holds ⌊n_c/k⌋ or ⌈n_c/k⌉ samples of class c.
        seed: seed of the shuffle (default 0); the same seed gives the same folds.

    Returns:
        k pairs `(train_index, val_index)` of int64 tensors. The validation parts are disjoint,
        cover every sample once, and each train part is the complement of its validation part.

    Raises:
        ValueError: folds < 2, folds > num_samples, or labels of the wrong length.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < folds:
        raise ValueError(f"num_samples must be an int >= folds ({folds}), got {num_samples!r}")
    generator = np.random.default_rng(seed)
    assignment = np.empty(num_samples, dtype=np.int64)
    if labels is None:
        order = generator.permutation(num_samples)
        assignment[order] = np.arange(num_samples) % folds
    else:
        label_array = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if label_array.shape[0] != num_samples:
            raise ValueError(f"labels has {label_array.shape[0]} entries for num_samples={num_samples}")
        offset = 0
        for value in np.unique(label_array):
            members = generator.permutation(np.flatnonzero(label_array == value))
            # continue the round-robin where the previous class stopped, so fold sizes stay balanced
            assignment[members] = (np.arange(len(members)) + offset) % folds
            offset = (offset + len(members)) % folds
    splits = []
    for fold in range(folds):
        val_index = np.flatnonzero(assignment == fold)
        train_index = np.flatnonzero(assignment != fold)
        splits.append((torch.from_numpy(train_index), torch.from_numpy(val_index)))
    return splits


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def grid_candidates(alphas: Sequence[float], temperatures: Sequence[float]) -> List[Dict[str, float]]:
    """Every pair of `alphas` × `temperatures` as `{"alpha": α, "temperature": T}` (α outer loop).

    Raises:
        ValueError: an empty list, α outside [0, 1] or T ≤ 0.
    """
    if len(alphas) == 0 or len(temperatures) == 0:
        raise ValueError(f"alphas and temperatures must be non-empty, got {list(alphas)} and {list(temperatures)}")
    return [{"alpha": _check_alpha(a), "temperature": _check_temperature(t)} for a in alphas for t in temperatures]


def random_candidates(
    trials: int,
    *,
    alpha_range: Tuple[float, float] = (0.0, 1.0),
    temperature_range: Tuple[float, float] = (1.0, 8.0),
    seed: int = 0,
) -> List[Dict[str, float]]:
    """`trials` random candidates: α uniform in `alpha_range` (default (0, 1)), T log-uniform in
    `temperature_range` (default (1, 8)), drawn from NumPy's generator seeded with `seed`
    (default 0). Values are rounded to 4 significant digits so tables stay readable.

    Raises:
        ValueError: trials < 1, a range with low > high, α outside [0, 1] or T ≤ 0.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an int >= 1, got {trials!r}")
    alpha_low, alpha_high = (_check_alpha(v) for v in alpha_range)
    temperature_low, temperature_high = (_check_temperature(v) for v in temperature_range)
    if alpha_low > alpha_high or temperature_low > temperature_high:
        raise ValueError(f"ranges must be (low, high) with low <= high, got alpha_range={alpha_range}, "
                         f"temperature_range={temperature_range}")
    generator = np.random.default_rng(seed)
    alphas = generator.uniform(alpha_low, alpha_high, trials)
    temperatures = np.exp(generator.uniform(math.log(temperature_low), math.log(temperature_high), trials))
    return [{"alpha": float(f"{a:.4g}"), "temperature": float(f"{t:.4g}")} for a, t in zip(alphas, temperatures)]


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class TrialResult:
    """One candidate's scores: `params` (α, T and any other keys), one score per fold."""

    params: Dict[str, float]
    fold_scores: List[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.fold_scores)

    @property
    def std(self) -> float:
        """Sample standard deviation over the folds (0 for one fold)."""
        return statistics.stdev(self.fold_scores) if len(self.fold_scores) > 1 else 0.0


@dataclass
class SearchResult:
    """All trials, ranked best first by mean validation score (ties keep candidate order)."""

    trials: List[TrialResult]
    maximize: bool = True
    metric: str = "score"
    folds: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> TrialResult:
        return self.trials[0]

    def table(self, digits: int = 4) -> str:
        """Markdown table: rank, the parameters, mean ± std over folds, then each fold's score."""
        keys = list(self.trials[0].params)
        folds = len(self.trials[0].fold_scores)
        header = ["rank", *keys, f"{self.metric} mean ± std", *[f"fold {i}" for i in range(folds)]]
        lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        for rank, trial in enumerate(self.trials, start=1):
            cells = [str(rank), *[f"{trial.params[key]:g}" for key in keys],
                     f"{trial.mean:.{digits}f} ± {trial.std:.{digits}f}",
                     *[f"{score:.{digits}f}" for score in trial.fold_scores]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_csv(self, path: Union[str, os.PathLike]) -> None:
        """Write one row per trial (rank, parameters, mean, std, fold scores) to `path`."""
        keys = list(self.trials[0].params)
        folds = len(self.trials[0].fold_scores)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["rank", *keys, "mean", "std", *[f"fold_{i}" for i in range(folds)]])
            for rank, trial in enumerate(self.trials, start=1):
                writer.writerow([rank, *[trial.params[key] for key in keys], trial.mean, trial.std, *trial.fold_scores])


# --------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------


def search_kd_hyperparameters(
    objective: Objective,
    num_samples: int,
    *,
    candidates: Optional[Sequence[Mapping[str, float]]] = None,
    alphas: Sequence[float] = (0.1, 0.5, 0.9),
    temperatures: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
    method: str = "grid",
    trials: int = 10,
    folds: int = 5,
    labels: Optional[Union[torch.Tensor, Sequence[int], np.ndarray]] = None,
    seed: int = 0,
    maximize: bool = True,
    metric: str = "score",
    csv_path: Optional[Union[str, os.PathLike]] = None,
    verbose: bool = True,
) -> SearchResult:
    """Score α/T candidates by k-fold cross-validation and rank them.

    Args:
        objective: `objective(params, train_index, val_index, fold) -> float`, called once per
            candidate and fold; `params` is a dict with at least "alpha" and "temperature";
            the indices are int64 tensors into the caller's data. It must return a finite
            number (e.g. validation accuracy).
        num_samples: N, the size of the data the indices refer to.
        candidates: explicit list of parameter dicts (each with "alpha" and "temperature",
            other keys are passed through); when given, `method` and the grid are ignored.
        alphas, temperatures: the grid for `method="grid"` (default α ∈ {0.1, 0.5, 0.9},
            T ∈ {1, 2, 4, 8}).
        method: "grid" (default) or "random" (`trials` draws from `random_candidates` with
            the default ranges and `seed`).
        trials: number of random candidates (default 10).
        folds: k >= 2 (default 5).
        labels: optional `[N]` class labels for stratified folds.
        seed: seed of the folds and of random candidates (default 0).
        maximize: True (default) if a higher score is better.
        metric: name of the score in the table header (default "score").
        csv_path: also write the table as CSV here (default None).
        verbose: print one line per candidate and the final table (default True).

    Returns:
        `SearchResult` with trials ranked best first; `.best.params` is the winner and
        `.table()` the Markdown table that was printed.

    Raises:
        ValueError: unknown method, invalid candidates (missing keys, α outside [0, 1],
            T ≤ 0), bad fold settings, or an objective that returns a non-finite value.
    """
    if candidates is not None:
        if len(candidates) == 0:
            raise ValueError("candidates must not be empty")
        checked = []
        for index, candidate in enumerate(candidates):
            missing = {"alpha", "temperature"} - set(candidate)
            if missing:
                raise ValueError(f"candidates[{index}] lacks {sorted(missing)}: {dict(candidate)}")
            params = {key: float(value) for key, value in candidate.items()}
            params["alpha"] = _check_alpha(params["alpha"])
            params["temperature"] = _check_temperature(params["temperature"])
            checked.append(params)
        candidate_list = checked
    elif method == "grid":
        candidate_list = grid_candidates(alphas, temperatures)
    elif method == "random":
        candidate_list = random_candidates(trials, seed=seed)
    else:
        raise ValueError(f"method must be 'grid' or 'random', got {method!r}")

    splits = kfold_indices(num_samples, folds, labels=labels, seed=seed)
    results: List[TrialResult] = []
    for number, params in enumerate(candidate_list, start=1):
        scores = []
        for fold, (train_index, val_index) in enumerate(splits):
            score = objective(dict(params), train_index, val_index, fold)
            try:
                score = float(score)
            except (TypeError, ValueError) as error:
                raise ValueError(f"the objective must return a number, "
                                 f"got {score!r} for {params}, fold {fold}") from error
            if not math.isfinite(score):
                raise ValueError(f"the objective returned {score} for {params}, fold {fold}")
            scores.append(score)
        trial = TrialResult(params, scores)
        results.append(trial)
        if verbose:
            print(f"[{number}/{len(candidate_list)}] alpha={params['alpha']:g} T={params['temperature']:g}: "
                  f"{metric} {trial.mean:.4f} ± {trial.std:.4f}", flush=True)
    order = sorted(range(len(results)), key=lambda i: (-results[i].mean if maximize else results[i].mean, i))
    result = SearchResult([results[i] for i in order], maximize=maximize, metric=metric, folds=folds)
    if verbose:
        print(result.table())
    if csv_path is not None:
        result.to_csv(csv_path)
    return result


# --------------------------------------------------------------------------------------
# A ready-made objective for classification
# --------------------------------------------------------------------------------------


def distillation_objective(
    make_student: Callable[[], nn.Module],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher: Optional[nn.Module] = None,
    teacher_logits: Optional[torch.Tensor] = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
) -> Objective:
    """An objective that distils into a fresh student on each fold and returns validation accuracy.

    For each call it seeds torch with `seed + fold` (so every candidate starts from the same
    student and data order on a fold), builds `make_student()`, trains it for `epochs` with
    Adam(`lr`) and cosine decay through `kdfast.Distiller` and
    `kdfast.KDLoss(temperature=T, alpha=α)` on `inputs[train_index]`, and returns the accuracy
    (fraction in [0, 1]) of its argmax on `inputs[val_index]`.

    Args:
        make_student: builds a new student mapping `inputs[i]` batches to logits `[B, C]`.
        inputs: `[N, ...]` float tensor.
        labels: `[N]` int64 class indices.
        teacher: a frozen module giving logits `[B, C]` (exactly one of `teacher` and
            `teacher_logits`).
        teacher_logits: precomputed `[N, C]` teacher logits.
        epochs: training epochs per fold (default 10).
        batch_size: mini-batch size (default 64).
        lr: Adam learning rate (default 1e-2).
        seed: base seed; fold f uses `seed + f` (default 0).

    Raises:
        ValueError: neither or both teacher sources, or shapes that do not match.
    """
    if (teacher is None) == (teacher_logits is None):
        raise ValueError("give exactly one of teacher and teacher_logits")
    if labels.dtype != torch.int64 or labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
        raise ValueError(f"labels must be int64 [N] with N = inputs.shape[0] = {inputs.shape[0]}, "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if teacher_logits is not None and (teacher_logits.dim() != 2 or teacher_logits.shape[0] != inputs.shape[0]):
        raise ValueError(f"teacher_logits must be [N, C] with N = {inputs.shape[0]}, got {tuple(teacher_logits.shape)}")
    if teacher is not None:
        teacher.eval()
        with torch.no_grad():
            teacher_logits = teacher(inputs).float()
    assert teacher_logits is not None

    def objective(params: Dict[str, float], train_index: torch.Tensor, val_index: torch.Tensor, fold: int) -> float:
        torch.manual_seed(seed + fold)
        student = make_student()
        generator = torch.Generator().manual_seed(seed + fold)
        loader = DataLoader(TensorDataset(inputs[train_index], labels[train_index], teacher_logits[train_index]),
                            batch_size=batch_size, shuffle=True, generator=generator)
        optimizer = torch.optim.Adam(student.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * len(loader)))
        loss = KDLoss(temperature=params["temperature"], alpha=params["alpha"])
        Distiller(student, None, loss, optimizer, scheduler, progress=False).fit(loader, epochs=epochs)
        student.eval()
        with torch.no_grad():
            predictions = student(inputs[val_index]).argmax(-1)
        return (predictions == labels[val_index]).float().mean().item()

    return objective
