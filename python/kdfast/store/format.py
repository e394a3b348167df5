"""On-disk format of a soft-label store: constants, storage dtypes, file checksums and errors.

A store is a directory of shards plus `manifest.json`. Shard i holds the soft labels of the
contiguous token range [start_i, stop_i) as little-endian `.npy` files (one per field:
`indices` [n, k], `logprobs` [n, k], `tail_logprob` [n] and optionally the input
`token_ids` [n]); the manifest records the parameters (format version, V, k, temperature,
dtypes, teacher, tokenizer, source description) and, per shard, its token range and each
file's byte size and checksums. This module knows the names, dtypes and limits of that
format, checksums files (whole, or sampled at both ends), writes temporary files and
defines the errors (`SoftLabelStoreError` with the `path` and `field` concerned, and its
subclasses); it holds no store state. The manifest's own checksum, reading and validation
are in `kdfast.store.manifest`. The format is specified in docs/soft_label_store.md.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

try:  # optional, faster checksums
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - depends on the environment
    _xxhash = None


FORMAT_NAME = "kdfast.SoftLabelStore"
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)  # version 1: no manifest checksum, no sampled file checksums
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".writer.lock"
DEFAULT_SHARD_TOKENS = 1 << 18

# Storage dtypes by manifest name: (numpy dtype of the .npy file, torch dtype returned).
# bfloat16 has no numpy dtype; its bits are stored as little-endian uint16.
STORAGE_DTYPES: Dict[str, Tuple[np.dtype, torch.dtype]] = {
    "uint16": (np.dtype("<u2"), torch.uint16),
    "int16": (np.dtype("<i2"), torch.int16),
    "int32": (np.dtype("<i4"), torch.int32),
    "int64": (np.dtype("<i8"), torch.int64),
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
    "float32": (np.dtype("<f4"), torch.float32),
}
TORCH_TO_NAME = {
    torch.uint16: "uint16",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
}
INDEX_STORAGE = ("uint16", "int16", "int32", "int64")
LOGPROB_STORAGE = ("float16", "bfloat16", "float32")
INDEX_MAX_VOCAB = {"uint16": 1 << 16, "int16": 1 << 15, "int32": (1 << 31) - 1, "int64": (1 << 63) - 1}
FIELDS = ("indices", "logprobs", "tail_logprob", "token_ids")
SHARD_FILE = re.compile(r"^shard-(\d{6,})\.(indices|logprobs|tail_logprob|token_ids)\.npy$")
FILE_CHECKSUMS = ("xxh3_128", "blake2b-128", "sha256")
SAMPLE_BYTES = 64 << 10  # bytes hashed at each end of a file by `sample_checksum`
_CHECKSUM_CHUNK = 8 << 20


class ManifestFields:
    """The manifest's scalar fields as properties; the reader and the writer both expose them."""

    manifest: Dict[str, Any]

    @property
    def vocab_size(self) -> int:
        """V, the teacher's vocabulary size."""
        return int(self.manifest["vocab_size"])

    @property
    def k(self) -> int:
        """Kept tokens per row."""
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        """Temperature T the soft labels were computed at."""
        return float(self.manifest["temperature"])

    @property
    def complete(self) -> bool:
        """Whether the writer marked the store finished (all source tokens written)."""
        return bool(self.manifest.get("complete", False))


class SoftLabelStoreError(Exception):
    """Base class of the errors raised by `SoftLabelStore` and its writer.

    Attributes:
        path: the file the error is about (manifest or shard file), or None.
        field: the manifest field or shard field concerned (e.g. "temperature",
            "shards[2].stop", "logprobs"), or None.
    """

    def __init__(self, message: str, *, path: Optional[str] = None, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class ManifestError(SoftLabelStoreError):
    """`manifest.json` is malformed, was edited after it was written, or contradicts the shards."""


class CorruptShardError(SoftLabelStoreError):
    """A shard file is missing, truncated, has an unexpected header or a wrong checksum."""


class StoreMismatchError(SoftLabelStoreError, ValueError):
    """An existing store was written with different parameters than the ones requested."""


# --------------------------------------------------------------------------- checksums, atomic files
def soft_label_bytes_per_token(k: int, index_dtype: str, logprob_dtype: str, tail_dtype: str = "float32") -> int:
    """Exact payload bytes per token of the soft labels: k·(index + logprob) + tail.

    Args:
        k: kept tokens per row.
        index_dtype, logprob_dtype, tail_dtype: storage dtype names ("uint16", "int32",
            "float16", "bfloat16", "float32", ...).
    """
    size = lambda name: STORAGE_DTYPES[name][0].itemsize  # noqa: E731
    return k * (size(index_dtype) + size(logprob_dtype)) + size(tail_dtype)


def storage_dtype_name(dtype: Union[str, torch.dtype], allowed: Sequence[str], what: str) -> str:
    """Manifest name of a storage dtype given as a name or a torch dtype.

    Args:
        dtype: a dtype name ("uint16", ...) or a torch dtype.
        allowed: the names accepted for this field.
        what: the argument's name, for the error message.

    Raises:
        ValueError: the dtype is not one of `allowed`.
    """
    name = TORCH_TO_NAME.get(dtype) if isinstance(dtype, torch.dtype) else str(dtype)
    if name not in allowed:
        raise ValueError(f"SoftLabelStore: {what} must be one of {list(allowed)}, got {dtype}")
    return name


def default_checksum_algorithm() -> str:
    """"xxh3_128" when the `xxhash` package is installed, else "blake2b-128" (hashlib)."""
    return "xxh3_128" if _xxhash is not None else "blake2b-128"


def _new_hasher(algorithm: str):
    if algorithm == "xxh3_128":
        if _xxhash is None:
            raise SoftLabelStoreError(
                "this store's checksums are xxh3_128 but the `xxhash` package is not installed; "
                "`pip install xxhash`, or open the store with verify='size'"
            )
        return _xxhash.xxh3_128()
    if algorithm == "blake2b-128":
        return hashlib.blake2b(digest_size=16)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise SoftLabelStoreError(f"unknown checksum algorithm {algorithm!r} in the manifest", field="checksum")


def file_checksum(path: str, algorithm: str) -> str:
    """Hex digest of a whole file's bytes with `algorithm` (xxh3_128, blake2b-128, sha256)."""
    hasher = _new_hasher(algorithm)
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(_CHECKSUM_CHUNK)
            if not chunk:
                break
            hasher.update(chunk)
    return hasher.hexdigest()


def sample_checksum(path: str, algorithm: str) -> str:
    """Hex digest (`algorithm`) of a file's size and its first and last `SAMPLE_BYTES` bytes.

    A cheap identity check of a shard file (two small reads): it covers the `.npy` header
    and the first and last rows, so a file swapped with another shard's, or one whose ends
    were damaged, fails it. Files up to 2·SAMPLE_BYTES are hashed whole.
    """
    hasher = _new_hasher(algorithm)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        hasher.update(str(size).encode("ascii") + b"\n")
        if size <= 2 * SAMPLE_BYTES:
            hasher.update(handle.read())
        else:
            hasher.update(handle.read(SAMPLE_BYTES))
            handle.seek(size - SAMPLE_BYTES)
            hasher.update(handle.read(SAMPLE_BYTES))
    return hasher.hexdigest()


def fsync_directory(directory: str) -> None:
    """Flushes a directory's entries (renames, creations) to disk; no-op off POSIX."""
    if os.name != "posix":  # pragma: no cover - directories cannot be fsynced on Windows
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_name(directory: str, final_name: str, tag: str = "") -> str:
    """Path of the hidden, per-process temporary file written before renaming to `final_name`.

    `tag` (e.g. "r3-" for rank 3) keeps the names of processes on different machines apart.
    """
    return os.path.join(directory, f".{final_name}.tmp-{tag}{os.getpid()}")


def atomic_write_text(directory: str, name: str, text: str, durable: bool, tag: str = "") -> None:
    """Writes `text` to `directory/name` atomically: a hidden temporary file, then a rename.

    With `durable` the file and the directory entry are fsynced. The temporary file is
    removed when anything fails (including KeyboardInterrupt), and the error is re-raised.
    """
    temporary = temporary_name(directory, name, tag)
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, os.path.join(directory, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    if durable:
        fsync_directory(directory)


def utc_now() -> str:
    """The current UTC time as an ISO 8601 string with seconds, for manifest timestamps."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def json_normalised(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, ...), for comparisons."""
    return json.loads(json.dumps(value))
