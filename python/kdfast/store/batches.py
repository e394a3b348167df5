"""Batches of store windows for data-parallel training: `SoftLabelWindowBatches`, split by rank and worker.

An `IterableDataset` that yields whole batches (use it with `DataLoader(batch_size=None)`).
Every epoch orders the store's full teacher windows the same way on every rank (a
permutation seeded by `seed + epoch` when shuffling), gives rank r the windows r, r + W, ...
of that order (cut to a multiple of W, or padded by wrapping around with `drop_last=False`,
as `DistributedSampler` does, so every rank makes as many steps), cuts them into batches and
deals the batches round-robin to the DataLoader's workers, so each window is read once per
epoch by one worker of one rank. A batch is read straight from the shard files into its own
tensors (pinned when `pin_memory=True` and CUDA is available, in the main process): no
other copy of the soft labels is made, and only dtype conversions (indices to int64, token
ids to int64) add one. Labels follow `SoftLabelWindowDataset`: labels[b, i] is the next
stored token, or `ignore_index` at the end of a teacher window and past the stored tokens.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Mapping, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from kdfast.contract.softlabels import SoftLabels
from kdfast.store.dataset import SoftLabelWindowDataset
from kdfast.store.format import STORAGE_DTYPES
from kdfast.store.reader import SoftLabelStore

__all__ = ["SoftLabelWindowBatches"]


def _storage_view(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor in its storage dtype (bfloat16 as its uint16 bits)."""
    return (tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


class SoftLabelWindowBatches(torch.utils.data.IterableDataset):
    """Batches of full teacher windows of a store, split by rank and DataLoader worker, per epoch.

    Each batch is a dict of CPU tensors: "indices" [B, L, k] (`index_dtype`, default int64;
    None keeps the storage dtype), "logprobs" [B, L, k] (storage dtype: float16, bfloat16
    or float32), "tail_logprob" [B, L] float32, "start" [B] int64 (first token of each
    window) and, when the store keeps token ids, "input_ids" [B, L] int64 and "labels"
    [B, L] int64 (see `SoftLabelWindowDataset`). `to_soft_labels(batch)` makes the
    `SoftLabels` [B, L, k]. Use `DataLoader(dataset, batch_size=None, num_workers=N)` and
    call `set_epoch(epoch)` before each epoch (with `persistent_workers=True` the workers
    keep the epoch they started with, so leave it False).

    Args:
        store: a `SoftLabelStore` or its directory.
        batch_size: windows per batch (per rank).
        seq_len: window length L; default the store's teacher window (see `SoftLabelWindowDataset`).
        shuffle: a new permutation of the windows every epoch (default True), else in order.
        seed: seed of the permutations; the same on every rank.
        drop_last: drop the windows that do not fill every rank equally and a final partial
            batch (default True); else pad by wrapping around and keep the partial batch.
        rank, world_size: this process's place; default from torch.distributed when it is
            initialised, else 0 and 1.
        index_dtype, ignore_index: as in `SoftLabelWindowDataset`.
        pin_memory: allocate batches in pinned memory when CUDA is available and the batch
            is read in the main process; a no-op otherwise (with workers, pass
            `pin_memory=True` to the DataLoader instead).
    """

    def __init__(self, store: Union[SoftLabelStore, str, os.PathLike], batch_size: int,
                 seq_len: Optional[int] = None, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 index_dtype: Optional[torch.dtype] = torch.int64, ignore_index: int = -100,
                 pin_memory: bool = False) -> None:
        super().__init__()
        self.windows = SoftLabelWindowDataset(store, seq_len, drop_last=True, index_dtype=index_dtype,
                                              ignore_index=ignore_index)
        self.store = self.windows.store
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"SoftLabelWindowBatches: batch_size must be an int >= 1, got {batch_size!r}")
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < world_size:
            raise ValueError(f"SoftLabelWindowBatches: rank {rank} is not in [0, world_size={world_size})")
        self.batch_size, self.seq_len = batch_size, self.windows.seq_len
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.rank, self.world_size = rank, world_size
        self.index_dtype, self.ignore_index = index_dtype, int(ignore_index)
        self.pin_memory = bool(pin_memory)
        if self.pin_memory and not torch.cuda.is_available():
            warnings.warn("SoftLabelWindowBatches: pin_memory=True has no effect, CUDA is not available",
                          UserWarning, stacklevel=2)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the permutation of the next iteration (call it before every epoch, on every rank)."""
        self.epoch = int(epoch)

    def _windows_per_rank(self) -> int:
        count = len(self.windows)
        return count // self.world_size if self.drop_last else -(-count // self.world_size)

    def __len__(self) -> int:
        """Batches per rank and epoch."""
        per_rank = self._windows_per_rank()
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def rank_windows(self, epoch: Optional[int] = None) -> torch.Tensor:
        """Window numbers [n] int64 this rank reads in `epoch` (default the current one), in order."""
        count = len(self.windows)
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(count)
        total = self._windows_per_rank() * self.world_size
        if total > count and count:
            order = torch.cat([order] * (-(-total // count)))
        return order[:total][self.rank::self.world_size]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        windows = self.rank_windows()
        for number in range(worker, len(self), workers):
            yield self.read_batch(windows[number * self.batch_size : (number + 1) * self.batch_size])

    def read_batch(self, windows: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The batch of the given window numbers [B], read straight into its tensors (see the class docstring)."""
        in_worker = torch.utils.data.get_worker_info() is not None
        pin = self.pin_memory and not in_worker and torch.cuda.is_available()
        count, length, k = int(windows.shape[0]), self.seq_len, self.store.k
        starts = windows.to(torch.int64) * length
        dtypes = self.store.dtypes
        batch: Dict[str, torch.Tensor] = {}
        for field, shape in (("indices", (count, length, k)), ("logprobs", (count, length, k)),
                             ("tail_logprob", (count, length))):
            tensor = torch.empty(shape, dtype=STORAGE_DTYPES[dtypes[field]][1], pin_memory=pin)
            view = _storage_view(tensor)
            for slot, start in enumerate(starts.tolist()):
                self.store.read_into(field, start, view[slot])
            batch[field] = tensor
        if self.index_dtype is not None and batch["indices"].dtype != self.index_dtype:
            converted = torch.empty(batch["indices"].shape, dtype=self.index_dtype, pin_memory=pin)
            np.copyto(converted.numpy(), batch["indices"].numpy(), casting="unsafe")  # NumPy casts uint16 fast
            batch["indices"] = converted
        batch["start"] = starts
        if self.store.has_token_ids:
            total = len(self.store)
            view = np.zeros((count, length + 1), dtype=STORAGE_DTYPES[dtypes["token_ids"]][0])
            for slot, start in enumerate(starts.tolist()):
                self.store.read_into("token_ids", start, view[slot, : min(length + 1, total - start)])
            ids = torch.from_numpy(view.astype(np.int64))
            positions = starts.view(-1, 1) + torch.arange(1, length + 1).view(1, -1)
            outside = (positions % self.windows.teacher_window == 0) | (positions >= total)
            batch["input_ids"] = torch.empty((count, length), dtype=torch.int64, pin_memory=pin).copy_(ids[:, :-1])
            batch["labels"] = torch.empty((count, length), dtype=torch.int64, pin_memory=pin).copy_(
                ids[:, 1:].masked_fill(outside, self.ignore_index))
        return batch

    def to_soft_labels(self, batch: Mapping[str, torch.Tensor]) -> SoftLabels:
        """`SoftLabels` [B, L, k] of a batch (on the batch's device)."""
        return SoftLabels(indices=batch["indices"], logprobs=batch["logprobs"], tail_logprob=batch["tail_logprob"],
                          temperature=self.store.temperature, vocab_size=self.store.vocab_size)
