"""Seeded fuzz of damaged soft-label stores: a store is either rejected clearly or read back exactly.

Each case copies a small committed store, damages one of its files (the manifest or any shard
file) in one random way — a flipped bit, a random byte, a truncation, appended bytes, the whole
file replaced by random bytes, or the file removed — and then opens, verifies and reads the
store. The only acceptable outcomes are a `SoftLabelStoreError` (the store's own error type,
which names the file) or soft labels and token ids identical to the originals (a change the
format ignores, such as JSON whitespace). A crash with any other exception, a hang or a wrong
value fails the test.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest
import torch
from test_store import random_soft_labels, random_token_ids, write_store

from kdfast.store import SoftLabelStore, SoftLabelStoreError

ROWS, VOCAB, K, SHARD = 150, 300, 6, 64
CASES = 60
MUTATIONS = ("flip bit", "random byte", "truncate", "append", "replace", "remove")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz") / "store"
    labels = random_soft_labels(ROWS, VOCAB, K, seed=11)
    write_store(directory, labels, shard_tokens=SHARD, token_ids=random_token_ids(ROWS, VOCAB),
                teacher="t", source={"seq_len": 30}, metadata={"note": "fuzz"})
    store = SoftLabelStore(directory)
    return directory, store[:], store.token_ids()


def damage(path: str, mutation: str, rng: random.Random) -> None:
    """Applies one mutation to the file at `path`."""
    if mutation == "remove":
        os.remove(path)
        return
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    if mutation == "flip bit":
        position = rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
    elif mutation == "random byte":
        position = rng.randrange(len(data))
        data[position] = (data[position] + rng.randrange(1, 256)) % 256
    elif mutation == "truncate":
        data = data[:rng.randrange(len(data))]
    elif mutation == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    elif mutation == "replace":
        data = bytearray(rng.randrange(256) for _ in range(rng.randrange(0, 2 * len(data) + 1)))
    with open(path, "wb") as handle:
        handle.write(bytes(data))


def read_everything(directory) -> tuple:
    store = SoftLabelStore(directory)
    store.verify()
    return store[:], store.token_ids()


@pytest.mark.parametrize("case", range(CASES))
def test_a_damaged_store_is_rejected_or_read_back_exactly(original, tmp_path, case):
    directory, labels, token_ids = original
    rng = random.Random(case)
    copy = tmp_path / "store"
    shutil.copytree(directory, copy)
    files = sorted(name for name in os.listdir(copy) if name.endswith((".json", ".npy")))
    target = rng.choice(files)
    mutation = MUTATIONS[case % len(MUTATIONS)]
    damage(os.path.join(copy, target), mutation, rng)
    try:
        back, back_ids = read_everything(copy)
    except SoftLabelStoreError as error:
        assert str(error), f"{mutation} of {target}: empty message"
        return
    assert torch.equal(back.indices.long(), labels.indices.long()), f"{mutation} of {target}"
    assert torch.equal(back.logprobs, labels.logprobs), f"{mutation} of {target}"
    assert torch.equal(back.tail_logprob, labels.tail_logprob), f"{mutation} of {target}"
    assert back.temperature == labels.temperature and back.vocab_size == labels.vocab_size
    assert torch.equal(back_ids, token_ids), f"{mutation} of {target}"


def test_every_file_and_mutation_is_drawn(original):
    """The seeded cases reach the manifest and the shard files with every mutation."""
    directory = original[0]
    files = sorted(name for name in os.listdir(directory) if name.endswith((".json", ".npy")))
    drawn = {(random.Random(case).choice(files), MUTATIONS[case % len(MUTATIONS)]) for case in range(CASES)}
    assert {name for name, _ in drawn} >= {"manifest.json"}
    assert {mutation for _, mutation in drawn} == set(MUTATIONS)
    assert len({name for name, _ in drawn}) >= len(files) // 2
