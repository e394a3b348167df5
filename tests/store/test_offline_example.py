"""Runs `examples/offline_topk.py --smoke` (compress a teacher to a store, train from it) in a subprocess.

The run must succeed, say it is a smoke run, print its before/after table with the dense KD
loss against the teacher lowered by training from the store alone, leave a verified store
whose dataset labels line up, and print the same table twice for the same seed. Every
option of the script has help text.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from kdfast.store import SoftLabelStore, SoftLabelWindowDataset

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples",
                       "offline_topk.py")


def run_smoke(out, seed: int) -> str:
    result = subprocess.run([sys.executable, EXAMPLE, "--smoke", "--seed", str(seed), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def table_value(output: str, row: str, column: int) -> float:
    match = re.search(rf"^\| {re.escape(row)} +\|(.*)\|$", output, re.M)
    assert match, f"no table row {row!r} in:\n{output}"
    return float(match.group(1).split("|")[column].strip().replace(",", ""))


def test_the_smoke_run_trains_from_the_store_and_is_reproducible(tmp_path):
    first = run_smoke(tmp_path / "first", seed=3)
    assert first.startswith("SMOKE RUN") and "not meaningful" in first.splitlines()[0]
    assert re.search(r"^store: 1,024 tokens in 4 shards, top-8 of V = 64", first, re.M)
    dense = "dense KD loss vs the teacher, held out"
    assert table_value(first, dense, 1) < table_value(first, dense, 0)  # columns: before, after
    topk = "top-k KD loss, training store"
    assert table_value(first, topk, 1) < table_value(first, topk, 0)

    store = SoftLabelStore(tmp_path / "first" / "store")
    store.verify()
    assert store.window == 16 and store.complete
    dataset = SoftLabelWindowDataset(store)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    dataset.check_labels(batch, batch["labels"])
    with pytest.raises(ValueError, match="not shifted"):
        dataset.check_labels(batch, batch["input_ids"])

    second = run_smoke(tmp_path / "second", seed=3)
    table = [line for line in first.splitlines() if line.startswith("|")]
    assert table and table == [line for line in second.splitlines() if line.startswith("|")]


def test_every_option_has_help_text():
    spec = importlib.util.spec_from_file_location("kdfast_example_offline_topk", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    actions = [action for action in module.build_parser()._actions if action.option_strings != ["-h", "--help"]]
    assert len(actions) >= 10
    for action in actions:
        assert action.help and len(action.help) > 10, action.option_strings
