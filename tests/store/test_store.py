"""Tests of `kdfast.store.SoftLabelStore`: round trip, format, resume, crash safety, corruption.

Soft labels are built here from seeded random logits with `torch.topk` and `log_softmax`
(independent of the compressor under test elsewhere); the store must return exactly the
input rounded to its storage dtypes. The crash test runs a writer in a subprocess, kills
it with SIGKILL while it commits shards, and checks that what is left is a consistent,
checksum-clean prefix of the stream that a resumed writer completes.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from kdfast.softlabels import SoftLabels
from kdfast.store import (
    CorruptShardError,
    SoftLabelStore,
    SoftLabelStoreError,
    SoftLabelWindowDataset,
    StoreMismatchError,
    soft_label_bytes_per_token,
)
from kdfast.store.manifest import write_manifest


def random_soft_labels(rows: int, vocab_size: int, k: int, *, temperature: float = 1.0, seed: int = 0) -> SoftLabels:
    """Top-k soft labels [rows, k] (int32 indices, float32 values) of seeded random logits."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab_size, generator=generator) * 3.0
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    kept, indices = logprobs.topk(k, dim=-1)
    outside = logprobs.scatter(-1, indices, float("-inf"))
    return SoftLabels(
        indices=indices.to(torch.int32),
        logprobs=kept,
        tail_logprob=torch.logsumexp(outside, dim=-1),
        temperature=temperature,
        vocab_size=vocab_size,
    )


def random_token_ids(rows: int, vocab_size: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (rows,), generator=torch.Generator().manual_seed(seed))


def as_stored(labels: SoftLabels, logprob_dtype: torch.dtype) -> SoftLabels:
    """The values a store with `logprob_dtype` must give back (indices compared as int64)."""
    return labels.to(index_dtype=torch.int64, logprob_dtype=logprob_dtype, tail_dtype=torch.float32)


def assert_same_soft_labels(actual: SoftLabels, expected: SoftLabels) -> None:
    assert actual.k == expected.k and actual.vocab_size == expected.vocab_size
    assert actual.temperature == expected.temperature
    actual = actual.to(index_dtype=torch.int64)
    expected = expected.to(index_dtype=torch.int64)
    assert torch.equal(actual.indices, expected.indices)
    assert actual.logprobs.dtype == expected.logprobs.dtype
    assert torch.equal(actual.logprobs, expected.logprobs)
    assert torch.equal(actual.tail_logprob, expected.tail_logprob)


def write_store(directory, labels: SoftLabels, *, shard_tokens: int, chunks=(37, 100, 5), token_ids=None,
                **create_args):
    """Writes `labels` (rows appended in chunks of the given sizes, cycling) and closes the writer."""
    with SoftLabelStore.create(
        directory,
        vocab_size=labels.vocab_size,
        k=labels.k,
        temperature=labels.temperature,
        shard_tokens=shard_tokens,
        with_token_ids=token_ids is not None,
        **create_args,
    ) as writer:
        position, chunk_number = 0, 0
        rows = labels.shape[0]
        while position < rows:
            stop = min(rows, position + chunks[chunk_number % len(chunks)])
            writer.append(labels[position:stop], None if token_ids is None else token_ids[position:stop])
            position, chunk_number = stop, chunk_number + 1
    return SoftLabelStore(directory)


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize(
    "vocab_size, logprob_dtype, expected_index_dtype",
    [(300, torch.float16, "uint16"), (1271, torch.bfloat16, "uint16"), (70001, torch.float32, "int32")],
    ids=["V300-fp16", "V1271-bf16", "V70001-fp32"],
)
def test_round_trip_reads_back_every_range(tmp_path, vocab_size, logprob_dtype, expected_index_dtype):
    rows, k, shard_tokens = 333, 7, 64
    labels = random_soft_labels(rows, vocab_size, k, temperature=1.7, seed=vocab_size)
    token_ids = random_token_ids(rows, vocab_size)
    store = write_store(
        tmp_path / "store", labels, shard_tokens=shard_tokens, token_ids=token_ids, logprob_dtype=logprob_dtype
    )
    expected = as_stored(labels, logprob_dtype)

    assert len(store) == rows and store.complete is False
    assert store.dtypes["indices"] == expected_index_dtype
    assert store.shard_ranges() == [(start, min(start + shard_tokens, rows)) for start in range(0, rows, shard_tokens)]
    for start, stop in [(0, rows), (0, 1), (63, 65), (10, 200), (128, 192), (rows - 5, rows), (50, 50)]:
        assert_same_soft_labels(store[start:stop], expected[start:stop])
        assert torch.equal(store.token_ids(start, stop), token_ids[start:stop])
    assert_same_soft_labels(store[-10:], expected[-10:])
    assert_same_soft_labels(store[200:10_000], expected[200:])
    single = store[70]
    assert single.shape == torch.Size([]) and single.indices.shape == (k,)
    assert_same_soft_labels(single, expected[70])
    assert_same_soft_labels(store[-1], expected[rows - 1])
    assert_same_soft_labels(SoftLabels.cat(list(store)), expected)
    with pytest.raises(IndexError):
        store[rows]
    with pytest.raises(IndexError):
        store[0:10:2]


def test_read_returns_storage_dtypes_and_valid_soft_labels(tmp_path):
    labels = random_soft_labels(100, 500, 16, seed=3)
    store = write_store(tmp_path / "store", labels, shard_tokens=40)
    read = store[0:100]
    assert (read.indices.dtype, read.logprobs.dtype, read.tail_logprob.dtype) == (
        torch.uint16,
        torch.float16,
        torch.float32,
    )
    assert read.logprobs.shape == (100, 16) and read.tail_logprob.shape == (100,)
    read.validate()  # sorted, in range, kept mass + tail mass = 1 within fp16 accuracy


def test_bytes_per_token_matches_the_files_and_the_budget(tmp_path):
    for vocab_size, k, index_bytes in [(300, 8, 2), (70001, 8, 4)]:
        labels = random_soft_labels(150, vocab_size, k, seed=k)
        store = write_store(
            tmp_path / f"V{vocab_size}", labels, shard_tokens=64, token_ids=random_token_ids(150, vocab_size)
        )
        per_token = store.bytes_per_token
        assert per_token["soft_labels"] == k * (index_bytes + 2) + 4
        assert per_token["soft_labels"] == soft_label_bytes_per_token(k, store.dtypes["indices"], "float16")
        assert per_token["soft_labels"] <= 6 * k + 4  # the budget
        assert per_token["token_ids"] == index_bytes
        payload = 0
        for shard in store.manifest["shards"]:
            for entry in shard["files"].values():
                path = os.path.join(store.directory, entry["file"])
                array = np.load(path, mmap_mode="r")
                assert os.path.getsize(path) == entry["bytes"]
                payload += array.nbytes
        assert payload == len(store) * per_token["total"]
        assert store.nbytes > payload  # plus one .npy header per file


def test_manifest_records_the_run(tmp_path):
    labels = random_soft_labels(70, 300, 5, temperature=2.0)
    store = write_store(
        tmp_path / "store",
        labels,
        shard_tokens=32,
        teacher="my/teacher",
        tokenizer="my/tokenizer",
        source={"dataset": "unit-test", "seq_len": 35},
        metadata={"note": "free text"},
    )
    with open(tmp_path / "store" / "manifest.json") as handle:
        manifest = json.load(handle)
    assert manifest["format"] == "kdfast.SoftLabelStore" and manifest["format_version"] == 2
    assert (manifest["vocab_size"], manifest["k"], manifest["temperature"]) == (300, 5, 2.0)
    assert manifest["dtypes"] == {"indices": "uint16", "logprobs": "float16", "tail_logprob": "float32",
                                  "token_ids": None}
    assert manifest["teacher"] == "my/teacher" and manifest["tokenizer"] == "my/tokenizer"
    assert manifest["source"] == {"dataset": "unit-test", "seq_len": 35}
    assert manifest["metadata"] == {"note": "free text"}
    assert manifest["checksum"] in ("xxh3_128", "blake2b-128")
    assert manifest["num_tokens"] == 70 and len(manifest["shards"]) == 3
    assert [shard["start"] for shard in manifest["shards"]] == [0, 32, 64]
    assert [shard["stop"] for shard in manifest["shards"]] == [32, 64, 70]
    assert store.temperature == 2.0 and store.k == 5 and store.vocab_size == 300
    assert not store.has_token_ids
    with pytest.raises(SoftLabelStoreError, match="without token ids"):
        store.token_ids(0, 1)


# --------------------------------------------------------------------------- writer checks
def test_append_rejects_mismatched_soft_labels_and_token_ids(tmp_path):
    with SoftLabelStore.create(tmp_path / "store", vocab_size=300, k=8, temperature=1.0, with_token_ids=True) as writer:
        good = random_soft_labels(10, 300, 8)
        with pytest.raises(StoreMismatchError, match="k, vocab_size, temperature"):
            writer.append(random_soft_labels(10, 300, 4), random_token_ids(10, 300))
        with pytest.raises(StoreMismatchError):
            writer.append(random_soft_labels(10, 300, 8, temperature=2.0), random_token_ids(10, 300))
        with pytest.raises(StoreMismatchError):
            writer.append(random_soft_labels(10, 301, 8), random_token_ids(10, 300))
        with pytest.raises(ValueError, match="pass token_ids"):
            writer.append(good)
        with pytest.raises(ValueError, match="9 elements"):
            writer.append(good, random_token_ids(9, 300))
        with pytest.raises(ValueError, match="token ids must lie in"):
            writer.append(good, torch.full((10,), 70000))
        writer.append(good, random_token_ids(10, 300))
    assert len(SoftLabelStore(tmp_path / "store")) == 10


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"vocab_size": 0, "k": 1}, "vocab_size"),
        ({"vocab_size": 10, "k": 11}, "k must"),
        ({"vocab_size": 10, "k": 2, "temperature": 0.0}, "temperature"),
        ({"vocab_size": 70000, "k": 2, "index_dtype": "uint16"}, "cannot hold"),
        ({"vocab_size": 10, "k": 2, "logprob_dtype": "int8"}, "logprob_dtype"),
        ({"vocab_size": 10, "k": 2, "shard_tokens": 0}, "shard_tokens"),
    ],
)
def test_create_rejects_bad_parameters(tmp_path, arguments, message):
    arguments = {"temperature": 1.0, **arguments}
    with pytest.raises(ValueError, match=message):
        SoftLabelStore.create(tmp_path / "store", **arguments)


def test_existing_store_needs_resume_or_overwrite(tmp_path):
    directory = tmp_path / "store"
    write_store(directory, random_soft_labels(50, 300, 4), shard_tokens=16)
    (directory / "README.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="resume"):
        SoftLabelStore.create(directory, vocab_size=300, k=4, temperature=1.0)
    replacement = random_soft_labels(20, 300, 4, seed=9)
    store = write_store(directory, replacement, shard_tokens=16, overwrite=True)
    assert len(store) == 20 and store.num_shards == 2
    assert_same_soft_labels(store[:], as_stored(replacement, torch.float16))
    assert (directory / "README.txt").read_text() == "user file"
    assert not (directory / "shard-000003.indices.npy").exists()


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    directory = tmp_path / "store"
    writer = SoftLabelStore.create(directory, vocab_size=300, k=4, temperature=1.0)
    try:
        with pytest.raises(SoftLabelStoreError, match="another process"):
            SoftLabelStore.create(directory, vocab_size=300, k=4, temperature=1.0, resume=True)
    finally:
        writer.close()
    SoftLabelStore.create(directory, vocab_size=300, k=4, temperature=1.0, resume=True).close()


# --------------------------------------------------------------------------- resume
def test_exception_discards_uncommitted_rows_and_resume_completes_the_stream(tmp_path):
    directory = tmp_path / "store"
    labels = random_soft_labels(300, 300, 6, seed=5)
    create_args = dict(vocab_size=300, k=6, temperature=1.0, shard_tokens=64, teacher="t", source={"n": 300})
    with pytest.raises(RuntimeError, match="teacher crashed"):
        with SoftLabelStore.create(directory, **create_args) as writer:
            writer.append(labels[:150])
            assert (writer.num_tokens, writer.pending_tokens) == (128, 22)
            raise RuntimeError("teacher crashed")
    assert sorted(name for name in os.listdir(directory) if "tmp" in name) == []
    assert len(SoftLabelStore(directory)) == 128

    with SoftLabelStore.create(directory, resume=True, **create_args) as writer:
        assert writer.num_tokens == 128
        writer.append(labels[writer.num_tokens :])
        writer.close(complete=True)
    store = SoftLabelStore(directory)
    assert store.complete and len(store) == 300
    store.verify()
    assert_same_soft_labels(store[:], as_stored(labels, torch.float16))
    with pytest.raises(SoftLabelStoreError, match="complete"):
        with SoftLabelStore.create(directory, resume=True, **create_args) as writer:
            writer.append(labels[:1])


@pytest.mark.parametrize(
    "changed, field",
    [
        ({"k": 5}, "k"),
        ({"temperature": 2.0}, "temperature"),
        ({"vocab_size": 301}, "vocab_size"),
        ({"teacher": "other-teacher"}, "teacher"),
        ({"logprob_dtype": "bfloat16"}, "dtypes"),
        ({"with_token_ids": True}, "dtypes"),
        ({"source": {"n": 301}}, "source"),
    ],
)
def test_resume_with_different_parameters_is_an_error(tmp_path, changed, field):
    directory = tmp_path / "store"
    create_args = dict(vocab_size=300, k=6, temperature=1.0, shard_tokens=64, teacher="t", source={"n": 300})
    write_store(directory, random_soft_labels(100, 300, 6), shard_tokens=64, teacher="t", source={"n": 300})
    with pytest.raises(StoreMismatchError, match=rf"(?s)cannot resume.*\b{field}: stored"):
        SoftLabelStore.create(directory, resume=True, **{**create_args, **changed})
    # the refused resume changed nothing and released the lock
    SoftLabelStore.create(directory, resume=True, **create_args).close()
    assert len(SoftLabelStore(directory)) == 100


def test_files_outside_the_manifest_are_ignored_then_cleaned(tmp_path):
    directory = tmp_path / "store"
    labels = random_soft_labels(100, 300, 4)
    write_store(directory, labels, shard_tokens=64)  # shards 0 and 1
    orphan = directory / "shard-000002.indices.npy"  # a shard renamed before its manifest update
    np.save(orphan, np.zeros((64, 4), np.uint16))
    temporary = directory / ".shard-000002.logprobs.npy.tmp-12345"  # a write cut short
    temporary.write_bytes(b"\x93NUMPY partial")
    store = SoftLabelStore(directory)
    assert len(store) == 100 and store.num_shards == 2
    store.verify()
    SoftLabelStore.create(directory, vocab_size=300, k=4, temperature=1.0, shard_tokens=64, resume=True).close()
    assert not orphan.exists() and not temporary.exists()


# --------------------------------------------------------------------------- corruption
@pytest.fixture
def small_store(tmp_path):
    labels = random_soft_labels(200, 300, 8, seed=11)
    return write_store(tmp_path / "store", labels, shard_tokens=64, token_ids=random_token_ids(200, 300))


def test_truncated_shard_is_named_on_open(small_store):
    path = os.path.join(small_store.directory, "shard-000001.logprobs.npy")
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 10)
    with pytest.raises(CorruptShardError, match=r"shard-000001\.logprobs\.npy has \d+ bytes.*truncated"):
        SoftLabelStore(small_store.directory)
    # an already open store notices when it first maps the shard
    with pytest.raises(CorruptShardError, match=r"shard-000001\.logprobs\.npy"):
        small_store[64:65]


def test_missing_shard_is_named_on_open(small_store):
    os.remove(os.path.join(small_store.directory, "shard-000002.indices.npy"))
    with pytest.raises(CorruptShardError, match=r"shard-000002\.indices\.npy .*missing"):
        SoftLabelStore(small_store.directory)


def test_tampered_shard_fails_its_checksum(small_store):
    path = os.path.join(small_store.directory, "shard-000002.tail_logprob.npy")
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x40  # same size, one payload bit flipped
    open(path, "wb").write(bytes(data))

    store = SoftLabelStore(small_store.directory)  # size check passes
    assert_same_soft_labels(store[0:128], small_store[0:128])  # untouched shards read fine
    with pytest.raises(CorruptShardError, match=r"shard-000002\.tail_logprob\.npy fails its .* checksum"):
        store[130:131]
    unchecked = SoftLabelStore(small_store.directory, verify="size")
    with pytest.raises(CorruptShardError, match=r"shard-000002\.tail_logprob\.npy fails its sampled"):
        unchecked[130:131]  # files this small are sampled whole
    with pytest.raises(CorruptShardError, match=r"(?s)1 corrupt shard file.*shard-000002\.tail_logprob\.npy"):
        unchecked.verify()
    with pytest.raises(CorruptShardError, match=r"shard-000002"):
        SoftLabelStore.create(
            small_store.directory, vocab_size=300, k=8, temperature=1.0, with_token_ids=True, resume=True
        )


def test_shard_with_a_wrong_header_is_detected_even_with_a_matching_checksum(small_store):
    directory = small_store.directory
    path = os.path.join(directory, "shard-000000.logprobs.npy")
    values = np.load(path)
    np.save(path, values.view(np.uint16))  # same size, dtype uint16 instead of float16
    manifest_path = os.path.join(directory, "manifest.json")
    manifest = json.load(open(manifest_path))
    entry = manifest["shards"][0]["files"]["logprobs"]
    from kdfast.store import file_checksum

    entry["checksum"] = file_checksum(path, manifest["checksum"])
    write_manifest(directory, manifest, durable=False)  # a consistent manifest with a fresh checksum
    with pytest.raises(CorruptShardError, match=r"shard-000000\.logprobs\.npy holds uint16"):
        SoftLabelStore(directory)


# --------------------------------------------------------------------------- data loading
def test_store_pickles_without_open_maps_and_feeds_dataloader_workers(small_store):
    small_store[0:200]  # checks every shard in this process
    assert small_store._verified == set(range(small_store.num_shards))
    clone = pickle.loads(pickle.dumps(small_store))
    assert clone._verified == set()  # each process checks the shards it reads
    assert_same_soft_labels(clone[5:150], small_store[5:150])

    dataset = SoftLabelWindowDataset(small_store, seq_len=30)
    assert len(dataset) == 6  # 200 // 30, the short last window dropped
    assert len(SoftLabelWindowDataset(small_store, seq_len=30, drop_last=False)) == 7
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    batches = list(loader)
    assert [batch["indices"].shape[0] for batch in batches] == [4, 2]
    for batch_number, batch in enumerate(batches):
        soft_labels = dataset.to_soft_labels(batch)
        assert soft_labels.indices.shape[1:] == (30, 8) and soft_labels.indices.dtype == torch.int64
        for row in range(batch["indices"].shape[0]):
            start = (batch_number * 4 + row) * 30
            assert_same_soft_labels(soft_labels[row], small_store[start : start + 30])
            assert torch.equal(batch["input_ids"][row], small_store.token_ids(start, start + 30))


# --------------------------------------------------------------------------- crash safety
_KILLED_WRITER = (
    """
    import torch
    from kdfast.softlabels import SoftLabels
    from kdfast.store import SoftLabelStore

    {builder}

    labels = random_soft_labels({rows}, 300, 4, seed=21)
    writer = SoftLabelStore.create({directory!r}, vocab_size=300, k=4, temperature=1.0,
                                   shard_tokens={shard_tokens}, resume=True)
    position = writer.num_tokens
    while position < {rows}:  # 10-row appends, each crossing shard boundaries sooner or later
        writer.append(labels[position:position + 10])
        position += 10
    writer.close(complete=True)
    """
)


def test_writer_killed_mid_run_leaves_a_consistent_prefix_that_resume_completes(tmp_path):
    directory = str(tmp_path / "store")
    rows, shard_tokens = 1500, 48
    script = tmp_path / "writer.py"
    script.write_text(
        textwrap.dedent(_KILLED_WRITER).format(
            builder=inspect.getsource(random_soft_labels), directory=directory, rows=rows, shard_tokens=shard_tokens
        )
    )
    process = subprocess.Popen([sys.executable, str(script)])
    manifest_path = os.path.join(directory, "manifest.json")
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if os.path.exists(manifest_path):
                with open(manifest_path) as handle:
                    if len(json.load(handle)["shards"]) >= 3:
                        break
            time.sleep(0.005)
        assert process.poll() is None, "the writer finished before it could be killed; make the stream longer"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    expected = as_stored(random_soft_labels(rows, 300, 4, seed=21), torch.float16)
    survivor = SoftLabelStore(directory)
    survivor.verify()
    assert 3 * shard_tokens <= len(survivor) < rows and len(survivor) % shard_tokens == 0
    assert not survivor.complete
    assert_same_soft_labels(survivor[:], expected[: len(survivor)])

    labels = random_soft_labels(rows, 300, 4, seed=21)
    with SoftLabelStore.create(directory, vocab_size=300, k=4, temperature=1.0, shard_tokens=shard_tokens,
                               resume=True) as writer:
        assert writer.num_tokens == len(survivor)
        writer.append(labels[writer.num_tokens :])
        writer.close(complete=True)
    store = SoftLabelStore(directory)
    store.verify()
    assert store.complete and len(store) == rows
    assert_same_soft_labels(store[:], expected)
    assert not [name for name in os.listdir(directory) if ".tmp-" in name]
