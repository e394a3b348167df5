"""Fixed-length token windows of a soft-label store as a map-style dataset: `SoftLabelWindowDataset`.

Items are dicts of CPU tensors read from a `SoftLabelStore` (which the default DataLoader
collate stacks); `to_soft_labels` turns a collated batch back into `SoftLabels`. Store row r
holds the teacher's distribution over token r + 1 of the stored stream, given the tokens of
r's teacher window up to r (`kdfast compress` cuts the stream into windows of
`manifest["source"]["seq_len"]` tokens from token 0). When the store keeps token ids, an
item also carries `input_ids` and the `labels` aligned with its soft labels: labels[i] is
token start + i + 1, or `ignore_index` where that token starts another teacher window or
lies past the stored tokens. `check_labels` rejects labels that do not line up that way
(for instance unshifted `labels = input_ids`).
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Mapping, Optional, Union

import torch

from kdfast.contract.softlabels import SoftLabels
from kdfast.store.format import SoftLabelStoreError
from kdfast.store.reader import SoftLabelStore


class SoftLabelWindowDataset(torch.utils.data.Dataset):
    """Map-style dataset of fixed-length token windows of a store, for a DataLoader.

    Item i covers tokens [i·seq_len, (i+1)·seq_len) (a shorter final window is dropped
    unless `drop_last=False`) and is a dict of tensors, which the default collate stacks:
    "indices" [L, k], "logprobs" [L, k], "tail_logprob" [L] (storage dtypes, indices as
    int64 unless the store's dtype is kept via `index_dtype=None`) and, when the store
    keeps token ids, "input_ids" [L] int64 and "labels" [L] int64: labels[i] is the next
    token of the stream, input token start + i + 1, which row i of the soft labels
    predicts, or `ignore_index` at the last position of a teacher window and after the
    last stored token. Pass `batch["labels"]` as the labels of `sparse_kd_loss` /
    `SparseKDLoss` (no shifting). `to_soft_labels(batch)` turns a collated batch back
    into `SoftLabels`. Picklable; every DataLoader worker reads the shards itself.

    Teacher windows: `manifest["source"]["seq_len"]` (recorded by `kdfast compress`), or
    `seq_len` when the manifest does not record one (the teacher is then assumed to have
    seen the same windows as the student). A `seq_len` different from the recorded
    window length gives a warning: the student would not see the context the teacher saw.

    Args:
        store: a `SoftLabelStore` or its directory.
        seq_len: window length L; default None uses the store's teacher window length
            (`manifest["source"]["seq_len"]`; an error when it is not recorded).
        drop_last: drop a final window shorter than seq_len (default True).
        index_dtype: dtype of the returned indices (default torch.int64); None keeps the
            storage dtype.
        ignore_index: label of positions without a next token (default -100, the
            `ignore_index` default of the kdfast losses).

    Raises:
        ValueError: seq_len < 1, or None while the store records no window length.
    """

    def __init__(
        self,
        store: Union[SoftLabelStore, str, os.PathLike],
        seq_len: Optional[int] = None,
        *,
        drop_last: bool = True,
        index_dtype: Optional[torch.dtype] = torch.int64,
        ignore_index: int = -100,
    ) -> None:
        self.store = store if isinstance(store, SoftLabelStore) else SoftLabelStore(store)
        recorded = self.store.window
        if seq_len is None:
            if recorded is None:
                raise ValueError(f"SoftLabelWindowDataset: {self.store.directory}'s manifest records no teacher window "
                                 "length (source.seq_len); pass seq_len")
            seq_len = recorded
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"SoftLabelWindowDataset: seq_len must be an int >= 1, got {seq_len!r}")
        if recorded is not None and seq_len != recorded:
            warnings.warn(
                f"SoftLabelWindowDataset: seq_len={seq_len} but the teacher saw windows of {recorded} tokens "
                f"(source.seq_len of {self.store.directory}): the student's windows do not match the teacher's",
                UserWarning, stacklevel=2)
        self.seq_len = seq_len
        self.teacher_window = recorded if recorded is not None else seq_len
        self.index_dtype = index_dtype
        self.ignore_index = int(ignore_index)
        total = len(self.store)
        self._length = total // seq_len if drop_last else -(-total // seq_len)

    @property
    def has_labels(self) -> bool:
        """Whether items carry "input_ids" and "labels" (the store keeps token ids)."""
        return self.store.has_token_ids

    def __len__(self) -> int:
        return self._length

    def labels(self, start: int, stop: int) -> torch.Tensor:
        """Next-token labels [stop − start] int64 of store rows [start, stop) (see the class docstring).

        Raises:
            SoftLabelStoreError: the store keeps no token ids.
        """
        self._require_token_ids()
        return self._labels(start, stop, self.store.token_ids(start + 1, min(stop + 1, len(self.store))))

    def _labels(self, start: int, stop: int, following: torch.Tensor) -> torch.Tensor:
        """Labels of rows [start, stop) from the stored tokens [start + 1, min(stop + 1, len(store)))."""
        total = len(self.store)
        labels = torch.full((stop - start,), self.ignore_index, dtype=torch.int64)
        labels[: following.shape[0]] = following
        positions = torch.arange(start + 1, stop + 1)
        labels[(positions % self.teacher_window == 0) | (positions >= total)] = self.ignore_index
        return labels

    def __getitem__(self, item: int) -> Dict[str, torch.Tensor]:
        if not -self._length <= item < self._length:
            raise IndexError(f"SoftLabelWindowDataset: window {item} out of range for {self._length} windows")
        item %= self._length
        start = item * self.seq_len
        stop = min(start + self.seq_len, len(self.store))
        soft_labels = self.store.read(start, stop)
        if self.index_dtype is not None:
            soft_labels = soft_labels.to(index_dtype=self.index_dtype)
        sample = {"indices": soft_labels.indices, "logprobs": soft_labels.logprobs,
                  "tail_logprob": soft_labels.tail_logprob}
        if self.store.has_token_ids:
            ids = self.store.token_ids(start, min(stop + 1, len(self.store)))  # one token past the window
            sample["input_ids"] = ids[: stop - start]
            sample["labels"] = self._labels(start, stop, ids[1:])
        return sample

    def _require_token_ids(self) -> None:
        if not self.store.has_token_ids:
            raise SoftLabelStoreError(
                f"SoftLabelWindowDataset: {self.store.directory} was written without token ids (kdfast compress "
                "--no-token-ids), so the labels cannot be derived from it: take labels[i] = token start + i + 1 "
                "of your own copy of the token stream (ignore_index at the last position of each teacher window), "
                "or recompress with token ids", path=self.store.directory, field="token_ids")

    def check_labels(self, input_ids: Union[torch.Tensor, Mapping[str, torch.Tensor]], labels: torch.Tensor) -> None:
        """Raises unless `labels` line up with the soft labels of `input_ids` from this dataset.

        Row i of the soft labels predicts the next token, so labels[..., i] must equal
        input_ids[..., i + 1] (or be `ignore_index`). Given a collated batch (a mapping with
        "labels"), every position is compared with the dataset's labels, including the last
        one; given input ids [..., L] alone, positions 0..L−2 are.

        Args:
            input_ids: [..., L] int64 from this dataset's items, or a batch of them.
            labels: [..., L] integer labels to check.

        Raises:
            SoftLabelStoreError: the store keeps no token ids.
            ValueError: wrong shapes, or labels that are not the next tokens (the message
                says whether they look unshifted, i.e. equal to input_ids).
        """
        self._require_token_ids()
        expected = None
        if isinstance(input_ids, Mapping):
            expected = input_ids.get("labels")
            input_ids = input_ids["input_ids"]
        if labels.shape != input_ids.shape or labels.dim() == 0:
            raise ValueError(f"check_labels: labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} "
                             "must have the same shape [..., L]")
        labels = labels.to(torch.int64)
        valid = labels != self.ignore_index
        if expected is None:
            wrong = valid[..., :-1] & (labels[..., :-1] != input_ids[..., 1:])
        else:
            wrong = valid & (labels != expected.to(labels.device))
        if not bool(wrong.any()):
            return
        unshifted = bool(valid.any()) and bool((labels[valid] == input_ids[valid]).all())
        first = tuple(int(i) for i in wrong.nonzero()[0])
        hint = ("they equal input_ids, i.e. they are not shifted: row i of the soft labels predicts token i + 1, so "
                "pass labels[..., i] = input_ids[..., i + 1] (batch['labels'] of this dataset does this)"
                if unshifted else "use batch['labels'] of this dataset, which holds the next token of every row")
        raise ValueError(f"check_labels: {int(wrong.sum())} labels do not match the next stored token (first at "
                         f"{list(first)}): {hint}")

    def to_soft_labels(self, batch: Mapping[str, torch.Tensor], labels: Optional[torch.Tensor] = None) -> SoftLabels:
        """`SoftLabels` [B, L, k] from a collated batch of this dataset's items.

        Args:
            batch: the collated items.
            labels: optional labels [B, L] meant to go with these soft labels; they are
                checked with `check_labels(batch, labels)` first.
        """
        if labels is not None:
            self.check_labels(batch, labels)
        return SoftLabels(
            indices=batch["indices"],
            logprobs=batch["logprobs"],
            tail_logprob=batch["tail_logprob"],
            temperature=self.store.temperature,
            vocab_size=self.store.vocab_size,
        )
