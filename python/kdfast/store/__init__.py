"""Crash-safe, checked on-disk store of top-k soft labels for a token stream: `SoftLabelStore`.

A store is a directory of shards plus `manifest.json`. Shard i holds the soft labels of the
contiguous token range [start_i, stop_i) as little-endian `.npy` files (one per field:
`indices` [n, k], `logprobs` [n, k], `tail_logprob` [n] and optionally the input
`token_ids` [n]); the manifest records the parameters (format version, V, k, temperature,
dtypes, teacher, tokenizer, source description), per shard its token range and each
file's byte size and checksums, and a checksum of its own fields. The manifest is the
single source of truth: a shard exists once the manifest that lists it has been atomically
replaced. Every file is written to a hidden temporary name, fsynced and renamed
(`os.replace`), so a crash at any moment leaves the previous manifest and only complete
shards; files not listed in it are ignored and cleaned up by the next writer. Opening a
store checks the manifest (checksum, fields, shard table) and every shard file's size and
`.npy` header; a process checks each shard's checksums the first time it reads it, and
`verify()` checks everything. Reads keep no file open, so a store pickles cheaply into
DataLoader workers. Problems raise `ManifestError` or `CorruptShardError` naming the file
and the field. `SoftLabelWindowDataset` yields windows with labels aligned with the soft
labels; `SoftLabelWindowBatches` yields batches split by rank and DataLoader worker, and
`kdfast.store.distributed.DistributedStoreWriter` lets the ranks of a process group fill
one store. The format is specified in docs/soft_label_store.md.

Modules: `format` (constants, storage dtypes, file checksums, errors), `manifest` (the
manifest's checksum, atomic writes, reading and validation), `shards` (shard file checks and
reads), `pending` (shards written but not yet committed), `writer` (`SoftLabelStoreWriter`,
`open_writer`, writer lock, removal of uncommitted files), `reader` (`SoftLabelStore`,
including `SoftLabelStore.create`), `dataset` (`SoftLabelWindowDataset`), `batches`
(`SoftLabelWindowBatches`), `distributed` (`DistributedStoreWriter`) and `merge`
(`merge_stores`); each imports only the ones before it.
"""

from kdfast.store.batches import SoftLabelWindowBatches
from kdfast.store.dataset import SoftLabelWindowDataset
from kdfast.store.format import (  # noqa: F401  (public names of kdfast.store outside __all__)
    DEFAULT_SHARD_TOKENS,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOCK_NAME,
    MANIFEST_NAME,
    CorruptShardError,
    ManifestError,
    SoftLabelStoreError,
    StoreMismatchError,
    default_checksum_algorithm,
    file_checksum,
    soft_label_bytes_per_token,
)
from kdfast.store.merge import MergeMismatchError, merge_stores
from kdfast.store.reader import SoftLabelStore
from kdfast.store.writer import SoftLabelStoreWriter

__all__ = [
    "CorruptShardError",
    "FORMAT_VERSION",
    "ManifestError",
    "MergeMismatchError",
    "SoftLabelStore",
    "SoftLabelStoreError",
    "SoftLabelStoreWriter",
    "SoftLabelWindowBatches",
    "SoftLabelWindowDataset",
    "StoreMismatchError",
    "merge_stores",
    "soft_label_bytes_per_token",
]
