"""How much of the teacher's probability mass a top-k soft label keeps, to choose k.

The kept mass of a row is 1 − exp(tail_logprob): the probability (at the stored
temperature) of its k kept tokens. Because the kept log-probabilities of a row are sorted
in descending order, the mass kept by a smaller k' ≤ k is the sum of the exponentials of
its first k' entries, so one top-k pass answers every k' ≤ k.

- `KeptMassStats`: streaming mean and 5th percentile of the kept mass over any number of
  rows in fixed memory (a histogram of `bins` equal-width bins on [0, 1]; the percentile
  is exact to 1/bins).
- `kept_mass_by_k(logprobs, ks)`: per-row kept mass for every k' in `ks` (float64 numpy).
- `candidate_ks(limit, extra)`: the k' of a coverage table: 1, 2, 4, ... up to `limit`.
- `coverage_rows` / `format_coverage_table`: the table of k' against mean and p5 kept
  mass and bytes per token that `kdfast compress --suggest-k` and `kdfast store info` print.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["KEPT_MASS_WARNING", "KeptMassStats", "candidate_ks", "coverage_rows", "format_coverage_table",
           "kept_mass_by_k", "kept_mass_warning"]

# Below this mean kept mass `kdfast compress` warns that k is probably too small.
KEPT_MASS_WARNING = 0.9
_PERCENTILE = 5.0


class KeptMassStats:
    """Streaming mean and 5th percentile of per-row kept mass 1 − exp(tail_logprob).

    Args:
        bins: histogram resolution on [0, 1] (default 10000: the percentile is exact to 1e-4).
    """

    def __init__(self, bins: int = 10000) -> None:
        self.bins = bins
        self.count = 0
        self._sum = 0.0
        self._histogram = np.zeros(bins, dtype=np.int64)

    def update(self, tail_logprob: torch.Tensor) -> None:
        """Adds the rows whose tail log-probabilities are `tail_logprob` (any shape)."""
        self.add_mass(1.0 - np.exp(tail_logprob.detach().to("cpu", torch.float64).numpy().reshape(-1)))

    def add_mass(self, mass: np.ndarray) -> None:
        """Adds rows given by their kept mass directly."""
        mass = np.clip(np.asarray(mass, dtype=np.float64).reshape(-1), 0.0, 1.0)
        self.count += int(mass.size)
        self._sum += float(mass.sum())
        slots = np.minimum((mass * self.bins).astype(np.int64), self.bins - 1)
        self._histogram += np.bincount(slots, minlength=self.bins)

    @property
    def mean(self) -> float:
        """Mean kept mass (NaN before any row)."""
        return self._sum / self.count if self.count else float("nan")

    def percentile(self, q: float = _PERCENTILE) -> float:
        """The q-th percentile of the kept mass (lower edge of its histogram bin; NaN before any row)."""
        if not self.count:
            return float("nan")
        rank = int(np.ceil(q / 100.0 * self.count))
        slot = int(np.searchsorted(np.cumsum(self._histogram), max(rank, 1)))
        return slot / self.bins


def kept_mass_warning(mean: float, threshold: float = KEPT_MASS_WARNING) -> Optional[str]:
    """The warning to print when the mean kept mass is below `threshold`, else None."""
    if not mean < threshold:
        return None
    return (f"the top-k keeps only {100 * mean:.1f}% of the teacher's mass on average; "
            "consider a larger --k (kdfast compress --suggest-k prints the trade-off)")


def kept_mass_by_k(logprobs: torch.Tensor, ks: Iterable[int],
                   tail_logprob: Optional[torch.Tensor] = None) -> Dict[int, np.ndarray]:
    """Per-row kept mass of the first k' kept tokens, for every k' in `ks`.

    Args:
        logprobs: [n, k] kept log-probabilities, each row sorted in descending order.
        ks: the k' to report, each in [1, k].
        tail_logprob: [n] tail log-probabilities of the full k; when given, k' = k uses
            1 − exp(tail) (exact even where the kept log-probabilities were rounded).

    Returns:
        {k': float64 array [n]} of masses in [0, 1].
    """
    width = logprobs.shape[-1]
    cumulative = np.cumsum(np.exp(logprobs.detach().to("cpu", torch.float64).numpy().reshape(-1, width)), axis=1)
    result = {}
    for k in ks:
        if not 1 <= k <= width:
            raise ValueError(f"kept_mass_by_k: k'={k} must be in [1, {width}]")
        if k == width and tail_logprob is not None:
            mass = 1.0 - np.exp(tail_logprob.detach().to("cpu", torch.float64).numpy().reshape(-1))
        else:
            mass = cumulative[:, k - 1]
        result[k] = np.clip(mass, 0.0, 1.0)
    return result


def candidate_ks(limit: int, extra: Sequence[int] = ()) -> List[int]:
    """1, 2, 4, ... up to `limit`, plus `limit` itself and every value of `extra` in [1, limit], sorted."""
    ks = {1 << power for power in range(max(int(limit), 1).bit_length()) if (1 << power) <= limit}
    ks.add(int(limit))
    ks.update(int(k) for k in extra if 1 <= k <= limit)
    return sorted(ks)


def coverage_rows(masses: Dict[int, np.ndarray], bytes_per_token: Callable[[int], int]) -> List[Dict[str, float]]:
    """One row per k': {"k", "mean", "p5", "bytes_per_token"} from `kept_mass_by_k`'s output."""
    return [{"k": k, "mean": float(mass.mean()), "p5": float(np.percentile(mass, _PERCENTILE)),
             "bytes_per_token": bytes_per_token(k)} for k, mass in sorted(masses.items())]


def format_coverage_table(rows: Sequence[Dict[str, float]], marked: Optional[int] = None,
                          mark: str = "<- --k") -> str:
    """The coverage table as aligned text; the row of k' = `marked` is flagged with `mark`."""
    header = ("k", "mean kept mass", "p5 kept mass", "bytes/token")
    lines = [(str(row["k"]), f"{100 * row['mean']:.2f}%", f"{100 * row['p5']:.2f}%", str(row["bytes_per_token"]))
             for row in rows]
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]
    out = ["  ".join(cell.rjust(widths[i]) for i, cell in enumerate(header))]
    for row, line in zip(rows, lines):
        text = "  ".join(cell.rjust(widths[i]) for i, cell in enumerate(line))
        out.append(text + (f"  {mark}" if row["k"] == marked else ""))
    return "\n".join(out)
