"""Fixed-length token windows of a soft-label store as a map-style dataset: `SoftLabelWindowDataset`.

Items are dicts of CPU tensors read from a `SoftLabelStore` (which the default DataLoader
collate stacks); `to_soft_labels` turns a collated batch back into `SoftLabels`.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Union

import torch

from kdfast.contract.softlabels import SoftLabels
from kdfast.store.reader import SoftLabelStore


class SoftLabelWindowDataset(torch.utils.data.Dataset):
    """Map-style dataset of fixed-length token windows of a store, for a DataLoader.

    Item i covers tokens [i·seq_len, (i+1)·seq_len) (a shorter final window is dropped
    unless `drop_last=False`) and is a dict of tensors, which the default collate stacks:
    "indices" [L, k], "logprobs" [L, k], "tail_logprob" [L] (storage dtypes, indices as
    int64 unless the store's dtype is kept via `index_dtype=None`) and "input_ids" [L]
    int64 when the store keeps token ids. `to_soft_labels(batch)` turns a collated batch
    back into `SoftLabels`. Picklable; every worker opens its own memory maps.

    Args:
        store: a `SoftLabelStore` or its directory.
        seq_len: window length L (match the length the teacher was run at).
        drop_last: drop a final window shorter than seq_len (default True).
        index_dtype: dtype of the returned indices (default torch.int64); None keeps the
            storage dtype.
    """

    def __init__(
        self,
        store: Union[SoftLabelStore, str, os.PathLike],
        seq_len: int,
        *,
        drop_last: bool = True,
        index_dtype: Optional[torch.dtype] = torch.int64,
    ) -> None:
        self.store = store if isinstance(store, SoftLabelStore) else SoftLabelStore(store)
        if seq_len < 1:
            raise ValueError(f"SoftLabelWindowDataset: seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.index_dtype = index_dtype
        total = len(self.store)
        self._length = total // seq_len if drop_last else -(-total // seq_len)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, item: int) -> Dict[str, torch.Tensor]:
        if not -self._length <= item < self._length:
            raise IndexError(f"SoftLabelWindowDataset: window {item} out of range for {self._length} windows")
        item %= self._length
        start = item * self.seq_len
        stop = min(start + self.seq_len, len(self.store))
        labels = self.store.read(start, stop)
        if self.index_dtype is not None:
            labels = labels.to(index_dtype=self.index_dtype)
        sample = {"indices": labels.indices, "logprobs": labels.logprobs, "tail_logprob": labels.tail_logprob}
        if self.store.has_token_ids:
            sample["input_ids"] = self.store.token_ids(start, stop)
        return sample

    def to_soft_labels(self, batch: Mapping[str, torch.Tensor]) -> SoftLabels:
        """`SoftLabels` [B, L, k] from a collated batch of this dataset's items."""
        return SoftLabels(
            indices=batch["indices"],
            logprobs=batch["logprobs"],
            tail_logprob=batch["tail_logprob"],
            temperature=self.store.temperature,
            vocab_size=self.store.vocab_size,
        )
