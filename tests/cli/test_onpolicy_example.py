"""Smoke test of examples/llm_onpolicy.py: its `--smoke` run says that its numbers are not
meaningful, prints the three student rows and writes `results.json` with the generated-batch
counts the options imply (none for the student alone and off-policy, some for on-policy);
two runs print the same numbers whatever the global random state; every option has a help
line naming its default at most once; the prompt/label split of a window is checked."""

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

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def load(name):
    spec = importlib.util.spec_from_file_location(f"kdfast_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def timeless(out):
    """The result table without its wall-clock column ("train s/run"): every other number must repeat."""
    lines = [line.split("|") for line in out[out.index("| model"):].splitlines() if line.startswith("|")]
    column = [cell.strip() for cell in lines[0]].index("train s/run")
    return "\n".join("|".join(cells[:column] + cells[column + 1:]) for cells in lines)


def test_smoke_run_is_labelled_reproducible_and_counts_generations(tmp_path, capsys):
    module, notice = load("llm_onpolicy"), load("_shared").SMOKE_NOTE
    outputs = []
    for state in (1, 2):
        torch.manual_seed(state)
        random.seed(state)
        assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
        outputs.append(re.sub(r"\d+(\.\d+)? s on", "… s on", capsys.readouterr().out))
    out = outputs[0]
    assert out.startswith(notice) and re.search(rf"^{re.escape(notice)}\n\| ", out, re.M)
    for label in ("student alone", "student, off-policy KD", "student, on-policy KD"):
        assert re.search(r"^\| " + re.escape(label), out, re.M), label
    tables = [timeless(text) for text in outputs]
    assert re.search(r"\d+\.\d\d", tables[0]) and tables[0] == tables[1]
    row = json.load(open(tmp_path / "results.json", encoding="utf-8"))["seeds"][0]
    assert row["alone_generated"] == 0 and row["off_policy_generated"] == 0 and row["on_policy_generated"] > 0
    assert all(0 < row[key] < 20 for key in ("alone", "off_policy", "on_policy", "on_policy_sample_ce"))


def test_every_option_has_help_with_its_default_once():
    parser = load("llm_onpolicy").build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action)
        assert action.help and text.lower().count("default") <= 1, action.option_strings
        if action.default not in (None, False) and not isinstance(action.default, list):
            assert "default" in text.lower(), action.option_strings


def test_prompt_batch_masks_the_prompt_and_bad_options_exit():
    module = load("llm_onpolicy")
    ids = torch.arange(12).view(2, 6)
    batch = module.prompt_batch(ids, 2)
    assert torch.equal(batch["prompts"], ids[:, :2]) and torch.equal(batch["input_ids"], ids)
    assert (batch["labels"][:, :2] == -100).all() and torch.equal(batch["labels"][:, 2:], ids[:, 2:])
    with pytest.raises(SystemExit, match="prompt-len"):
        module.main(["--prompt-len", "48", "--seq-len", "48"])
    with pytest.raises(SystemExit, match="lmbda"):
        module.main(["--lmbda", "1.5"])
