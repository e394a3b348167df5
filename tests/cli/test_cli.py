"""Tests of the `kdfast` command line (python/kdfast/cli.py), `kdfast bench`'s options and the digits demo.

`kdfast info` prints versions, devices and which compiled kernels run under this torch
(`kernel_support` is checked on synthetic builds: no native library, no CUDA kernels,
CUDA kernels under a CPU-only torch, matching and non-matching GPU architectures).
`kdfast` alone prints the help and exits 0, `--version` prints the version, every option
of every parser has help text that states its default at most once. `kdfast bench`
hands its arguments to `kdfast.benchmark.main` untouched; that rejects bad options in one
line with exit 2 before measuring anything, and writes a CSV only where asked.
`kdfast demo --quick` trains the reduced demo (a few seconds) and writes its PNG and JSON;
its bad options are one-line errors too.
"""

from __future__ import annotations

import argparse
import json
import re
import types
from pathlib import Path

import pytest
import torch

from kdfast import benchmark, cli, compress_cli, store_cli
from kdfast._version import __version__
from kdfast.benchmark import cli as benchmark_cli

REPOSITORY = Path(__file__).resolve().parents[2]


def test_info_prints_versions_build_and_devices(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    assert "build:" in out and "devices:" in out and "cpu" in out
    assert re.search(r"threads: torch intra-op \d+", out)


def test_info_says_which_kernels_run_here(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    info = cli.collect_info()
    assert f"CPU kernels: {info['kernels']['cpu']}\n" in out
    assert f"CUDA kernels: {info['kernels']['cuda']}\n" in out
    build = info["build"]
    if build.get("native"):
        assert info["kernels"]["cpu"].startswith(f"{build['cpu_variant_selected']} runs")
    if build.get("cuda") and torch.version.cuda is None:
        assert info["kernels"]["cuda"].endswith(f"not usable: this torch ({torch.__version__}) has no CUDA")


def _build(**changes):
    build = {"native": True, "cpu_variants": ["avx512", "avx2", "baseline"], "cpu_variant_selected": "avx2",
             "openmp": True, "openmp_max_threads": 4, "cuda": True, "cuda_version": "12.4",
             "cuda_architectures": ["80", "90"]}
    build.update(changes)
    return build


def _gpu(index, capability):
    return {"type": "cuda", "index": index, "name": "GPU", "capability": capability}


@pytest.mark.parametrize("build, torch_cuda, gpus, expected", [
    (_build(native=False, native_error="no _C"), None, [], "not usable: the compiled library did not load"),
    (_build(cuda=False), "12.4", [], "not compiled; CUDA tensors take the pure-PyTorch reference path"),
    (_build(), None, [], "compiled (CUDA 12.4; sm_80, sm_90), not usable: this torch ("),
    (_build(), "12.4", [], "compiled (CUDA 12.4; sm_80, sm_90), not usable: no CUDA device is visible"),
    (_build(), "12.4", [_gpu(0, "9.0")], "compiled (CUDA 12.4; sm_80, sm_90), usable on cuda:0 (sm_90)"),
    (_build(), "12.4", [_gpu(0, "8.6")], "usable on cuda:0 (sm_86)"),
    (_build(), "12.4", [_gpu(0, "7.5"), _gpu(1, "8.0")],
     "usable on cuda:1 (sm_80); not usable on cuda:0 (sm_75) (no matching architecture)"),
])
def test_kernel_support_line(monkeypatch, build, torch_cuda, gpus, expected):
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    kernels = cli.kernel_support(build, [{"type": "cpu"}] + gpus)
    assert expected in kernels["cuda"]
    if build["native"]:
        assert kernels["cpu"] == "avx2 runs (compiled: avx512, avx2, baseline), OpenMP up to 4 threads"


def test_info_json_is_machine_readable(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert info["threads"]["torch_intra_op"] == torch.get_num_threads()
    assert info["devices"][0]["type"] == "cpu"
    assert set(info["kernels"]) == {"cpu", "cuda"}
    assert len([d for d in info["devices"] if d["type"] == "cuda"]) == (
        torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_kdfast_alone_prints_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kdfast")
    for command in ("demo", "info", "bench", "compress", "store"):
        assert re.search(rf"^    {command} ", out, re.MULTILINE), command


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"kdfast {__version__}"


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["compile-everything"])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "kdfast: error: argument COMMAND: invalid choice: 'compile-everything'" in err


def _parsers():
    """Every parser of the command line: kdfast, its subcommands, store info/verify, bench."""
    root = cli.build_parser()
    found = {"kdfast": root, "kdfast bench": benchmark_cli.build_parser("kdfast bench"),
             "python -m kdfast.compress_cli": compress_cli.build_parser()}
    stack = [root, store_cli.build_parser()]
    while stack:
        parser = stack.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found[child.prog] = child
                    stack.append(child)
    return found


@pytest.mark.parametrize("prog", sorted(_parsers()))
def test_every_option_has_help_stating_its_default_at_most_once(prog):
    parser = _parsers()[prog]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help, f"{prog} {action.option_strings or action.dest} has no help"
        assert action.help.replace("%(default)s", "").lower().count("default") <= 1, action.help
    parser.format_help()  # every %(default)s expands


# ----------------------------------------------------------------------------- bench


def test_bench_forwards_every_argument(monkeypatch):
    received = []
    fake = types.SimpleNamespace(main=lambda argv=None, prog=None: received.append((argv, prog)) or 3)
    monkeypatch.setattr(cli, "benchmark", fake)
    assert cli.main(["bench", "--quick", "--vocab", "1000", "--help"]) == 3
    assert received == [(["--quick", "--vocab", "1000", "--help"], "kdfast bench")]


@pytest.mark.parametrize("options, message", [
    (["--temperature", "0"], "temperature must be finite and in [1e-20, 1e+20]"),
    (["--temperature", "nan"], "temperature must be finite and in [1e-20, 1e+20]"),
    (["--alpha", "1.5"], "alpha must be in [0, 1]"),
    (["--divergence", "jsd", "--beta", "1"], "beta must be in (0, 1)"),
    (["--label-smoothing", "1"], "label_smoothing must be in [0, 1)"),
    (["--budget", "0"], "--budget must be a positive number of seconds"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--repeats", "2", "--min-repeats", "3"], "--min-repeats 3 exceeds --repeats 2"),
    (["--rows", "0"], "--rows and --vocab must be positive"),
    (["--rows", "a,b"], "argument --rows: expected a comma list of integers"),
    (["--dtypes", "int8"], "unknown dtype 'int8'"),
    (["--providers", ","], "--providers names nothing"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--out", "{tmp}"], "is a directory; expected a CSV file path"),
    (["--out", "{tmp}/file/rows.csv"], "is a file, not a directory"),
])
def test_bench_rejects_bad_options_before_running(tmp_path, monkeypatch, run_kdfast, options, message):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(benchmark_cli, "run_case", lambda *args, **kwargs: pytest.fail("a case ran"))
    code, out, err = run_kdfast(["bench", "--quick"] + [option.format(tmp=tmp_path) for option in options])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("kdfast bench: error: ") and message in err


TINY_BENCH = ["--quick", "--rows", "4", "--vocab", "16", "--providers", "eager", "--dtypes", "float32",
              "--passes", "fwd", "--no-memory", "--repeats", "1", "--min-repeats", "1", "--warmup", "0"]


def _files_under(directory):
    return {path: path.stat().st_mtime_ns for path in directory.rglob("*") if path.is_file()}


def test_bench_without_out_writes_nothing(monkeypatch, run_kdfast):
    monkeypatch.chdir(REPOSITORY)  # where an implicit default would have written
    before = _files_under(REPOSITORY / "benches")
    monkeypatch.setattr(benchmark_cli, "append_csv", lambda *args, **kwargs: pytest.fail("a CSV was written"))
    code, out, err = run_kdfast(["bench", *TINY_BENCH])
    assert code == 0, err
    assert "median ms" in out and "CSV:" not in out
    assert _files_under(REPOSITORY / "benches") == before


def test_bench_writes_where_asked(tmp_path):
    assert benchmark.main(TINY_BENCH + ["--out", str(tmp_path / "rows.csv")]) == 0
    assert (tmp_path / "rows.csv").read_text().startswith("timestamp,")
    assert benchmark.main(TINY_BENCH, csv_dir=tmp_path) == 0  # what benches/bench_kd_loss.py passes
    assert (tmp_path / "kd_loss_cpu.csv").is_file()
    assert benchmark.main(TINY_BENCH + ["--no-csv"], csv_dir=tmp_path / "none") == 0
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- demo


@pytest.mark.parametrize("options, message", [
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--seed", "1", "--seeds", "1", "2"], "give --seed or --seeds"),
])
def test_demo_rejects_bad_options(tmp_path, run_kdfast, options, message):
    code, _, err = run_kdfast(["demo", "--quick", "--out", str(tmp_path)] + options)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("kdfast demo: error: ") and message in err


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
