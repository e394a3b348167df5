"""examples/quantised_students.py in a subprocess: its `--smoke` configuration runs every task,
says first and beside every table that its numbers are not meaningful, prints each task's table
with every row (float, PTQ and the QAT variants per scheme, pruned rows; the LLM task when
transformers and tokenizers are present) and writes `results.json`; a second run with the same
seed gives the same accuracies. Every option has help text.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torchao", reason="the example needs torchao (the quant extra)")
pytest.importorskip("sklearn", reason="the digits task needs scikit-learn (the examples extra)")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "quantised_students.py")
SMOKE = "SMOKE RUN (--smoke)"
LLM = all(importlib.util.find_spec(name) for name in ("transformers", "tokenizers"))


def run(out: str, *extra: str) -> str:
    result = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", out, *extra], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_smoke_run_prints_every_row_and_repeats(tmp_path):
    tasks = ["digits", "speech"] + (["llm"] if LLM else [])
    out = run(str(tmp_path / "a"), "--schemes", "a8w4", "w8", "--tasks", *tasks)
    assert out.startswith(SMOKE) and "not meaningful" in out
    for task in ("digits", "speech"):
        assert re.search(rf"^{re.escape(SMOKE)}.*\n\| {task} \(1 seed\) +\| test accuracy", out, re.M), task
    assert len(re.findall(r"^\| float student \(KD\) +\|", out, re.M)) == len(tasks)
    for label in ("PTQ, a8w4-pc", "QAT + KD, a8w4-pc", "QAT without KD, w8-pc",
                  "QAT + self-KD (float student teaches), w8-pc", "50% pruned + KD", "2:4 pruned + CE"):
        assert len(re.findall(rf"^\| {re.escape(label)} +\|", out, re.M)) == 2, label
    with open(tmp_path / "a" / "results.json", encoding="utf-8") as handle:
        first = json.load(handle)
    assert first["schemes"] == ["a8w4-pc", "w8-pc"] and set(first["tasks"]) == set(tasks)
    rows = first["tasks"]["digits"]["runs"][0]
    assert rows["qat_kd@a8w4-pc"]["bytes"] < rows["float"]["bytes"]
    assert rows["p24_kd"]["nonzero"] < rows["float"]["nonzero"]
    if LLM:  # the opt-in task: validation cross-entropy of int4 weight-only students
        assert re.search(rf"^{re.escape(SMOKE)}.*\n\| llm \(1 seed\) +\| validation CE", out, re.M)
        for label in ("PTQ, w4-g32", "QAT without KD, w4-g32", "QAT + KD, w4-g32"):
            assert re.search(rf"^\| {re.escape(label)} +\|", out, re.M), label
        assert all(math.isfinite(row["accuracy"]) for row in first["tasks"]["llm"]["runs"][0].values())

    run(str(tmp_path / "b"), "--schemes", "a8w4", "--tasks", "digits")
    with open(tmp_path / "b" / "results.json", encoding="utf-8") as handle:
        second = json.load(handle)["tasks"]["digits"]["runs"][0]
    assert second.keys() <= rows.keys()
    assert {key: value["accuracy"] for key, value in second.items()} == {key: rows[key]["accuracy"] for key in second}


def test_every_option_has_help():
    spec = importlib.util.spec_from_file_location("kdfast_example_quantised_students", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    actions = [action for action in module.build_parser()._actions if action.option_strings]
    assert {"--smoke", "--schemes", "--tasks", "--seeds", "--threads", "--group-size"} <= {
        option for action in actions for option in action.option_strings}
    assert all(action.help for action in actions)
