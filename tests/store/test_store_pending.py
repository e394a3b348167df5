"""Shards written but not committed (`kdfast.store.pending`) and the batch plan over a token range.

A resuming writer commits the pending shards that continue the store and whose files pass
their checksums, and drops the others (a gap, a damaged file, an entry of another store);
`batch_plan(..., start, stop)` yields exactly the calls of the whole plan that hold a token
of the range.
"""

from __future__ import annotations

import json

import pytest
from test_store import random_soft_labels

from kdfast.store import SoftLabelStore
from kdfast.store.pending import store_key, write_pending_entry, write_shard_files
from kdfast.store.writer import to_storage
from kdfast.token_stream import batch_plan

VOCAB, K, SHARD = 300, 4, 40


def pending_store(directory, shards, damage=None, foreign=()):
    """A store with no committed shard and the given shards (of SHARD rows) written as pending entries."""
    labels = random_soft_labels(SHARD * 4, VOCAB, K, seed=2)
    with SoftLabelStore.create(directory, vocab_size=VOCAB, k=K, temperature=1.0, shard_tokens=SHARD) as writer:
        manifest = writer.manifest
    for number in shards:
        arrays = to_storage(manifest, labels[number * SHARD : (number + 1) * SHARD], None, str(directory))
        files = write_shard_files(str(directory), number, arrays, manifest["checksum"], durable=False)
        entry = {"index": number, "start": number * SHARD, "stop": (number + 1) * SHARD, "files": files}
        key = "another store" if number in foreign else store_key(manifest)
        write_pending_entry(str(directory), entry, key, durable=False)
    if damage is not None:
        path = directory / f"shard-{damage:06d}.logprobs.npy"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    return labels


@pytest.mark.parametrize("shards, damage, foreign, committed", [
    ([0, 1], None, (), 2),  # both continue the store
    ([0, 2], None, (), 1),  # a gap: shard 2 waits for shard 1, and one process recomputes it
    ([0, 1, 2], 1, (), 1),  # a damaged file stops the run at shard 1
    ([0, 1], None, (0,), 0),  # an entry of another store is never taken
])
def test_resume_commits_the_intact_pending_shards_that_continue_the_store(tmp_path, shards, damage, foreign,
                                                                         committed):
    labels = pending_store(tmp_path, shards, damage, foreign)
    with SoftLabelStore.create(tmp_path, vocab_size=VOCAB, k=K, temperature=1.0, shard_tokens=SHARD,
                               resume=True) as writer:
        assert writer.num_tokens == committed * SHARD
    store = SoftLabelStore(tmp_path)
    assert store.num_shards == committed
    if committed:
        assert store[:].logprobs.equal(labels[: committed * SHARD].to(logprob_dtype=store[:].logprobs.dtype).logprobs)
    leftovers = [path.name for path in tmp_path.iterdir() if ".pending." in path.name
                 or (path.name.startswith("shard-") and int(path.name[6:12]) >= committed)]
    assert leftovers == []
    assert json.loads((tmp_path / "manifest.json").read_text())["num_tokens"] == committed * SHARD


@pytest.mark.parametrize("num_tokens, seq_len, batch_size", [(2000, 32, 2), (2017, 7, 3), (100, 100, 1), (5, 8, 2)])
def test_batch_plan_over_a_range_is_the_part_of_the_whole_plan_that_holds_it(num_tokens, seq_len, batch_size):
    whole = list(batch_plan(num_tokens, seq_len, batch_size))
    for start in range(0, num_tokens + 2, 13):
        for stop in range(start, num_tokens + 9, 29):
            end = min(stop, num_tokens)
            expected = [call for call in whole if call[0] < end and call[1] > start] if start < end else []
            assert list(batch_plan(num_tokens, seq_len, batch_size, start=start, stop=stop)) == expected
