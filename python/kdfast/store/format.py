"""On-disk format of a soft-label store: constants, storage dtypes, manifest I/O, checksums and errors.

A store is a directory of shards plus `manifest.json`. Shard i holds the soft labels of the
contiguous token range [start_i, stop_i) as little-endian `.npy` files (one per field:
`indices` [n, k], `logprobs` [n, k], `tail_logprob` [n] and optionally the input
`token_ids` [n]); the manifest records the parameters (format version, V, k, temperature,
dtypes, teacher, tokenizer, source description) and, per shard, its token range and each
file's byte size and checksum. This module knows the names, dtypes and limits of that
format, reads and atomically replaces the manifest, checksums files and defines the
errors; it holds no store state. The format is specified in docs/soft_label_store.md.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import numpy as np
import torch

try:  # optional, faster checksums
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - depends on the environment
    _xxhash = None


FORMAT_NAME = "kdfast.SoftLabelStore"
FORMAT_VERSION = 1
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
    """Base class of the errors raised by `SoftLabelStore` and its writer."""


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
    raise SoftLabelStoreError(f"unknown checksum algorithm {algorithm!r} in the manifest")


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


def fsync_directory(directory: str) -> None:
    """Flushes a directory's entries (renames, creations) to disk; no-op off POSIX."""
    if os.name != "posix":  # pragma: no cover - directories cannot be fsynced on Windows
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_name(directory: str, final_name: str) -> str:
    """Path of the hidden, per-process temporary file written before renaming to `final_name`."""
    return os.path.join(directory, f".{final_name}.tmp-{os.getpid()}")


def write_manifest(directory: str, manifest: Mapping[str, Any], durable: bool) -> None:
    """Atomically replaces `directory/manifest.json` (temporary file, fsync, rename)."""
    temporary = temporary_name(directory, MANIFEST_NAME)
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=False)
            handle.write("\n")
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, os.path.join(directory, MANIFEST_NAME))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    if durable:
        fsync_directory(directory)


def read_manifest(directory: str) -> Dict[str, Any]:
    """The parsed `manifest.json` of `directory`, after checking its format name and version.

    Raises:
        FileNotFoundError: `directory` has no manifest.
        SoftLabelStoreError: the manifest is not valid JSON, not a store manifest, or of
            another format version.
    """
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SoftLabelStore: no {MANIFEST_NAME} in {directory!r}; it is not a soft-label store")
    with open(path, "r", encoding="utf-8") as handle:
        try:
            manifest = json.load(handle)
        except json.JSONDecodeError as error:
            raise SoftLabelStoreError(f"SoftLabelStore: {path} is not valid JSON: {error}") from None
    if manifest.get("format") != FORMAT_NAME:
        raise SoftLabelStoreError(f"SoftLabelStore: {path} is not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise SoftLabelStoreError(
            f"SoftLabelStore: {path} has format_version {version}; this kdfast reads version {FORMAT_VERSION}"
        )
    return manifest


def utc_now() -> str:
    """The current UTC time as an ISO 8601 string with seconds, for manifest timestamps."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def json_normalised(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, ...), for comparisons."""
    return json.loads(json.dumps(value))
