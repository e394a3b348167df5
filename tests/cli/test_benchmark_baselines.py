"""Checks that the benchmark's baselines compute the loss they claim to, and that the benchmark runs.

The `eager` provider of `kdfast.benchmark` is what every speed-up is measured against, so it
must equal the loss contract: its loss and student gradient are compared with
`kdfast.reference.kd_loss` in float64 for each divergence, with labels (some ignored),
α > 0, T ≠ 1 and label smoothing. A `--quick` run of `kdfast.benchmark.main` (without the
slow-to-compile `compile` provider) must finish and write a CSV with the documented columns.
No timing is asserted here; speed lives in `benches/`.
"""

from __future__ import annotations

import csv

import pytest
import torch

from kdfast import benchmark, reference
from kdfast.benchmark import cli as benchmark_cli

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def _inputs(rows: int = 9, vocab: int = 37, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3.0
    teacher = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3.0
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[[0, 4]] = -100
    return student, teacher, labels


def _loss_and_gradient(loss_fn, student, teacher, labels, **kwargs):
    student = student.clone().requires_grad_(True)
    loss = loss_fn(student, teacher, labels, reduction="mean", **kwargs) if loss_fn is reference.kd_loss \
        else loss_fn(student, teacher, labels, **kwargs)
    (gradient,) = torch.autograd.grad(loss, student)
    return loss.detach(), gradient


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("alpha, label_smoothing", [(0.0, 0.0), (0.3, 0.1)])
def test_eager_baseline_matches_reference(divergence, alpha, label_smoothing):
    student, teacher, labels = _inputs()
    kwargs = dict(divergence=divergence, temperature=2.5, alpha=alpha, beta=0.3, ignore_index=-100,
                  label_smoothing=label_smoothing, t2_scale=True)
    expected_loss, expected_gradient = _loss_and_gradient(reference.kd_loss, student, teacher, labels, **kwargs)
    eager = benchmark.make_provider("eager", benchmark.Case("cpu", torch.float64, 9, 37, **kwargs)).fn
    loss, gradient = _loss_and_gradient(eager, student, teacher, labels)
    assert loss.dtype == torch.float64 and gradient.dtype == torch.float64
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-9, atol=1e-12)
    assert gradient[[0, 4]].abs().max().item() == 0.0  # ignored rows get no gradient


def test_eager_baseline_without_labels_and_all_rows_ignored():
    student, teacher, labels = _inputs(rows=5, vocab=11)
    expected = reference.kd_loss(student, teacher, None, divergence="forward_kl", temperature=2.0)
    loss = benchmark.eager_kd_loss(student, teacher, None, divergence="forward_kl", temperature=2.0)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)

    student.requires_grad_(True)
    ignored = torch.full_like(labels, -100)
    loss = benchmark.eager_kd_loss(student, teacher, ignored, temperature=2.0, alpha=0.5)
    (gradient,) = torch.autograd.grad(loss, student)
    assert loss.item() == 0.0 and gradient.abs().max().item() == 0.0


def test_low_precision_student_gets_gradient_in_its_dtype():
    student, teacher, labels = _inputs()
    student = student.to(torch.bfloat16).requires_grad_(True)
    loss = benchmark.eager_kd_loss(student, teacher.to(torch.bfloat16), labels, temperature=2.0, alpha=0.5)
    (gradient,) = torch.autograd.grad(loss, student)
    assert loss.dtype == torch.float32 and gradient.dtype == torch.bfloat16


def test_minimum_bytes_formula():
    case = benchmark.Case("cpu", torch.bfloat16, rows=4, vocab=10)
    assert benchmark.minimum_bytes(case, "fwd") == 4 * 10 * (2 + 2) + 4 * 8
    assert benchmark.minimum_bytes(case, "fwd+bwd") == 4 * 10 * (2 + 2) + 4 * 8 + 4 * 10 * 2


def test_quick_run_writes_csv(tmp_path, capsys):
    out = tmp_path / "results" / "kd_loss_cpu.csv"
    status = benchmark.main(["--quick", "--providers", "kdfast,eager", "--dtypes", "float32,bfloat16",
                             "--divergence", "forward_kl,jsd", "--repeats", "2", "--min-repeats", "1",
                             "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "median ms" in printed and "GB/s" in printed
    with open(out, newline="") as handle:
        records = list(csv.DictReader(handle))
    assert list(records[0].keys()) == list(benchmark.CSV_COLUMNS)
    # 2 dtypes x 1 N x 1 V x 2 divergences x 2 passes x 2 providers
    assert len(records) == 16
    assert {r["provider"] for r in records} == {"kdfast", "eager"}
    assert {r["pass"] for r in records} == {"fwd", "fwd+bwd"}
    for record in records:
        assert record["status"] == "ok", record
        assert float(record["median_ms"]) > 0 and float(record["gbps"]) > 0
        if record["provider"] == "eager":
            assert float(record["speedup_vs_eager"]) == pytest.approx(1.0)

    # A second run appends rows under the same header.
    assert benchmark.main(["--quick", "--providers", "eager", "--dtypes", "float32", "--passes", "fwd",
                           "--no-memory", "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 17


def test_failing_provider_is_reported_and_run_continues(tmp_path, monkeypatch):
    original = benchmark.make_provider

    def make_provider(name, case):
        provider = original(name, case)
        if name == "kdfast":
            def broken(*args):
                raise RuntimeError("simulated out of memory")
            provider.fn = broken
        return provider

    monkeypatch.setattr(benchmark_cli, "make_provider", make_provider)
    out = tmp_path / "failing.csv"
    assert benchmark.main(["--quick", "--providers", "kdfast,eager", "--dtypes", "float32", "--repeats", "3",
                           "--no-memory", "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        records = list(csv.DictReader(handle))
    statuses = {(r["provider"], r["pass"]): r["status"] for r in records}
    assert statuses[("eager", "fwd")] == "ok" and statuses[("eager", "fwd+bwd")] == "ok"
    assert statuses[("kdfast", "fwd")].startswith("failed: RuntimeError: simulated out of memory")
    assert records[[r["provider"] for r in records].index("kdfast")]["median_ms"] == ""


def test_bad_option_returns_error_code(capsys):
    assert benchmark.main(["--quick", "--dtypes", "int8", "--no-csv"]) == 2
    assert "unknown dtype" in capsys.readouterr().err


def test_compiling_provider_gets_one_retry_on_a_transient_error(tmp_path, monkeypatch):
    calls = {"count": 0}

    def make_provider(name, case):
        def flaky(student, teacher, labels):
            calls["count"] += 1
            if calls["count"] == 1:
                raise RuntimeError("cache file vanished")
            return benchmark.eager_kd_loss(student, teacher, labels, **case.loss_kwargs())
        return benchmark.Provider(name, flaky, extra_warmup=1)

    monkeypatch.setattr(benchmark_cli, "make_provider", make_provider)
    out = tmp_path / "retry.csv"
    assert benchmark.main(["--quick", "--providers", "compile", "--dtypes", "float32", "--passes", "fwd",
                           "--no-memory", "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        (record,) = list(csv.DictReader(handle))
    assert record["provider"] == "compile" and record["status"] == "ok"
