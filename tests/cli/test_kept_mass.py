"""Choosing k: the kept-mass statistics (kdfast.kept_mass), the compress summary and warning, and --suggest-k.

The kept mass of a row is 1 − exp(tail_logprob); for k' ≤ k it is the sum of the first k'
sorted probabilities. The statistics are checked against exact numpy on known rows, the
`kdfast compress` summary against the tails it stored, the warning on both sides of the
90% threshold, and `--suggest-k` against the teacher's softmax computed directly (and it
writes no store).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kdfast import compress_topk
from kdfast.kept_mass import (
    KEPT_MASS_WARNING,
    KeptMassStats,
    candidate_ks,
    coverage_rows,
    format_coverage_table,
    kept_mass_by_k,
    kept_mass_warning,
)
from kdfast.store import SoftLabelStore
from kdfast.teachers import load_teacher


def toy_teacher(toy):
    return load_teacher(f"{toy.teacher}:teacher")


def test_streaming_stats_match_numpy():
    masses = np.random.default_rng(0).beta(5, 1, size=10_001)
    stats = KeptMassStats(bins=10_000)
    for chunk in np.array_split(masses, 7):
        stats.update(torch.as_tensor(np.log1p(-chunk)))  # tail_logprob = log(1 - kept)
    assert stats.count == masses.size
    assert stats.mean == pytest.approx(masses.mean(), abs=1e-9)
    assert abs(stats.percentile(5) - np.percentile(masses, 5)) <= 2e-4


def test_empty_stats_are_nan():
    assert np.isnan(KeptMassStats().mean) and np.isnan(KeptMassStats().percentile(5))


@pytest.mark.parametrize("vocab, k", [(10, 10), (50, 7), (300, 64)])
def test_kept_mass_by_k_sums_the_largest_probabilities(vocab, k):
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    labels = compress_topk(logits, k, temperature=1.5)
    ks = candidate_ks(k)
    masses = kept_mass_by_k(labels.logprobs, ks, labels.tail_logprob)
    probabilities = torch.softmax(logits.double() / 1.5, dim=-1).sort(dim=-1, descending=True).values
    for kk in ks:
        np.testing.assert_allclose(masses[kk], probabilities[:, :kk].sum(-1).numpy(), atol=1e-5)
    assert np.all(np.diff(np.stack([masses[kk] for kk in ks]), axis=0) >= -1e-7)  # more tokens keep more mass


@pytest.mark.parametrize("limit, extra, expected", [
    (1, (), [1]),
    (8, (), [1, 2, 4, 8]),
    (10, (3,), [1, 2, 3, 4, 8, 10]),
    (256, (300,), [1, 2, 4, 8, 16, 32, 64, 128, 256]),
])
def test_candidate_ks(limit, extra, expected):
    assert candidate_ks(limit, extra) == expected


def test_warning_threshold():
    assert kept_mass_warning(KEPT_MASS_WARNING + 1e-3) is None
    message = kept_mass_warning(0.5)
    assert "keeps only 50.0% of the teacher's mass on average; consider a larger --k" in message


def test_table_marks_the_chosen_k():
    rows = coverage_rows({1: np.array([0.5, 0.7]), 4: np.array([0.9, 1.0])}, lambda k: 4 * k + 4)
    table = format_coverage_table(rows, marked=4).splitlines()
    assert table[0].split() == ["k", "mean", "kept", "mass", "p5", "kept", "mass", "bytes/token"]
    assert table[1].split() == ["1", "60.00%", "51.00%", "8"]
    assert table[2].split() == ["4", "95.00%", "90.50%", "20", "<-", "--k"]


def summary_values(err):
    match = re.search(r"top-(\d+): mean (\d+\.\d)%, 5th percentile (\d+\.\d)% \(over the (\d+) tokens", err)
    assert match, err
    return int(match.group(1)), float(match.group(2)), float(match.group(3)), int(match.group(4))


@pytest.mark.parametrize("k, warns", [(4, True), (256, False)])
def test_compress_reports_the_kept_mass_and_warns_when_low(tmp_path, run_kdfast, compress_args, k, warns):
    out = tmp_path / "store"
    code, _, err = run_kdfast(compress_args(out, "--k", str(k), "--dtype", "float32"))
    assert code == 0, err
    tails = SoftLabelStore(out)[:].tail_logprob.double()
    kept = 1.0 - torch.exp(tails)
    shown_k, mean, p5, count = summary_values(err)
    assert (shown_k, count) == (k, 2000)
    assert mean == pytest.approx(100 * kept.mean().item(), abs=0.051)
    assert p5 == pytest.approx(100 * np.percentile(kept.numpy(), 5), abs=0.06)
    warning = [line for line in err.splitlines() if line.startswith("kdfast compress: warning:")]
    assert len(warning) == (1 if warns else 0)
    if warns:
        assert f"keeps only {mean:.1f}% of the teacher's mass" in warning[0]


def test_warning_is_printed_even_with_quiet(tmp_path, run_kdfast, compress_args):
    code, out, err = run_kdfast(compress_args(tmp_path / "store", "--k", "2", "--quiet"))
    assert code == 0 and out == ""
    assert err.startswith("kdfast compress: warning: the top-k keeps only") and len(err.splitlines()) == 1


def test_suggest_k_prints_the_table_and_writes_nothing(toy, tmp_path, run_kdfast, compress_args):
    out = tmp_path / "store"
    code, stdout, err = run_kdfast(compress_args(out, "--suggest-k", "--k", "10", "--seq-len", "64",
                                                 "--batch-size", "3"))
    assert code == 0, err
    assert not out.exists()
    lines = stdout.splitlines()
    assert "over the first 768 tokens" in lines[0]  # 4 teacher calls of 3 windows of 64 tokens
    rows = [line.split() for line in lines[2:] if line.split() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == [1, 2, 4, 8, 10, 16, 32, 64, 128, 256]
    assert [row[-2:] for row in rows if "<-" in row] == [["<-", "--k"]] and rows[4][0] == "10"
    assert rows[-1][1:3] == ["100.00%", "100.00%"]  # k = V keeps everything
    assert all(int(row[3]) == 4 * int(row[0]) + 4 for row in rows)  # uint16 + float16 per entry, float32 tail

    teacher = toy_teacher(toy)
    ids = torch.as_tensor(toy.tokens[:768]).view(12, 64)
    probabilities = torch.softmax(teacher(ids).double(), -1).sort(-1, descending=True).values.reshape(-1, 256)
    for row in rows:
        kept = probabilities[:, : int(row[0])].sum(-1).numpy()
        assert float(row[1].rstrip("%")) == pytest.approx(100 * kept.mean(), abs=0.006)
        assert float(row[2].rstrip("%")) == pytest.approx(100 * np.percentile(kept, 5), abs=0.006)
