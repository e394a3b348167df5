"""Tests that a damaged, edited or inconsistent soft-label store is never read back as valid.

Every manifest field edited by hand must raise `ManifestError` naming manifest.json and the
field (through the manifest checksum when the edit leaves the manifest self-consistent,
through the cross-checks when the checksum is recomputed over an inconsistent manifest);
shard files swapped, truncated, replaced or damaged must raise `CorruptShardError` naming
the file; a store written by format version 1 (no manifest checksum) still opens, with a
warning, and resuming upgrades it. A store with more shards than the open-file limit reads
fine because reads keep no file open (checked in a subprocess with RLIMIT_NOFILE lowered).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from test_store import as_stored, assert_same_soft_labels, random_soft_labels, random_token_ids, write_store

from kdfast.store import CorruptShardError, ManifestError, SoftLabelStore, SoftLabelStoreError
from kdfast.store.manifest import write_manifest

ROWS, VOCAB, K, SHARD = 200, 300, 8, 64


@pytest.fixture
def store(tmp_path):
    labels = random_soft_labels(ROWS, VOCAB, K, seed=5)
    return write_store(tmp_path / "store", labels, shard_tokens=SHARD, token_ids=random_token_ids(ROWS, VOCAB),
                       teacher="t", source={"seq_len": 40}, metadata={"note": "x"})


def manifest_path(store: SoftLabelStore) -> str:
    return os.path.join(store.directory, "manifest.json")


def load_manifest(store: SoftLabelStore) -> dict:
    with open(manifest_path(store)) as handle:
        return json.load(handle)


def save_manifest_by_hand(store: SoftLabelStore, manifest: dict) -> None:
    """Writes the manifest as an editor would: the checksum is left as it was."""
    with open(manifest_path(store), "w") as handle:
        json.dump(manifest, handle, indent=1)


def edit(manifest: dict, change: str) -> None:
    """Applies one named hand edit to a manifest in place."""
    shards = manifest["shards"]
    if change == "temperature":
        manifest["temperature"] = 2.0
    elif change == "vocab_size":
        manifest["vocab_size"] = 512
    elif change == "k":
        manifest["k"] = 4
    elif change == "dtypes":
        manifest["dtypes"]["logprobs"] = "bfloat16"
    elif change == "teacher":
        manifest["teacher"] = "another teacher"
    elif change == "source":
        manifest["source"]["seq_len"] = 41
    elif change == "complete":
        manifest["complete"] = not manifest["complete"]
    elif change == "num_tokens":
        manifest["num_tokens"] -= 1
    elif change == "shards[1]":
        shards[1]["stop"] -= 1
    elif change == "shards[0]":
        shards[0]["files"], shards[1]["files"] = shards[1]["files"], shards[0]["files"]
    elif change == "shards":
        shards.pop()
    elif change == "extra":
        manifest["extra"] = 1
    elif change == "metadata":
        del manifest["metadata"]
    elif change == "manifest_checksum":
        del manifest["manifest_checksum"]
    else:
        raise AssertionError(change)


EDITS = ["temperature", "vocab_size", "k", "dtypes", "teacher", "source", "complete", "num_tokens", "shards[1]",
         "shards[0]", "shards", "extra", "metadata", "manifest_checksum"]


@pytest.mark.parametrize("change", EDITS)
def test_every_hand_edit_of_the_manifest_is_named(store, change):
    manifest = load_manifest(store)
    edit(manifest, change)
    save_manifest_by_hand(store, manifest)
    with pytest.raises(ManifestError, match=r"manifest\.json") as caught:
        SoftLabelStore(store.directory)
    assert caught.value.field == change
    assert caught.value.path == manifest_path(store)
    assert repr(change) in str(caught.value)
    with pytest.raises(ManifestError):  # a writer refuses to resume it too
        SoftLabelStore.create(store.directory, vocab_size=VOCAB, k=K, temperature=1.0, with_token_ids=True,
                              teacher="t", source={"seq_len": 40}, resume=True)


# Edits that the manifest checksum cannot see (it is recomputed) but the cross-checks can.
INCONSISTENT = [
    ("temperature", lambda m: m.update(temperature=-1.0), ManifestError),
    ("k", lambda m: m.update(k=VOCAB + 1), ManifestError),
    ("dtypes.indices", lambda m: m["dtypes"].update(indices="float16"), ManifestError),
    ("dtypes.token_ids", lambda m: m["dtypes"].update(token_ids="int64"), ManifestError),
    ("bytes_per_token", lambda m: m.update(k=K - 1), ManifestError),
    ("shards[1].index", lambda m: m["shards"][1].update(index=2), ManifestError),
    ("shards[1].start", lambda m: m["shards"][1].update(start=SHARD + 1), ManifestError),
    ("shards[0].stop", lambda m: m["shards"][0].update(stop=0), ManifestError),
    ("shards[2].files", lambda m: m["shards"][2]["files"].pop("token_ids"), ManifestError),
    ("shards[1].files.logprobs.file",
     lambda m: m["shards"][1]["files"]["logprobs"].update(file="shard-000000.logprobs.npy"), ManifestError),
    ("shards[0].files.indices.bytes", lambda m: m["shards"][0]["files"]["indices"].update(bytes=10), ManifestError),
    ("num_tokens", lambda m: m.update(num_tokens=ROWS + 5), ManifestError),
    ("logprobs", lambda m: m["shards"][0]["files"]["logprobs"].update(bytes=m["shards"][0]["files"]["logprobs"]
                                                                        ["bytes"] + 64), CorruptShardError),
]


@pytest.mark.parametrize("field, change, error", INCONSISTENT, ids=[case[0] for case in INCONSISTENT])
def test_an_inconsistent_manifest_is_named_even_with_a_matching_checksum(store, field, change, error):
    manifest = load_manifest(store)
    change(manifest)
    write_manifest(store.directory, manifest, durable=False)
    with pytest.raises(error) as caught:
        SoftLabelStore(store.directory)
    assert caught.value.field == field


def test_a_smaller_vocabulary_than_the_stored_indices_is_caught_on_read(store):
    manifest = load_manifest(store)
    top = int(store[:].indices.to(torch.int64).max())
    manifest["vocab_size"] = top  # consistent for the manifest, contradicted by the shards
    write_manifest(store.directory, manifest, durable=False)
    edited = SoftLabelStore(store.directory)
    with pytest.raises(CorruptShardError, match=rf"holds index {top} .*outside \[0, vocab_size={top}\)") as caught:
        edited[:]
    assert caught.value.field == "vocab_size"


@pytest.mark.parametrize("verify", ["checksum", "size"])
def test_swapped_shard_files_are_never_read_as_the_other_shard(store, verify):
    directory = store.directory
    for field in ("indices", "logprobs", "tail_logprob", "token_ids"):
        first, second = (os.path.join(directory, f"shard-{n:06d}.{field}.npy") for n in (0, 1))
        os.rename(first, first + ".swap")
        os.rename(second, first)
        os.rename(first + ".swap", second)
    swapped = SoftLabelStore(directory, verify=verify)  # same sizes and headers
    with pytest.raises(CorruptShardError, match=r"shard-00000[01]\.\w+\.npy fails its .*checksum"):
        swapped[0:1]
    with pytest.raises(CorruptShardError, match=r"shard-000001\.\w+\.npy fails"):
        swapped[SHARD:SHARD + 1]
    with pytest.raises(CorruptShardError, match=r"(?s)2 corrupt shard file\(s\).*shard-000000.*shard-000001"):
        swapped.verify()


def test_fields_swapped_within_a_shard_fail_the_header_check(store):
    directory = store.directory
    indices, logprobs = (os.path.join(directory, f"shard-000001.{field}.npy") for field in ("indices", "logprobs"))
    os.rename(indices, indices + ".swap")
    os.rename(logprobs, indices)
    os.rename(indices + ".swap", logprobs)
    with pytest.raises(CorruptShardError, match=r"shard-000001\.indices\.npy holds float16\[64, 8\].*implies uint16"):
        SoftLabelStore(directory)


@pytest.mark.parametrize("cut", [1, 64, "header"])
def test_a_truncated_shard_is_named_on_open_and_after_open(store, cut):
    path = os.path.join(store.directory, "shard-000002.logprobs.npy")
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(100 if cut == "header" else size - cut)
    with pytest.raises(CorruptShardError, match=r"shard-000002\.logprobs\.npy has \d+ bytes.*truncated"):
        SoftLabelStore(store.directory)
    with pytest.raises(CorruptShardError, match=r"shard-000002\.logprobs\.npy was replaced or modified"):
        store[2 * SHARD:2 * SHARD + 1]  # opened before the truncation


def test_a_store_overwritten_while_open_is_not_read_silently(store, tmp_path):
    store[0:1]  # shard 0 checked in this process
    labels = random_soft_labels(ROWS, VOCAB, K, seed=99)
    write_store(store.directory, labels, shard_tokens=SHARD, token_ids=random_token_ids(ROWS, VOCAB), overwrite=True)
    with pytest.raises(CorruptShardError, match="replaced or modified after the store was opened"):
        store[0:1]
    assert_same_soft_labels(store.reload()[0:ROWS], as_stored(labels, torch.float16))


def test_size_mode_checks_both_ends_of_large_shard_files(tmp_path):
    rows = 10_000  # 160 KB index and logprob files: larger than the two sampled 64 KiB ends
    labels = random_soft_labels(rows, VOCAB, K, seed=3)
    directory = write_store(tmp_path / "large", labels, shard_tokens=rows).directory
    path = os.path.join(directory, "shard-000000.logprobs.npy")
    with open(path, "r+b") as handle:
        handle.seek(-2, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-2, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0x10]))
    with pytest.raises(CorruptShardError, match=r"shard-000000\.logprobs\.npy fails its sampled"):
        SoftLabelStore(directory, verify="size")[0:1]
    with pytest.raises(CorruptShardError, match=r"shard-000000\.logprobs\.npy fails its (blake2b-128|xxh3_128) "):
        SoftLabelStore(directory)[0:1]


def downgrade_to_version_1(store: SoftLabelStore) -> None:
    """Rewrites the manifest as format version 1 wrote it: no manifest checksum, no sampled checksums."""
    manifest = load_manifest(store)
    manifest["format_version"] = 1
    del manifest["manifest_checksum"]
    for shard in manifest["shards"]:
        for entry in shard["files"].values():
            del entry["sample"]
    save_manifest_by_hand(store, manifest)


def test_version_1_stores_open_with_a_warning_and_resume_upgrades_them(store):
    expected = store[:]
    downgrade_to_version_1(store)
    with pytest.warns(UserWarning, match="format version 1.*no manifest checksum"):
        old = SoftLabelStore(store.directory)
    assert_same_soft_labels(old[:], expected)
    old.verify()
    manifest = load_manifest(store)
    manifest["shards"][1]["stop"] += 1  # the cross-checks still apply to version 1
    save_manifest_by_hand(store, manifest)
    with pytest.warns(UserWarning), pytest.raises(ManifestError, match=r"'shards\[2\]\.start' is 128, expected 129"):
        SoftLabelStore(store.directory)
    manifest["shards"][1]["stop"] -= 1
    save_manifest_by_hand(store, manifest)

    with pytest.warns(UserWarning, match="upgrades it to version 2"):
        writer = SoftLabelStore.create(store.directory, vocab_size=VOCAB, k=K, temperature=1.0, with_token_ids=True,
                                       teacher="t", source={"seq_len": 40}, resume=True)
    writer.close()
    upgraded = load_manifest(store)
    assert upgraded["format_version"] == 2 and "manifest_checksum" in upgraded
    assert_same_soft_labels(SoftLabelStore(store.directory)[:], expected)


def test_store_errors_keep_their_file_and_field_through_pickling(store):
    manifest = load_manifest(store)
    manifest["temperature"] = 3.0
    save_manifest_by_hand(store, manifest)
    with pytest.raises(ManifestError) as caught:
        SoftLabelStore(store.directory)
    clone = pickle.loads(pickle.dumps(caught.value))
    assert isinstance(clone, ManifestError) and isinstance(clone, SoftLabelStoreError)
    assert (clone.path, clone.field, str(clone)) == (caught.value.path, "temperature", str(caught.value))


_MANY_SHARDS = """
import resource, torch
from kdfast.store import SoftLabelStore, SoftLabelWindowDataset
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
rows, vocab = 300, 50
generator = torch.Generator().manual_seed(0)
logits = torch.randn(rows, vocab, generator=generator)
from kdfast.functional import compress_topk
labels = compress_topk(logits, 3)
tokens = torch.randint(0, vocab, (rows,), generator=generator)
with SoftLabelStore.create({directory!r}, vocab_size=vocab, k=3, temperature=1.0, shard_tokens=3,
                           with_token_ids=True, durable=False) as writer:
    writer.append(labels, tokens)
store = SoftLabelStore({directory!r})
assert store.num_shards == 100, store.num_shards
store.verify()
back = store[:]
assert torch.equal(back.indices.to(torch.int64), labels.indices.to(torch.int64))
assert torch.equal(store.token_ids(), tokens)
dataset = SoftLabelWindowDataset(store, 10)
assert all(torch.equal(dataset[i]["input_ids"], tokens[10 * i:10 * i + 10]) for i in range(len(dataset)))
print("read", len(store), "rows from", store.num_shards, "shards")
"""


def test_a_store_with_more_shards_than_the_open_file_limit_reads_fine(tmp_path):
    script = textwrap.dedent(_MANY_SHARDS).format(directory=str(tmp_path / "many"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "read 300 rows from 100 shards" in result.stdout
    assert len(os.listdir(tmp_path / "many")) > 64 * 4  # 400 shard files, a manifest, the lock


def test_verify_reports_progress_once_per_shard_even_past_a_bad_one(store):
    seen = []
    store.verify(progress=lambda shard_number, tokens: seen.append((shard_number, tokens)))
    assert [number for number, _ in seen] == list(range(store.num_shards))
    assert [tokens for _, tokens in seen] == [stop - start for start, stop in store.shard_ranges()]
    path = os.path.join(store.directory, "shard-000000.logprobs.npy")
    with open(path, "r+b") as handle:  # one flipped bit in the payload, size and header intact
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    seen.clear()
    reopened = SoftLabelStore(store.directory, verify="size")
    with pytest.raises(CorruptShardError, match=r"shard-000000\.logprobs\.npy"):
        reopened.verify(progress=lambda shard_number, tokens: seen.append(shard_number))
    assert seen == list(range(store.num_shards))
