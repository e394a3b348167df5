"""`kdfast store info` and `kdfast store verify` (kdfast.store_cli) on small stores written by `kdfast compress`.

`info` must report the store's parameters as the store reads them, and its coverage table
must equal the kept mass computed from the stored rows directly (the sample covers every
row of a small store). `verify` exits 0 on an intact store and 2, in one line naming the
damaged file, after one byte of a shard file is flipped. Not-a-store paths are one-line
errors.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from kdfast import cli, compress_topk
from kdfast.store import SoftLabelStore
from kdfast.store_cli import coverage_sample


@pytest.fixture(scope="module")
def written_store(toy, tmp_path_factory):
    """A complete float32 store over the toy stream (k = 16, 4 shards)."""
    directory = tmp_path_factory.mktemp("stores")
    common = ["--teacher", toy.teacher, "--data", toy.data, "--k", "16", "--seq-len", "50", "--batch-size", "2",
              "--shard-tokens", "500", "--dtype", "float32", "--no-fsync", "--quiet"]
    assert cli.main(["compress", *common, "--out", str(directory / "complete")]) == 0
    return directory / "complete"


def test_info_reports_the_parameters(written_store, run_kdfast):
    code, out, err = run_kdfast(["store", "info", written_store])
    assert code == 0, err
    store = SoftLabelStore(written_store)
    assert f"store: {os.path.abspath(written_store)} (complete)" in out
    assert "tokens: 2,000 in 4 shards" in out
    assert "k: 16  vocabulary: 256  temperature: 1" in out
    assert "dtypes: indices uint16, logprobs float32, tail_logprob float32, token_ids uint16" in out
    per_token = store.bytes_per_token
    assert f"bytes/token: {per_token['soft_labels']} soft labels + {per_token['token_ids']} token ids" in out
    assert f"teacher: {store.manifest['teacher']}" in out


def test_info_table_equals_the_mass_of_the_stored_rows(written_store, run_kdfast):
    code, out, _ = run_kdfast(["store", "info", written_store])
    assert code == 0
    labels = SoftLabelStore(written_store)[:]
    probabilities = np.exp(labels.logprobs.double().numpy())
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == [1, 2, 4, 8, 16]
    assert rows[-1][-3:] == ["<-", "stored", "k"]
    for row in rows:
        k = int(row[0])
        kept = probabilities[:, :k].sum(-1) if k < 16 else 1 - np.exp(labels.tail_logprob.double().numpy())
        assert float(row[1].rstrip("%")) == pytest.approx(100 * kept.mean(), abs=0.006)
        assert float(row[2].rstrip("%")) == pytest.approx(100 * np.percentile(kept, 5), abs=0.006)
        assert int(row[3]) == k * (2 + 4) + 4  # uint16 index + float32 logprob per entry, float32 tail


@pytest.mark.parametrize("sample, rows_read", [(2000, 2000), (100, 96), (0, 0)])
def test_coverage_sample_size(written_store, sample, rows_read):
    rows, count = coverage_sample(SoftLabelStore(written_store), sample)
    assert count == rows_read and len(rows) == (5 if sample else 0)


def test_info_json(written_store, run_kdfast):
    code, out, _ = run_kdfast(["store", "info", written_store, "--json", "--sample-tokens", "1000"])
    assert code == 0
    info = json.loads(out)
    assert (info["tokens"], info["shards"], info["k"], info["vocab_size"], info["complete"]) == (2000, 4, 16, 256, True)
    assert info["coverage_sample_tokens"] == 992 and [row["k"] for row in info["coverage"]] == [1, 2, 4, 8, 16]


def test_info_of_an_incomplete_store_says_so(tmp_path, run_kdfast):
    logits = torch.randn(300, 40, generator=torch.Generator().manual_seed(0))
    writer = SoftLabelStore.create(tmp_path / "partial", vocab_size=40, k=4, temperature=2.0, shard_tokens=100,
                                   source={"num_tokens": 1000}, durable=False)
    writer.append(compress_topk(logits, 4, temperature=2.0))
    writer.close(complete=False)  # what an interrupted run leaves
    code, text, err = run_kdfast(["store", "info", tmp_path / "partial"])
    assert code == 0, err
    assert "(incomplete: 300 of 1,000 source tokens (resume with kdfast compress --resume))" in text
    assert "k: 4  vocabulary: 40  temperature: 2" in text and "tokens: 300 in 3 shards" in text


def test_verify_passes_an_intact_store(written_store, run_kdfast):
    code, out, err = run_kdfast(["store", "verify", written_store])
    assert code == 0, err
    assert "OK: 2,000 tokens in 4 shard(s), every checksum matches" in out


def test_verify_fails_a_flipped_byte_in_one_line(written_store, tmp_path, run_kdfast):
    damaged = tmp_path / "damaged"
    shutil.copytree(written_store, damaged)
    shard_files = sorted(path for path in damaged.rglob("*") if path.is_file() and path.name != "manifest.json"
                         and not path.name.startswith("."))
    victim = max(shard_files, key=lambda path: path.stat().st_size)
    payload = bytearray(victim.read_bytes())
    payload[-1] ^= 0xFF
    victim.write_bytes(bytes(payload))
    code, _, err = run_kdfast(["store", "verify", damaged, "--quiet"])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdfast store verify: error: ") and victim.name in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["info", "verify"])
def test_not_a_store_is_one_line(tmp_path, run_kdfast, command):
    code, _, err = run_kdfast(["store", command, tmp_path])
    assert code == 2 and err.strip() == f"kdfast store {command}: error: {tmp_path} is not a soft-label store " \
                                        "(no manifest.json)"
    code, _, err = run_kdfast(["store", command, tmp_path / "absent"])
    assert code == 2 and err.strip() == f"kdfast store {command}: error: {tmp_path / 'absent'} does not exist"


def test_store_needs_a_subcommand(run_kdfast):
    code, _, err = run_kdfast(["store"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "required" in err
