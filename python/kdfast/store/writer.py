"""Appending soft labels to a store one committed shard at a time: `SoftLabelStoreWriter`.

Every file is written to a hidden temporary name, fsynced and renamed (`os.replace`), and a
shard exists once the manifest that lists it has been atomically replaced, so a crash at
any moment leaves the previous manifest and only complete shards; files not listed in it
are removed by the next writer (`remove_store_files`); shards that several processes wrote
but did not commit (`kdfast.store.pending`) are checked and committed by a resuming writer
when they continue the store (`commit_written`). One writer per directory is enforced
with a POSIX advisory lock (`acquire_writer_lock`). Writers are made by `open_writer` (the
body of `SoftLabelStore.create`), which validates the parameters, builds a new manifest or
checks and verifies an existing one (resume) under the writer lock; it is passed the store
class that verifies a resumed store and that `reader()` opens.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Container, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from kdfast.contract.options import TEMPERATURE_RANGE, temperature_in_range
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
    json_normalised,
    soft_label_bytes_per_token,
    storage_dtype_name,
    utc_now,
)
from kdfast.store.manifest import read_manifest, write_manifest
from kdfast.store.pending import (
    PENDING_FILE,
    check_entry,
    contiguous_entries,
    read_pending_entries,
    remove_pending_entries,
    write_shard_files,
)

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


def remove_store_files(directory: str, *, include_manifest: bool, keep_shards: int = 0,
                       keep: Container[int] = ()) -> None:
    """Removes temporary files, shard files (and pending entries) numbered ≥ keep_shards except those
    in `keep`, pending entries of committed shards, and optionally the manifest."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        match = SHARD_FILE.match(name) or PENDING_FILE.match(name)
        if name.startswith(".") and ".tmp-" in name:
            os.remove(path)
        elif match and PENDING_FILE.match(name) and int(match.group(1)) < keep_shards:
            os.remove(path)
        elif match and int(match.group(1)) >= keep_shards and int(match.group(1)) not in keep:
            os.remove(path)
        elif include_manifest and name == MANIFEST_NAME:
            os.remove(path)


def to_storage(manifest: Mapping[str, Any], soft_labels: SoftLabels, token_ids: Optional[torch.Tensor],
               where: str) -> Dict[str, np.ndarray]:
    """The rows of `soft_labels` (and `token_ids`) as the store's storage arrays, after checking them.

    Args:
        manifest: the store's manifest (k, V, T, dtypes). where: the store, for messages.
        soft_labels: any leading shape (flattened), with the store's k, V and T.
        token_ids: integer tensor with as many elements, required iff the store keeps token ids.

    Returns:
        {field: numpy array [n, k] or [n] in the storage dtype} (bfloat16 as its uint16 bits).
    """
    if not isinstance(soft_labels, SoftLabels):
        raise TypeError(f"append expects SoftLabels, got {type(soft_labels).__name__}")
    found = (soft_labels.k, soft_labels.vocab_size, soft_labels.temperature)
    wanted = (int(manifest["k"]), int(manifest["vocab_size"]), float(manifest["temperature"]))
    if found != wanted:
        raise StoreMismatchError(
            f"append: soft labels have (k, vocab_size, temperature) = {found}, the store expects {wanted}"
        )
    dtypes = manifest["dtypes"]
    logprob_dtype = STORAGE_DTYPES[dtypes["logprobs"]][1]
    rows = soft_labels.flatten().to(
        "cpu", index_dtype=STORAGE_DTYPES[dtypes["indices"]][1], logprob_dtype=logprob_dtype,
        tail_dtype=torch.float32,
    )
    count = rows.tail_logprob.shape[0]
    arrays: Dict[str, np.ndarray] = {}
    if dtypes["token_ids"] is not None:
        if token_ids is None:
            raise ValueError(f"append: the store {where} keeps token ids; pass token_ids")
        ids = token_ids.detach().reshape(-1).to("cpu", torch.int64)
        if ids.numel() != count:
            raise ValueError(f"append: token_ids has {ids.numel()} elements, the soft labels have {count} rows")
        limit = INDEX_MAX_VOCAB[dtypes["token_ids"]]
        if count and (int(ids.min()) < 0 or int(ids.max()) >= limit):
            raise ValueError(
                f"append: token ids must lie in [0, {limit}) for {dtypes['token_ids']} storage, "
                f"found [{int(ids.min())}, {int(ids.max())}]"
            )
        arrays["token_ids"] = ids.numpy().astype(STORAGE_DTYPES[dtypes["token_ids"]][0])
    elif token_ids is not None:
        raise ValueError(f"append: the store {where} was created without token ids; do not pass token_ids")
    arrays["indices"] = rows.indices.numpy()
    arrays["logprobs"] = (rows.logprobs.view(torch.uint16) if logprob_dtype == torch.bfloat16
                          else rows.logprobs).numpy()
    arrays["tail_logprob"] = rows.tail_logprob.numpy()
    return arrays


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
        self.kept_pending: Dict[int, Dict[str, Any]] = {}  # set by open_writer(keep_pending=True)

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
        arrays = to_storage(self.manifest, soft_labels, token_ids, self.directory)
        for field, array in arrays.items():
            self._pending[field].append(array)
        self._pending_rows += arrays["tail_logprob"].shape[0]
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
        try:
            files = write_shard_files(self.directory, shard_number, taken, self.manifest["checksum"], self._durable)
        except BaseException:
            # Not listed in any manifest yet: write_shard_files removed them, nothing half-written stays.
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

    def commit_written(self, entries: Sequence[Mapping[str, Any]], *, complete: bool = False) -> None:
        """Commits shards whose files other processes wrote and checked (`kdfast.store.pending`), in one manifest
        replacement, and removes their pending entries.

        Args:
            entries: manifest entries of shards numbered len(shards), len(shards) + 1, ...,
                each starting where the previous one stops (the first at `num_tokens`).
            complete: also mark the store complete.

        Raises:
            SoftLabelStoreError: rows are buffered, or the entries do not continue the shard table.
        """
        self._check_open()
        if self._pending_rows:
            raise SoftLabelStoreError(f"SoftLabelStoreWriter: {self.directory} has buffered rows; flush() first")
        chosen = contiguous_entries(self.manifest, {int(entry["index"]): entry for entry in entries})
        if len(chosen) != len(entries):
            raise SoftLabelStoreError(f"SoftLabelStoreWriter: the shards to commit to {self.directory} do not "
                                      f"continue its {len(self.manifest['shards'])} committed shards")
        manifest = dict(self.manifest, updated=utc_now())
        manifest["shards"] = list(self.manifest["shards"]) + chosen
        manifest["num_tokens"] = chosen[-1]["stop"] if chosen else self.num_tokens
        if complete:
            manifest["complete"] = True
        self.manifest = write_manifest(self.directory, manifest, self._durable)
        remove_pending_entries(self.directory, [entry["index"] for entry in chosen])

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
    keep_pending: bool = False,
) -> SoftLabelStoreWriter:
    """The implementation of `SoftLabelStore.create` (documented there); `reader_class` verifies on resume.

    On resume, shards written but not committed by an earlier run of several processes
    (`kdfast.store.pending`) whose files pass their checksums are committed when they
    continue the committed shards; the others are removed unless `keep_pending`, which
    keeps the intact ones (the writer's `kept_pending` maps their numbers to their entries).
    """
    directory = os.fspath(directory)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"SoftLabelStore.create: vocab_size must be a positive int, got {vocab_size!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(
            f"SoftLabelStore.create: k must be an int with 1 <= k <= vocab_size={vocab_size}, got {k!r}"
        )
    temperature = float(temperature)
    if not temperature_in_range(temperature):
        low, high = TEMPERATURE_RANGE
        raise ValueError(f"SoftLabelStore.create: temperature must be finite and in [{low:g}, {high:g}], "
                         f"got {temperature}")
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
            intact = {number: entry for number, entry in read_pending_entries(directory, manifest).items()
                      if number >= len(manifest["shards"]) and check_entry(directory, entry, manifest, whole=True)
                      is None}
            adopted = contiguous_entries(manifest, intact)
            if adopted:
                manifest["shards"] = list(manifest["shards"]) + adopted
                manifest["num_tokens"] = adopted[-1]["stop"]
                manifest["updated"] = utc_now()
            kept = {number: entry for number, entry in intact.items()
                    if keep_pending and number >= len(manifest["shards"])}
        else:
            kept = {}
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
        remove_store_files(directory, include_manifest=False, keep_shards=len(manifest["shards"]), keep=kept)
        manifest = write_manifest(directory, manifest, durable)
    except BaseException:
        release_writer_lock(lock)
        raise
    writer = SoftLabelStoreWriter(directory, manifest, lock, durable, reader_class=reader_class)
    writer.kept_pending = kept
    return writer
