"""`kdfast store merge OUT PATH...` and `info`/`verify` over several stores.

Two halves of the toy stream are compressed separately (as two nodes would) and merged;
the merged store must hold exactly the rows and token ids of one run over the whole stream
(the halves are whole teacher windows, so the teacher saw the same windows). Stores that
differ in a field that must match are refused in one line naming the field, and so are
incomplete inputs, a window cut between inputs and an output that already holds a store.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdfast import cli
from kdfast.store import SoftLabelStore

COMMON = ["--k", "8", "--seq-len", "50", "--batch-size", "2", "--shard-tokens", "300", "--no-fsync", "--quiet"]


@pytest.fixture(scope="module")
def halves(toy, tmp_path_factory):
    """{name: store directory}: "whole" (2000 tokens), "first" and "second" (1000 each), and variants."""
    directory = tmp_path_factory.mktemp("merge")
    np.save(directory / "second.npy", toy.tokens[1000:])
    np.save(directory / "odd.npy", toy.tokens[:1010])
    runs = {
        "whole": [],
        "first": ["--max-tokens", "1000"],
        "second": ["--data", str(directory / "second.npy")],
        "odd": ["--data", str(directory / "odd.npy")],  # 1010 tokens: its last window is cut short
        "k": ["--max-tokens", "1000", "--k", "4"],
        "temperature": ["--max-tokens", "1000", "--temperature", "2"],
        "dtypes": ["--max-tokens", "1000", "--dtype", "bfloat16"],
    }
    stores = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, extra in runs.items():
            arguments = ["compress", "--teacher", toy.teacher, "--data", toy.data, *COMMON, *extra]
            stores[name] = directory / name
            assert cli.main([*arguments, "--out", str(stores[name])]) == 0
    finally:
        torch.set_num_threads(threads)
    return stores


def test_merged_halves_equal_one_run_over_the_stream(halves, tmp_path, run_kdfast):
    out = tmp_path / "merged"
    code, stdout, err = run_kdfast(["store", "merge", out, halves["first"], halves["second"]])
    assert code == 0, err
    assert "2,000 tokens" in stdout and "verified" in stdout
    merged, whole = SoftLabelStore(out), SoftLabelStore(halves["whole"])
    assert len(merged) == len(whole) == 2000 and merged.complete
    assert merged.num_shards == SoftLabelStore(halves["first"]).num_shards + SoftLabelStore(halves["second"]).num_shards
    for field in ("indices", "logprobs", "tail_logprob"):
        assert torch.equal(getattr(merged[:], field), getattr(whole[:], field)), field
    assert torch.equal(merged.token_ids(), whole.token_ids())
    assert merged.window == 50
    source = merged.manifest["source"]
    assert [part["num_tokens"] for part in source["parts"]] == [1000, 1000] and source["num_tokens"] == 2000
    code, _, err = run_kdfast(["store", "verify", "--quiet", out, halves["whole"]])
    assert code == 0, err
    code, stdout, _ = run_kdfast(["store", "info", "--json", "--sample-tokens", "0", out, halves["first"]])
    assert code == 0 and [summary["tokens"] for summary in json.loads(stdout)] == [2000, 1000]


@pytest.mark.parametrize("variant, field", [("k", "k"), ("temperature", "temperature"), ("dtypes", "dtypes")])
def test_merge_refuses_stores_that_differ(halves, tmp_path, run_kdfast, variant, field):
    out = tmp_path / "merged"
    code, _, err = run_kdfast(["store", "merge", out, halves["first"], halves[variant]])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"field '{field}'" in err and str(halves[variant]) in err
    assert not (out / "manifest.json").exists()


def test_merge_refuses_a_window_cut_between_stores(halves, tmp_path, run_kdfast):
    code, _, err = run_kdfast(["store", "merge", tmp_path / "merged", halves["odd"], halves["second"]])
    assert code == 2 and "not a multiple of its teacher window 50" in err and "put it last" in err
    code, _, err = run_kdfast(["store", "merge", tmp_path / "merged", halves["second"], halves["odd"]])
    assert code == 0, err  # last is fine


def test_merge_refuses_incomplete_inputs_and_existing_outputs(halves, tmp_path, run_kdfast):
    incomplete = tmp_path / "incomplete"
    with SoftLabelStore.create(incomplete, vocab_size=256, k=8, temperature=1.0) as writer:
        writer.append(SoftLabelStore(halves["first"])[:10])
    code, _, err = run_kdfast(["store", "merge", tmp_path / "merged", halves["first"], incomplete])
    assert code == 2 and "is not complete" in err
    code, _, err = run_kdfast(["store", "merge", halves["whole"], halves["first"]])
    assert code == 2 and "already holds a store" in err


def test_verify_reports_every_bad_store_and_checks_the_rest(halves, tmp_path, run_kdfast):
    missing = tmp_path / "missing"
    code, out, err = run_kdfast(["store", "verify", missing, halves["first"], tmp_path])
    assert code == 2
    errors = [line for line in err.strip().splitlines() if "kdfast store verify: error:" in line]
    assert len(errors) == 2
    assert f"{missing} does not exist" in errors[0] and "not a soft-label store" in errors[1]
    assert "OK: 1,000 tokens" in out
