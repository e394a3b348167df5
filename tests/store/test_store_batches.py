"""`SoftLabelWindowBatches`: batches split by rank and DataLoader worker cover every window once per epoch.

Ranks are given explicitly (the split only depends on rank and world size); each rank reads
through a real `DataLoader` with worker processes. Every batch is compared with the
map-style `SoftLabelWindowDataset` items of the same windows, which read the store one
window at a time, and the union over ranks, workers and batches is compared with the set of
windows. The map-style dataset under `DistributedSampler` is checked the same way.
"""

from __future__ import annotations

import collections

import pytest
import torch
from test_store import random_soft_labels, random_token_ids, write_store

from kdfast.store import SoftLabelWindowBatches, SoftLabelWindowDataset

VOCAB, K, WINDOW, WINDOWS = 300, 4, 16, 20


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def store(request, tmp_path_factory):
    """20 teacher windows of 16 tokens (plus 5 tokens of a partial window) in shards of 50 tokens."""
    rows = WINDOWS * WINDOW + 5
    return write_store(tmp_path_factory.mktemp("store") / "store", random_soft_labels(rows, VOCAB, K, seed=3),
                       shard_tokens=50, token_ids=random_token_ids(rows, VOCAB, seed=5),
                       source={"seq_len": WINDOW}, logprob_dtype=request.param)


def assert_batch_matches_windows(batch, windows: SoftLabelWindowDataset):
    for slot, start in enumerate(batch["start"].tolist()):
        assert start % WINDOW == 0
        item = windows[start // WINDOW]
        for field in ("indices", "logprobs", "tail_logprob", "input_ids", "labels"):
            assert batch[field][slot].dtype == item[field].dtype, field
            assert torch.equal(batch[field][slot], item[field]), field


def read_epoch(store, epoch, world, workers, **options):
    """{rank: [batch, ...]} of one epoch, each rank reading through a DataLoader with `workers` workers."""
    batches = {}
    for rank in range(world):
        dataset = SoftLabelWindowBatches(store, 2, rank=rank, world_size=world, **options)
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
        batches[rank] = list(loader)
        assert len(batches[rank]) == len(dataset)
    return batches


@pytest.mark.parametrize("world, workers, drop_last", [(2, 2, True), (3, 2, False), (1, 0, True)])
def test_ranks_and_workers_read_every_window_once_per_epoch(store, world, workers, drop_last):
    windows = SoftLabelWindowDataset(store)
    orders = []
    for epoch in (0, 1):
        batches = read_epoch(store, epoch, world, workers, drop_last=drop_last)
        counts = collections.Counter(start for rank_batches in batches.values() for batch in rank_batches
                                     for start in batch["start"].tolist())
        assert set(counts) == {window * WINDOW for window in range(WINDOWS)}
        extra = sum(counts.values()) - WINDOWS  # padding to equal ranks (drop_last=False) repeats a few windows
        assert extra == (0 if drop_last else -(-WINDOWS // world) * world - WINDOWS)
        assert len({len(rank_batches) for rank_batches in batches.values()}) == 1  # ranks step together
        for rank_batches in batches.values():
            for batch in rank_batches:
                assert_batch_matches_windows(batch, windows)
        orders.append([batch["start"].tolist() for batch in batches[0]])
    assert orders[0] != orders[1]  # a new permutation every epoch
    again = read_epoch(store, 0, world, workers, drop_last=drop_last)
    assert [batch["start"].tolist() for batch in again[0]] == orders[0]  # and the same one for the same epoch


def test_in_order_batches_keep_the_storage_dtypes_and_make_soft_labels(store):
    dataset = SoftLabelWindowBatches(store, 3, shuffle=False, index_dtype=None)
    batch = next(iter(dataset))
    assert batch["start"].tolist() == [0, WINDOW, 2 * WINDOW]
    assert batch["indices"].dtype == torch.uint16 and batch["indices"].shape == (3, WINDOW, K)
    assert batch["logprobs"].dtype == getattr(torch, store.dtypes["logprobs"])
    labels = dataset.to_soft_labels(batch)
    expected = store[0 : 3 * WINDOW]
    assert torch.equal(labels.logprobs.reshape(-1, K), expected.logprobs)
    assert torch.equal(labels.indices.reshape(-1, K), expected.indices)
    assert labels.vocab_size == VOCAB and labels.temperature == store.temperature


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_pin_memory_without_cuda_is_a_noop_with_a_warning(store):
    with pytest.warns(UserWarning, match="pin_memory=True has no effect"):
        dataset = SoftLabelWindowBatches(store, 2, pin_memory=True)
    assert not next(iter(dataset))["logprobs"].is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for pinned memory")
def test_pin_memory_allocates_pinned_batches(store):
    batch = next(iter(SoftLabelWindowBatches(store, 2, pin_memory=True)))
    assert all(batch[field].is_pinned() for field in ("indices", "logprobs", "tail_logprob", "labels"))


def test_map_style_windows_under_distributed_sampler_cover_every_window(store):
    windows = SoftLabelWindowDataset(store)
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(windows, num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = torch.utils.data.DataLoader(windows, batch_size=5, sampler=sampler, num_workers=2)
        for batch in loader:
            seen.extend(batch["input_ids"][:, 0].tolist())
    expected = [int(windows[window]["input_ids"][0]) for window in range(WINDOWS)]
    assert sorted(seen) == sorted(expected)
