"""Tests of `SoftLabelWindowDataset`'s labels: aligned with the soft labels, checked when given.

Store row r is the teacher's prediction of token r + 1 within r's teacher window, so an
item's labels must be the stream's next tokens, with `ignore_index` at the last position of
every teacher window and after the last stored token. The expected labels here are built
position by position from the token stream, independently of the dataset's vectorised code.
"""

from __future__ import annotations

import pytest
import torch
from test_store import random_soft_labels, random_token_ids, write_store

from kdfast.store import SoftLabelStoreError, SoftLabelWindowDataset

VOCAB, K = 300, 4


def expected_labels(tokens: torch.Tensor, start: int, stop: int, window: int, stored: int, ignore: int) -> list:
    labels = []
    for position in range(start, stop):
        following = position + 1
        same_window = following // window == position // window
        labels.append(int(tokens[following]) if following < stored and same_window else ignore)
    return labels


def make_store(directory, rows: int, window, *, stored=None, shard_tokens=16, token_ids=True):
    """A store of the first `stored` rows of a `rows`-token stream compressed in windows of `window`."""
    stored = rows if stored is None else stored
    tokens = random_token_ids(rows, VOCAB, seed=4)
    source = {"num_tokens": rows, "seq_len": window} if window is not None else None
    store = write_store(directory, random_soft_labels(stored, VOCAB, K, seed=6), shard_tokens=shard_tokens,
                        token_ids=tokens[:stored] if token_ids else None, source=source)
    return store, tokens


CASES = [  # rows, stored, teacher window (None: not recorded), dataset seq_len, drop_last
    (100, 100, 25, None, True),
    (103, 103, 25, None, False),  # a short final window
    (100, 70, 25, None, False),  # an interrupted store: labels stop at the last stored token
    (96, 96, None, 12, True),  # no recorded window: the dataset's windows are the teacher's
    (100, 100, 20, 10, True),  # student windows half the teacher's: labels follow the teacher windows
]


@pytest.mark.parametrize("rows, stored, window, seq_len, drop_last", CASES)
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_labels_are_the_next_token_within_the_teacher_window(tmp_path, rows, stored, window, seq_len, drop_last,
                                                            ignore_index):
    store, tokens = make_store(tmp_path / "store", rows, window, stored=stored)
    if seq_len is not None and window is not None and seq_len != window:
        with pytest.warns(UserWarning, match=f"teacher saw windows of {window} tokens"):
            dataset = SoftLabelWindowDataset(store, seq_len, drop_last=drop_last, ignore_index=ignore_index)
    else:
        dataset = SoftLabelWindowDataset(store, seq_len, drop_last=drop_last, ignore_index=ignore_index)
    length = seq_len or window
    assert dataset.seq_len == length and dataset.has_labels
    assert len(dataset) == (stored // length if drop_last else -(-stored // length))
    for item in range(len(dataset)):
        sample = dataset[item]
        start = item * length
        stop = min(start + length, stored)
        assert torch.equal(sample["input_ids"], tokens[start:stop])
        assert sample["labels"].dtype == torch.int64
        assert sample["labels"].tolist() == expected_labels(tokens, start, stop, window or length, stored,
                                                            ignore_index)
        dataset.check_labels(sample["input_ids"], sample["labels"])


def test_dataset_labels_pass_through_a_dataloader_and_the_check(tmp_path):
    store, tokens = make_store(tmp_path / "store", 120, 30)
    dataset = SoftLabelWindowDataset(store)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["labels"].shape == batch["input_ids"].shape == (4, 30)
    assert (batch["labels"][:, -1] == -100).all()
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    soft_labels = dataset.to_soft_labels(batch, batch["labels"])
    assert soft_labels.indices.shape == (4, 30, K)
    masked = batch["labels"].clone()
    masked[:, :5] = -100  # ignoring more positions (e.g. a prompt) is fine
    dataset.check_labels(batch, masked)


@pytest.mark.parametrize("mistake, message", [
    ("unshifted", "not shifted"),
    ("shifted twice", "use batch\\['labels'\\]"),
    ("across the window end", "use batch\\['labels'\\]"),
])
@pytest.mark.parametrize("given", ["batch", "input_ids"])
def test_misaligned_labels_are_rejected(tmp_path, mistake, message, given):
    store, _ = make_store(tmp_path / "store", 120, 30)
    dataset = SoftLabelWindowDataset(store)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    ids = batch["input_ids"]
    if mistake == "unshifted":
        labels = ids.clone()
    elif mistake == "shifted twice":
        labels = torch.full_like(ids, -100)
        labels[:, :-2] = ids[:, 2:]
    else:
        labels = batch["labels"].clone()
        labels[:, -1] = 7  # the window's last row has no next token inside the window
    if given == "input_ids" and mistake == "across the window end":
        dataset.check_labels(ids, labels)  # the last position cannot be checked from input ids alone
        return
    with pytest.raises(ValueError, match=message):
        dataset.check_labels(batch if given == "batch" else ids, labels)
    if given == "batch":
        with pytest.raises(ValueError, match=message):
            dataset.to_soft_labels(batch, labels)


def test_check_labels_rejects_mismatched_shapes(tmp_path):
    store, _ = make_store(tmp_path / "store", 60, 30)
    dataset = SoftLabelWindowDataset(store)
    sample = dataset[0]
    with pytest.raises(ValueError, match=r"same shape"):
        dataset.check_labels(sample["input_ids"], sample["labels"][:-1])


def test_a_store_without_token_ids_says_labels_cannot_be_derived(tmp_path):
    store, _ = make_store(tmp_path / "store", 60, 30, token_ids=False)
    dataset = SoftLabelWindowDataset(store)
    sample = dataset[0]
    assert not dataset.has_labels and "labels" not in sample and "input_ids" not in sample
    with pytest.raises(SoftLabelStoreError, match="without token ids.*labels cannot be derived") as caught:
        dataset.check_labels(torch.zeros(30, dtype=torch.int64), torch.zeros(30, dtype=torch.int64))
    assert caught.value.field == "token_ids"
    with pytest.raises(SoftLabelStoreError, match="labels cannot be derived"):
        dataset.labels(0, 30)


def test_seq_len_defaults_to_the_recorded_window_and_is_required_otherwise(tmp_path):
    store, _ = make_store(tmp_path / "with", 60, 20)
    assert SoftLabelWindowDataset(store).seq_len == 20
    unrecorded, _ = make_store(tmp_path / "without", 60, None)
    with pytest.raises(ValueError, match="records no teacher window length.*pass seq_len"):
        SoftLabelWindowDataset(unrecorded)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        SoftLabelWindowDataset(unrecorded, 0)
