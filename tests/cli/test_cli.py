"""Tests of the `kdfast` command line (python/kdfast/cli.py) and the digits demo (python/kdfast/demo.py).

`kdfast info` prints versions and devices; `kdfast demo --quick` trains the reduced demo
through `cli.main` (a few seconds), prints the accuracy table and writes the PNG and JSON;
`kdfast bench` hands its arguments to `kdfast.benchmark.main` untouched; bad options fail
with a message.
"""

from __future__ import annotations

import json
import re
import types

import pytest
import torch

from kdfast import cli


def test_info_prints_versions_build_and_devices(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    assert "build:" in out and "devices:" in out and "cpu" in out
    assert re.search(r"threads: torch intra-op \d+", out)


def test_info_json_is_machine_readable(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert info["threads"]["torch_intra_op"] == torch.get_num_threads()
    assert info["devices"][0]["type"] == "cpu"
    assert len([d for d in info["devices"] if d["type"] == "cuda"]) == (
        torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_bench_forwards_every_argument(monkeypatch):
    received = []
    fake = types.SimpleNamespace(main=lambda argv=None, prog=None: received.append((argv, prog)) or 3)
    monkeypatch.setattr(cli, "benchmark", fake)
    assert cli.main(["bench", "--quick", "--vocab", "1000", "--help"]) == 3
    assert received == [(["--quick", "--vocab", "1000", "--help"], "kdfast bench")]


def test_missing_or_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as error:
        cli.main([])
    assert error.value.code == 2
    with pytest.raises(SystemExit) as error:
        cli.main(["compile-everything"])
    assert error.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--seed", "1", "--seeds", "1", "2"], "give --seed or --seeds"),
])
def test_demo_rejects_bad_options(tmp_path, options, message):
    with pytest.raises(SystemExit) as error:
        cli.main(["demo", "--quick", "--out", str(tmp_path)] + options)
    assert message in str(error.value.code)


def test_demo_quick_prints_table_and_writes_png(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    threads = torch.get_num_threads()
    out_dir = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--epochs", "4", "--out", str(out_dir)]) == 0
    assert torch.get_num_threads() == threads  # the demo restores the thread setting
    out = capsys.readouterr().out
    rows = {}
    for label in ("teacher (CNN)", "student alone", "student distilled"):
        match = re.search(rf"^\| {re.escape(label)} \| [\d,]+ \| (\d+\.\d\d) \|$", out, re.MULTILINE)
        assert match, f"no table row for {label!r} in:\n{out}"
        rows[label] = float(match.group(1))
    assert all(0.0 <= value <= 100.0 for value in rows.values())
    assert rows["student alone"] > 30.0  # well above chance (10%) even after 4 epochs

    png = out_dir / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    results = json.loads((out_dir / "results.json").read_text())
    assert results["epochs"] == 4 and len(results["results"]) == 1
    seed_result = results["results"][0]
    assert 100.0 * seed_result["distilled"] == pytest.approx(rows["student distilled"], abs=0.006)
    assert len(seed_result["curves"]["distilled_test_accuracy"]) == 4
