"""Smoke tests of `examples/data_free_digits.py` and `examples/data_free_speech.py`: `--smoke`
says its numbers are not meaningful, prints the table with the data-free row and the ratio,
writes `results.json` and the PNG where `--plot` says; two runs with the same seed give the same
accuracies whatever the global random state before them; every option has help naming its
default once; and the speech example's validation split is speaker-disjoint from its fit and
test splits, so that choosing hyper-parameters on it never reads the test clips; and
`text_sentiment.py --method data_free` stops with the reason (a generator cannot make token ids)."""

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


# (example, the module it needs beyond matplotlib, smoke steps, smoke curve steps)
EXAMPLE_CASES = [("data_free_digits", "sklearn", 10, [5, 10]), ("data_free_speech", "numpy", 6, [3, 6])]


@pytest.mark.parametrize("name,needs,steps,curve", EXAMPLE_CASES, ids=[case[0] for case in EXAMPLE_CASES])
def test_smoke_runs_are_labelled_write_their_outputs_and_repeat(tmp_path, capsys, name, needs, steps, curve):
    pytest.importorskip(needs)
    pytest.importorskip("matplotlib")
    module = load_example(name)
    notice = load_example("_shared").SMOKE_NOTE
    runs = []
    for state in (1, 2):  # other global random states before each run: the same accuracies
        random.seed(state)
        torch.manual_seed(state)
        plot = tmp_path / str(state) / "curve" / "accuracy.png"
        assert module.main(["--smoke", "--out", str(tmp_path / str(state)), "--plot", str(plot)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(notice) and re.search(rf"^{re.escape(notice)}\n\| ", out, re.M)
        assert re.search(rf"^\| student data-free \(l1, {steps} steps, no data\) +\|", out, re.M)
        assert re.search(r"^\| data-free ÷ KD on real data +\|", out, re.M)
        assert plot.read_bytes().startswith(b"\x89PNG")
        (row,) = json.load(open(tmp_path / str(state) / "results.json", encoding="utf-8"))["results"]
        assert all(0.0 <= row[key] <= 1.0 for key in ("teacher", "student_alone", "distilled", "data_free"))
        assert [step for step, _ in row["curve"]] == curve
        runs.append({key: value for key, value in row.items() if key != "data_free_seconds"})
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name", ["data_free_digits", "data_free_speech"])
def test_every_option_has_help_with_its_default_once(name):
    parser = load_example(name).build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"
        text = formatter._expand_help(action)
        assert text.lower().count("default") <= 1, f"{action.option_strings}: {text!r}"
        if action.default not in (None, False) and not isinstance(action.default, list):
            assert "default" in text.lower(), f"{action.option_strings} does not name its default: {text!r}"


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("seed", [0, 3])
def test_speech_validation_split_is_speaker_disjoint_and_leaves_test_alone(seed, fraction):
    module = load_example("data_free_speech")
    try:
        data = module.load_npz(module.DEFAULT_DATA)
    except module.DatasetUnavailable as reason:
        pytest.skip(str(reason))
    train, test = module.speaker_split(data, seed, 0.25, 32)
    fit, validation = module.validation_split(data, train, seed, fraction)
    assert sorted(fit.tolist() + validation.tolist()) == sorted(train.tolist())
    assert not set(fit.tolist()) & set(test.tolist()) and not set(validation.tolist()) & set(test.tolist())
    speakers = {part: set(data["speaker"][index].tolist()) for part, index in
                (("fit", fit), ("validation", validation), ("test", test))}
    assert not speakers["fit"] & speakers["validation"]
    assert not (speakers["fit"] | speakers["validation"]) & speakers["test"]
    assert len(speakers["validation"]) == max(1, round(fraction * 32))
    again, _ = module.validation_split(data, train, seed, fraction)
    assert again.tolist() == fit.tolist()


def test_speech_validation_mode_reports_the_validation_split(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    module = load_example("data_free_speech")
    assert module.main(["--smoke", "--validation", "0.25", "--out", str(tmp_path), "--plot",
                        str(tmp_path / "curve.png")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\| spoken digits \(train 240 clips / 12 speakers, validation 80 / 4\) +\| parameters +\| "
                     r"validation accuracy \(%\), 1 seed\(s\) +\|", out, re.M)


def test_text_example_refuses_data_free_with_a_reason(tmp_path):
    module = load_example("text_sentiment")
    with pytest.raises(SystemExit, match="cannot produce.*data_free_speech.py"):
        module.main(["--smoke", "--method", "data_free", "--out", str(tmp_path)])
