"""Smoke tests of `examples/data_free_digits.py`: `--smoke` says its numbers are not
meaningful, prints the table with the data-free row and the ratio, writes `results.json` and
the PNG where `--plot` says; two runs with the same seed give the same accuracies whatever the
global random state before them; and every option has help naming its default once."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"kdfast_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_smoke_runs_are_labelled_write_their_outputs_and_repeat(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    module = load_example("data_free_digits")
    notice = load_example("_shared").SMOKE_NOTE
    runs = []
    for state in (1, 2):  # other global random states before each run: the same accuracies
        random.seed(state)
        torch.manual_seed(state)
        plot = tmp_path / str(state) / "curve" / "accuracy.png"
        assert module.main(["--smoke", "--out", str(tmp_path / str(state)), "--plot", str(plot)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(notice) and re.search(rf"^{re.escape(notice)}\n\| ", out, re.M)
        assert re.search(r"^\| student data-free \(l1, 10 steps, no data\) +\|", out, re.M)
        assert re.search(r"^\| data-free ÷ KD on real data +\|", out, re.M)
        assert plot.read_bytes().startswith(b"\x89PNG")
        (row,) = json.load(open(tmp_path / str(state) / "results.json", encoding="utf-8"))["results"]
        assert all(0.0 <= row[key] <= 1.0 for key in ("teacher", "student_alone", "distilled", "data_free"))
        assert [step for step, _ in row["curve"]] == [5, 10]
        runs.append({key: value for key, value in row.items() if key != "data_free_seconds"})
    assert runs[0] == runs[1]


def test_every_option_has_help_with_its_default_once():
    parser = load_example("data_free_digits").build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"
        text = formatter._expand_help(action)
        assert text.lower().count("default") <= 1, f"{action.option_strings}: {text!r}"
        if action.default not in (None, False) and not isinstance(action.default, list):
            assert "default" in text.lower(), f"{action.option_strings} does not name its default: {text!r}"
