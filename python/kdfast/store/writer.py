"""Appending soft labels to a store one committed shard at a time: `SoftLabelStoreWriter`.

Every file is written to a hidden temporary name, fsynced and renamed (`os.replace`), and a
shard exists once the manifest that lists it has been atomically replaced, so a crash at
any moment leaves the previous manifest and only complete shards; files not listed in it
are removed by the next writer (`remove_store_files`). One writer per directory is enforced
with a POSIX advisory lock (`acquire_writer_lock`). Writers are made by `open_writer` (the
body of `SoftLabelStore.create`), which validates the parameters, builds a new manifest or
checks and verifies an existing one (resume) under the writer lock; it is passed the store
class that verifies a resumed store and that `reader()` opens.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch

from kdfast.contract.softlabels import SoftLabels, smallest_index_dtype
from kdfast.store.format import (
    DEFAULT_SHARD_TOKENS,
    FIELDS,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_MAX_VOCAB,
    INDEX_STORAGE,
    LOCK_NAME,
    LOGPROB_STORAGE,
    MANIFEST_NAME,
    SHARD_FILE,
    STORAGE_DTYPES,
    TORCH_TO_NAME,
    ManifestFields,
    SoftLabelStoreError,
    StoreMismatchError,
    default_checksum_algorithm,
    file_checksum,
    fsync_directory,
    json_normalised,
    sample_checksum,
    soft_label_bytes_per_token,
    storage_dtype_name,
    temporary_name,
    utc_now,
)
from kdfast.store.manifest import read_manifest, write_manifest

try:  # POSIX advisory lock against two writers on one directory
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None


def acquire_writer_lock(directory: str):
    """Takes the exclusive writer lock of `directory`; returns its handle (None where unsupported).

    Raises:
        SoftLabelStoreError: another process holds the lock.
    """
    if _fcntl is None:  # pragma: no cover - Windows: no advisory lock
        return None
    handle = open(os.path.join(directory, LOCK_NAME), "a+")
    try:
        _fcntl.flock(handle.fileno(), _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SoftLabelStoreError(f"SoftLabelStore: another process is writing to {directory}") from None
    return handle


def release_writer_lock(handle) -> None:
    """Releases a lock from `acquire_writer_lock` and closes its file; no-op if None or closed."""
    if handle is not None and not handle.closed:
        with contextlib.suppress(OSError):
            _fcntl.flock(handle.fileno(), _fcntl.LOCK_UN)
        handle.close()


def remove_store_files(directory: str, *, include_manifest: bool, keep_shards: int = 0) -> None:
    """Removes temporary files, shard files numbered ≥ keep_shards and optionally the manifest."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        match = SHARD_FILE.match(name)
        if name.startswith(".") and ".tmp-" in name:
            os.remove(path)
        elif match and int(match.group(1)) >= keep_shards:
            os.remove(path)
        elif include_manifest and name == MANIFEST_NAME:
            os.remove(path)


# --------------------------------------------------------------------------- writer
class SoftLabelStoreWriter(ManifestFields):
    """Appends soft labels to a store, committing one shard at a time. Made by `SoftLabelStore.create`.

    Rows are buffered in memory and written as a shard every `shard_tokens` rows; each
    shard commit writes its files (temporary name, fsync, rename) and then atomically
    replaces the manifest. `num_tokens` counts committed rows, `pending_tokens` buffered
    ones. Use as a context manager: a normal exit commits the buffered rows (`close()`),
    an exception discards them (`abort()`), leaving the last committed state.

    Args:
        directory: the store directory. manifest: its current (committed) manifest.
        lock: the writer-lock handle from `acquire_writer_lock` (released on close).
        durable: fsync files and the directory after each write.
        reader_class: the store class `reader()` opens (`SoftLabelStore`).
    """

    def __init__(self, directory: str, manifest: Dict[str, Any], lock, durable: bool, *, reader_class: type) -> None:
        self.directory = directory
        self._reader_class = reader_class
        self.manifest = manifest
        self._lock = lock
        self._durable = durable
        self._pending: Dict[str, List[np.ndarray]] = {field: [] for field in FIELDS}
        self._pending_rows = 0
        dtypes = manifest["dtypes"]
        self._index_dtype = STORAGE_DTYPES[dtypes["indices"]][1]
        self._logprob_dtype = STORAGE_DTYPES[dtypes["logprobs"]][1]
        self._with_token_ids = dtypes["token_ids"] is not None

    @property
    def num_tokens(self) -> int:
        """Rows committed to disk (listed in the manifest)."""
        return int(self.manifest["num_tokens"])

    @property
    def pending_tokens(self) -> int:
        """Rows appended but not yet committed."""
        return self._pending_rows

    @property
    def closed(self) -> bool:
        """Whether `close()`/`abort()` ran (or a commit failed); no more appends then."""
        return self._pending is None





    def _check_open(self) -> None:
        if self._pending is None:
            raise SoftLabelStoreError(f"SoftLabelStoreWriter for {self.directory} is closed")

    def append(self, soft_labels: SoftLabels, token_ids: Optional[torch.Tensor] = None) -> None:
        """Buffers rows and commits every full shard.

        Args:
            soft_labels: any leading shape (flattened in row-major order), with the
                store's k, vocab_size and temperature; any device and dtypes (converted to
                the storage dtypes).
            token_ids: integer tensor with the same number of rows (any shape), required
                if and only if the store keeps token ids; values in [0, max of the index
                storage dtype].
        """
        self._check_open()
        if self.manifest["complete"]:
            raise SoftLabelStoreError(
                f"SoftLabelStoreWriter: {self.directory} is marked complete; nothing may be appended"
            )
        if not isinstance(soft_labels, SoftLabels):
            raise TypeError(f"append expects SoftLabels, got {type(soft_labels).__name__}")
        found = (soft_labels.k, soft_labels.vocab_size, soft_labels.temperature)
        wanted = (self.k, self.vocab_size, self.temperature)
        if found != wanted:
            raise StoreMismatchError(
                f"append: soft labels have (k, vocab_size, temperature) = {found}, the store expects {wanted}"
            )
        rows = soft_labels.flatten().to(
            "cpu", index_dtype=self._index_dtype, logprob_dtype=self._logprob_dtype, tail_dtype=torch.float32
        )
        count = rows.tail_logprob.shape[0]
        if self._with_token_ids:
            if token_ids is None:
                raise ValueError(f"append: the store {self.directory} keeps token ids; pass token_ids")
            ids = token_ids.detach().reshape(-1).to("cpu", torch.int64)
            if ids.numel() != count:
                raise ValueError(f"append: token_ids has {ids.numel()} elements, the soft labels have {count} rows")
            limit = INDEX_MAX_VOCAB[self.manifest["dtypes"]["token_ids"]]
            if count and (int(ids.min()) < 0 or int(ids.max()) >= limit):
                raise ValueError(
                    f"append: token ids must lie in [0, {limit}) for {self.manifest['dtypes']['token_ids']} storage, "
                    f"found [{int(ids.min())}, {int(ids.max())}]"
                )
            self._pending["token_ids"].append(
                ids.numpy().astype(STORAGE_DTYPES[self.manifest["dtypes"]["token_ids"]][0])
            )
        elif token_ids is not None:
            raise ValueError(f"append: the store {self.directory} was created without token ids; do not pass token_ids")
        self._pending["indices"].append(rows.indices.numpy())
        logprobs = rows.logprobs.view(torch.uint16) if self._logprob_dtype == torch.bfloat16 else rows.logprobs
        self._pending["logprobs"].append(logprobs.numpy())
        self._pending["tail_logprob"].append(rows.tail_logprob.numpy())
        self._pending_rows += count
        shard_tokens = int(self.manifest["shard_tokens"])
        while self._pending_rows >= shard_tokens:
            self._commit(shard_tokens)

    def flush(self) -> None:
        """Commits the buffered rows as one (possibly short) shard; no-op when none are buffered."""
        self._check_open()
        if self._pending_rows:
            self._commit(self._pending_rows)

    def _commit(self, rows: int) -> None:
        """Writes the first `rows` buffered rows as the next shard and updates the manifest."""
        taken: Dict[str, np.ndarray] = {}
        for field, chunks in self._pending.items():
            if not chunks:
                continue
            joined = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
            taken[field] = joined[:rows]
            self._pending[field] = [joined[rows:]] if joined.shape[0] > rows else []
        shard_number = len(self.manifest["shards"])
        start = self.num_tokens
        files: Dict[str, Dict[str, Any]] = {}
        written: List[str] = []
        algorithm = self.manifest["checksum"]
        try:
            for field in FIELDS:
                if field not in taken:
                    continue
                final_name = f"shard-{shard_number:06d}.{field}.npy"
                temporary = temporary_name(self.directory, final_name)
                written.append(temporary)
                with open(temporary, "wb") as handle:
                    np.lib.format.write_array(
                        handle, np.ascontiguousarray(taken[field]), version=(1, 0), allow_pickle=False
                    )
                    handle.flush()
                    if self._durable:
                        os.fsync(handle.fileno())
                files[field] = {
                    "file": final_name,
                    "bytes": os.path.getsize(temporary),
                    "checksum": file_checksum(temporary, algorithm),
                    "sample": sample_checksum(temporary, algorithm),
                }
                final_path = os.path.join(self.directory, final_name)
                os.replace(temporary, final_path)
                written[-1] = final_path
            if self._durable:
                fsync_directory(self.directory)
        except BaseException:
            # Not listed in any manifest yet: remove them so that nothing half-written stays.
            for path in written:
                with contextlib.suppress(OSError):
                    os.remove(path)
            self._fail()
            raise
        manifest = dict(self.manifest)
        manifest["shards"] = list(self.manifest["shards"]) + [
            {"index": shard_number, "start": start, "stop": start + rows, "files": files}
        ]
        manifest["num_tokens"] = start + rows
        manifest["updated"] = utc_now()
        try:
            # The commit point. If it fails before the rename, the shard files are orphans
            # (numbered past the manifest's shards) that the next writer removes.
            manifest = write_manifest(self.directory, manifest, self._durable)
        except BaseException:
            self._fail()
            raise
        self.manifest = manifest
        self._pending_rows -= rows

    def _fail(self) -> None:
        """After a failed commit the buffer no longer matches the disk: refuse further use."""
        self._pending = None
        self._pending_rows = 0
        release_writer_lock(self._lock)
        self._lock = None

    def discard_pending(self) -> int:
        """Drops the buffered rows without writing them; returns how many were dropped."""
        self._check_open()
        dropped = self._pending_rows
        self._pending = {field: [] for field in FIELDS}
        self._pending_rows = 0
        return dropped

    def close(self, *, complete: bool = False) -> None:
        """Commits buffered rows, optionally marks the store complete, and releases the lock.

        Args:
            complete: record `"complete": true` in the manifest (no further appends or
                resumes add tokens). Default False.
        """
        if self._pending is None:
            return
        try:
            self.flush()
            if complete:
                manifest = dict(self.manifest, complete=True, updated=utc_now())
                self.manifest = write_manifest(self.directory, manifest, self._durable)
        finally:
            self._pending = None
            release_writer_lock(self._lock)
            self._lock = None

    def abort(self) -> int:
        """Discards buffered rows and releases the lock; committed shards stay. Returns rows dropped."""
        if self._pending is None:
            return 0
        dropped = self._pending_rows
        self._pending = None
        self._pending_rows = 0
        with contextlib.suppress(OSError):
            remove_store_files(self.directory, include_manifest=False, keep_shards=len(self.manifest["shards"]))
        release_writer_lock(self._lock)
        self._lock = None
        return dropped

    def __enter__(self) -> "SoftLabelStoreWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def reader(self, *, verify: str = "size") -> Any:
        """A `SoftLabelStore` over the rows committed so far."""
        return self._reader_class(self.directory, verify=verify)


# --------------------------------------------------------------------------- creation
def open_writer(
    directory: Union[str, os.PathLike],
    *,
    reader_class: type,
    vocab_size: int,
    k: int,
    temperature: float,
    index_dtype: Optional[Union[str, torch.dtype]] = None,
    logprob_dtype: Union[str, torch.dtype] = "float16",
    with_token_ids: bool = False,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    teacher: Optional[str] = None,
    tokenizer: Optional[str] = None,
    source: Optional[Mapping[str, Any]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
    resume: bool = False,
    overwrite: bool = False,
    durable: bool = True,
) -> SoftLabelStoreWriter:
    """The implementation of `SoftLabelStore.create` (documented there); `reader_class` verifies on resume."""
    directory = os.fspath(directory)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"SoftLabelStore.create: vocab_size must be a positive int, got {vocab_size!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(
            f"SoftLabelStore.create: k must be an int with 1 <= k <= vocab_size={vocab_size}, got {k!r}"
        )
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"SoftLabelStore.create: temperature must be finite and > 0, got {temperature}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"SoftLabelStore.create: shard_tokens must be a positive int, got {shard_tokens!r}")
    if resume and overwrite:
        raise ValueError("SoftLabelStore.create: resume and overwrite are mutually exclusive")
    if index_dtype is None:
        index_name = TORCH_TO_NAME[smallest_index_dtype(vocab_size)]
    else:
        index_name = storage_dtype_name(index_dtype, INDEX_STORAGE, "index_dtype")
    if vocab_size > INDEX_MAX_VOCAB[index_name]:
        raise ValueError(
            f"SoftLabelStore.create: index_dtype {index_name} cannot hold indices of V={vocab_size} "
            f"(max V {INDEX_MAX_VOCAB[index_name]})"
        )
    logprob_name = storage_dtype_name(logprob_dtype, LOGPROB_STORAGE, "logprob_dtype")
    token_bytes = STORAGE_DTYPES[index_name][0].itemsize if with_token_ids else 0
    soft_bytes = soft_label_bytes_per_token(k, index_name, logprob_name)
    parameters = {
        "vocab_size": vocab_size,
        "k": k,
        "temperature": temperature,
        "dtypes": {
            "indices": index_name,
            "logprobs": logprob_name,
            "tail_logprob": "float32",
            "token_ids": index_name if with_token_ids else None,
        },
        "teacher": teacher,
        "tokenizer": tokenizer,
        "source": json_normalised(dict(source)) if source is not None else None,
    }
    os.makedirs(directory, exist_ok=True)
    lock = acquire_writer_lock(directory)
    try:
        manifest_path = os.path.join(directory, MANIFEST_NAME)
        exists = os.path.exists(manifest_path)
        if exists and overwrite:
            remove_store_files(directory, include_manifest=True)
            exists = False
        if exists and not resume:
            raise FileExistsError(
                f"SoftLabelStore.create: {directory} already holds a soft-label store; pass resume=True "
                "(CLI: --resume) to continue it or overwrite=True to replace it"
            )
        if exists:
            manifest = read_manifest(directory)
            differences = [
                f"{name}: stored {manifest.get(name)!r}, requested {value!r}"
                for name, value in parameters.items()
                if manifest.get(name) != value
            ]
            if differences:
                raise StoreMismatchError(
                    f"SoftLabelStore: cannot resume {directory}: parameters differ from the stored run:\n  "
                    + "\n  ".join(differences)
                )
            reader_class(directory, verify="size").verify()
            manifest["shard_tokens"] = shard_tokens
            manifest["format_version"] = FORMAT_VERSION  # a version-1 store gains its manifest checksum
        else:
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                **parameters,
                "bytes_per_token": {
                    "soft_labels": soft_bytes,
                    "token_ids": token_bytes,
                    "total": soft_bytes + token_bytes,
                },
                "checksum": default_checksum_algorithm(),
                "shard_tokens": shard_tokens,
                "metadata": json_normalised(dict(metadata)) if metadata is not None else {},
                "created": utc_now(),
                "updated": utc_now(),
                "complete": False,
                "num_tokens": 0,
                "shards": [],
            }
        remove_store_files(directory, include_manifest=False, keep_shards=len(manifest["shards"]))
        manifest = write_manifest(directory, manifest, durable)
    except BaseException:
        release_writer_lock(lock)
        raise
    return SoftLabelStoreWriter(directory, manifest, lock, durable, reader_class=reader_class)
