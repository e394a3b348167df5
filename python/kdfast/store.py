"""Crash-safe on-disk store of top-k soft labels for a token stream: `SoftLabelStore`.

A store is a directory of shards plus `manifest.json`. Shard i holds the soft labels of the
contiguous token range [start_i, stop_i) as little-endian `.npy` files (one per field:
`indices` [n, k], `logprobs` [n, k], `tail_logprob` [n] and optionally the input
`token_ids` [n]); the manifest records the parameters (format version, V, k, temperature,
dtypes, teacher, tokenizer, source description) and, per shard, its token range and each
file's byte size and checksum. The manifest is the single source of truth: a shard exists
once the manifest that lists it has been atomically replaced. Every file is written to a
hidden temporary name, fsynced and renamed (`os.replace`), so a crash at any moment leaves
the previous manifest and only complete shards; files not listed in it are ignored and
cleaned up by the next writer. Readers memory-map shards lazily (per process, so a store
pickles cheaply into DataLoader workers), check file sizes and `.npy` headers on every
open, and by default check each shard's checksum the first time the process touches it;
`verify()` checks everything. Problems raise `CorruptShardError` naming the shard file.
The format is specified in docs/soft_label_store.md.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from kdfast.softlabels import SoftLabels, smallest_index_dtype

try:  # optional, faster checksums
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - depends on the environment
    _xxhash = None

try:  # POSIX advisory lock against two writers on one directory
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None

__all__ = [
    "CorruptShardError",
    "FORMAT_VERSION",
    "SoftLabelStore",
    "SoftLabelStoreError",
    "SoftLabelStoreWriter",
    "SoftLabelWindowDataset",
    "StoreMismatchError",
    "soft_label_bytes_per_token",
]

FORMAT_NAME = "kdfast.SoftLabelStore"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".writer.lock"
DEFAULT_SHARD_TOKENS = 1 << 18

# Storage dtypes by manifest name: (numpy dtype of the .npy file, torch dtype returned).
# bfloat16 has no numpy dtype; its bits are stored as little-endian uint16.
_STORAGE_DTYPES: Dict[str, Tuple[np.dtype, torch.dtype]] = {
    "uint16": (np.dtype("<u2"), torch.uint16),
    "int16": (np.dtype("<i2"), torch.int16),
    "int32": (np.dtype("<i4"), torch.int32),
    "int64": (np.dtype("<i8"), torch.int64),
    "float16": (np.dtype("<f2"), torch.float16),
    "bfloat16": (np.dtype("<u2"), torch.bfloat16),
    "float32": (np.dtype("<f4"), torch.float32),
}
_TORCH_TO_NAME = {
    torch.uint16: "uint16",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
}
_INDEX_STORAGE = ("uint16", "int16", "int32", "int64")
_LOGPROB_STORAGE = ("float16", "bfloat16", "float32")
_INDEX_MAX_VOCAB = {"uint16": 1 << 16, "int16": 1 << 15, "int32": (1 << 31) - 1, "int64": (1 << 63) - 1}
_FIELDS = ("indices", "logprobs", "tail_logprob", "token_ids")
_SHARD_FILE = re.compile(r"^shard-(\d{6,})\.(indices|logprobs|tail_logprob|token_ids)\.npy$")
_CHECKSUM_CHUNK = 8 << 20


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
    size = lambda name: _STORAGE_DTYPES[name][0].itemsize  # noqa: E731
    return k * (size(index_dtype) + size(logprob_dtype)) + size(tail_dtype)


def _dtype_name(dtype: Union[str, torch.dtype], allowed: Sequence[str], what: str) -> str:
    name = _TORCH_TO_NAME.get(dtype) if isinstance(dtype, torch.dtype) else str(dtype)
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


def _fsync_directory(directory: str) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be fsynced on Windows
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _temporary_name(directory: str, final_name: str) -> str:
    return os.path.join(directory, f".{final_name}.tmp-{os.getpid()}")


def _write_manifest(directory: str, manifest: Mapping[str, Any], durable: bool) -> None:
    """Atomically replaces `directory/manifest.json` (temporary file, fsync, rename)."""
    temporary = _temporary_name(directory, MANIFEST_NAME)
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
        _fsync_directory(directory)


def _read_manifest(directory: str) -> Dict[str, Any]:
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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _json_normalised(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, ...), for comparisons."""
    return json.loads(json.dumps(value))


# --------------------------------------------------------------------------- reader
class SoftLabelStore:
    """Reads a soft-label store by token range, memory-mapping its shards.

    `store[start:stop]` returns a `SoftLabels` with `indices` [n, k], `logprobs` [n, k],
    `tail_logprob` [n] in the storage dtypes (e.g. uint16/float16/float32; convert with
    `.to(index_dtype=..., logprob_dtype=...)`), n = stop − start; `store[i]` returns one
    row (0-d leading shape). Slices follow Python semantics (negative bounds, clipping);
    steps other than 1 are not supported. The store reflects the manifest as it was when
    it was opened (`reload()` re-reads it), so it can be read while a writer appends.

    Instances are picklable and hold no open file until a shard is read; each process
    (e.g. each DataLoader worker) opens its own memory maps on first use.

    Args:
        directory: the store directory (contains manifest.json).
        verify: "checksum" (default): file sizes are checked on open, and a shard's sizes,
            `.npy` headers and checksums the first time this process reads it (one full
            read of that shard); "size": the same without checksums (use after one
            `verify()` when shards are large). Both raise `CorruptShardError` naming the
            shard file.

    Raises:
        FileNotFoundError: no manifest in `directory`.
        CorruptShardError: a listed shard file is missing or has the wrong size.
    """

    def __init__(self, directory: Union[str, os.PathLike], *, verify: str = "checksum") -> None:
        if verify not in ("checksum", "size"):
            raise ValueError(f"SoftLabelStore: verify must be 'checksum' or 'size', got {verify!r}")
        self.directory = os.fspath(directory)
        self.verify_mode = verify
        self._maps: Dict[int, Dict[str, np.ndarray]] = {}
        self.reload()

    # ------------------------------------------------------------ manifest view
    def reload(self) -> "SoftLabelStore":
        """Re-reads the manifest (e.g. to see shards appended since opening); returns self."""
        manifest = _read_manifest(self.directory)
        self.manifest = manifest
        self._shards: List[Dict[str, Any]] = list(manifest["shards"])
        self._starts = [shard["start"] for shard in self._shards]
        self._maps = {}
        for shard in self._shards:
            self._check_sizes(shard)
        return self

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
    def dtypes(self) -> Dict[str, Optional[str]]:
        """Storage dtype names of indices, logprobs, tail_logprob and token_ids (None if absent)."""
        return dict(self.manifest["dtypes"])

    @property
    def has_token_ids(self) -> bool:
        """Whether shards also store the input token ids."""
        return self.manifest["dtypes"].get("token_ids") is not None

    @property
    def complete(self) -> bool:
        """Whether the writer marked the store finished (all source tokens written)."""
        return bool(self.manifest.get("complete", False))

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def bytes_per_token(self) -> Dict[str, int]:
        """Payload bytes per token: {"soft_labels", "token_ids", "total"} (excludes .npy headers)."""
        return dict(self.manifest["bytes_per_token"])

    @property
    def nbytes(self) -> int:
        """Total size of all shard files on disk (payload plus .npy headers)."""
        return sum(entry["bytes"] for shard in self._shards for entry in shard["files"].values())

    def __len__(self) -> int:
        """Number of committed tokens (rows)."""
        return int(self.manifest["num_tokens"])

    def __repr__(self) -> str:
        return (
            f"SoftLabelStore({self.directory!r}, tokens={len(self)}, shards={self.num_shards}, V={self.vocab_size}, "
            f"k={self.k}, T={self.temperature}, complete={self.complete})"
        )

    # ------------------------------------------------------------ pickling
    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------ shard access
    def _path(self, entry: Mapping[str, Any]) -> str:
        return os.path.join(self.directory, entry["file"])

    def _check_sizes(self, shard: Mapping[str, Any]) -> None:
        for field, entry in shard["files"].items():
            path = self._path(entry)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                raise CorruptShardError(
                    f"SoftLabelStore: shard file {entry['file']} ({field} of tokens [{shard['start']}, "
                    f"{shard['stop']})) is missing from {self.directory}"
                ) from None
            if size != entry["bytes"]:
                raise CorruptShardError(
                    f"SoftLabelStore: shard file {entry['file']} has {size} bytes, the manifest records "
                    f"{entry['bytes']} (truncated or modified)"
                )

    def _check_checksums(self, shard: Mapping[str, Any]) -> None:
        algorithm = self.manifest["checksum"]
        for entry in shard["files"].values():
            actual = file_checksum(self._path(entry), algorithm)
            if actual != entry["checksum"]:
                raise CorruptShardError(
                    f"SoftLabelStore: shard file {entry['file']} fails its {algorithm} checksum "
                    f"(expected {entry['checksum']}, found {actual}): the file was modified or damaged"
                )

    def _shard_arrays(self, shard_number: int) -> Dict[str, np.ndarray]:
        arrays = self._maps.get(shard_number)
        if arrays is not None:
            return arrays
        shard = self._shards[shard_number]
        self._check_sizes(shard)
        if self.verify_mode == "checksum":
            self._check_checksums(shard)
        rows = shard["stop"] - shard["start"]
        arrays = {}
        for field, entry in shard["files"].items():
            dtype_name = self.manifest["dtypes"][field]
            expected_shape = (rows, self.k) if field in ("indices", "logprobs") else (rows,)
            expected_dtype = _STORAGE_DTYPES[dtype_name][0]
            path = self._path(entry)
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as error:
                raise CorruptShardError(f"SoftLabelStore: shard file {entry['file']} is not a readable .npy file: {error}") from None
            if array.shape != expected_shape or array.dtype != expected_dtype or not array.flags.c_contiguous:
                raise CorruptShardError(
                    f"SoftLabelStore: shard file {entry['file']} holds {array.dtype}{list(array.shape)}, the manifest "
                    f"implies {expected_dtype}{list(expected_shape)}"
                )
            arrays[field] = array
        self._maps[shard_number] = arrays
        return arrays

    def _normalise_range(self, start: Optional[int], stop: Optional[int]) -> Tuple[int, int]:
        start, stop, step = slice(start, stop).indices(len(self))
        return start, max(start, stop)

    def _gather(self, field: str, start: int, stop: int) -> torch.Tensor:
        """Copies rows [start, stop) of one field out of the memory maps into a new tensor."""
        dtype_name = self.manifest["dtypes"][field]
        numpy_dtype, torch_dtype = _STORAGE_DTYPES[dtype_name]
        trailing = (self.k,) if field in ("indices", "logprobs") else ()
        output = np.empty((stop - start,) + trailing, dtype=numpy_dtype)
        shard_number = max(0, bisect.bisect_right(self._starts, start) - 1)
        position = start
        while position < stop:
            shard = self._shards[shard_number]
            arrays = self._shard_arrays(shard_number)
            local_start = position - shard["start"]
            local_stop = min(stop, shard["stop"]) - shard["start"]
            count = local_stop - local_start
            output[position - start : position - start + count] = arrays[field][local_start:local_stop]
            position += count
            shard_number += 1
        tensor = torch.from_numpy(output)
        if dtype_name == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return tensor

    def read(self, start: int, stop: int) -> SoftLabels:
        """Soft labels of tokens [start, stop) (Python slice bounds) in the storage dtypes.

        Returns:
            SoftLabels with indices [n, k], logprobs [n, k], tail_logprob [n] on the CPU.
        """
        start, stop = self._normalise_range(start, stop)
        return SoftLabels(
            indices=self._gather("indices", start, stop),
            logprobs=self._gather("logprobs", start, stop),
            tail_logprob=self._gather("tail_logprob", start, stop),
            temperature=self.temperature,
            vocab_size=self.vocab_size,
        )

    def token_ids(self, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """Input token ids of tokens [start, stop) as an int64 tensor [n].

        Raises:
            SoftLabelStoreError: the store was written without token ids.
        """
        if not self.has_token_ids:
            raise SoftLabelStoreError(f"SoftLabelStore: {self.directory} was written without token ids")
        start, stop = self._normalise_range(start, stop)
        ids = self._gather("token_ids", start, stop)
        return ids.to(torch.int32).to(torch.int64) if ids.dtype == torch.uint16 else ids.to(torch.int64)

    def __getitem__(self, index: Union[int, slice]) -> SoftLabels:
        if isinstance(index, slice):
            if index.step not in (None, 1):
                raise IndexError(f"SoftLabelStore supports contiguous slices only, got step {index.step}")
            return self.read(index.start, index.stop)
        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.dim() == 0):
            position = int(index)
            length = len(self)
            if position < 0:
                position += length
            if not 0 <= position < length:
                raise IndexError(f"SoftLabelStore: token {int(index)} is out of range for a store of {length} tokens")
            return self.read(position, position + 1)[0]
        raise TypeError(f"SoftLabelStore indices must be int or slice, got {type(index).__name__}")

    def __iter__(self) -> Iterator[SoftLabels]:
        """Iterates shard by shard, yielding each shard's soft labels."""
        for shard in self._shards:
            yield self.read(shard["start"], shard["stop"])

    def shard_ranges(self) -> List[Tuple[int, int]]:
        """[(start, stop), ...] token range of every committed shard, in order."""
        return [(shard["start"], shard["stop"]) for shard in self._shards]

    def verify(self) -> None:
        """Checks every shard's size, checksum and `.npy` header.

        Raises:
            CorruptShardError: listing every bad shard file found.
        """
        problems = []
        for shard_number, shard in enumerate(self._shards):
            self._maps.pop(shard_number, None)
            try:
                self._check_sizes(shard)
                self._check_checksums(shard)
                saved_mode, self.verify_mode = self.verify_mode, "size"
                try:
                    self._shard_arrays(shard_number)
                finally:
                    self.verify_mode = saved_mode
            except CorruptShardError as error:
                problems.append(str(error))
        if problems:
            raise CorruptShardError(f"{len(problems)} corrupt shard file(s) in {self.directory}:\n" + "\n".join(problems))

    # ------------------------------------------------------------ writing
    @staticmethod
    def create(
        directory: Union[str, os.PathLike],
        *,
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
    ) -> "SoftLabelStoreWriter":
        """Creates a store in `directory` (or, with `resume=True`, reopens one) for writing.

        Args:
            directory: created if missing; must not already hold a store unless `resume`
                or `overwrite` is set. Other files in it are left alone.
            vocab_size: V. k: kept tokens per row, 1 ≤ k ≤ V. temperature: T > 0.
            index_dtype: storage dtype of indices (and token ids): "uint16" (V ≤ 65536),
                "int16" (V ≤ 32768), "int32", "int64"; None (default) picks uint16 when
                V ≤ 65536, else int32.
            logprob_dtype: "float16" (default), "bfloat16" or "float32". The tail is
                always float32.
            with_token_ids: also store the input token id of every row (default False).
            shard_tokens: rows per shard (default 262144); the last shard, and a shard
                written by `flush()`, may be shorter.
            teacher, tokenizer: descriptions (name or path) recorded in the manifest.
            source: JSON-serialisable description of the token stream (e.g. path, token
                count, checksum, sequence length).
            metadata: free-form JSON-serialisable extras, kept from the first run.
            resume: reopen an existing store and append after its committed tokens. The
                committed shards are verified (sizes and checksums) and V, k, T, dtypes,
                token-id storage, teacher, tokenizer and source must equal the recorded
                ones, else `StoreMismatchError` names each difference. Without a store in
                `directory`, starts a new one.
            overwrite: delete an existing store's manifest and shard files first.
            durable: fsync files and the directory after each write (default True).

        Returns:
            A `SoftLabelStoreWriter` holding the directory's writer lock.

        Raises:
            FileExistsError: a store exists and neither resume nor overwrite is set.
            StoreMismatchError: resume with different parameters.
            CorruptShardError: resume over a damaged committed shard.
        """
        directory = os.fspath(directory)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"SoftLabelStore.create: vocab_size must be a positive int, got {vocab_size!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
            raise ValueError(f"SoftLabelStore.create: k must be an int with 1 <= k <= vocab_size={vocab_size}, got {k!r}")
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"SoftLabelStore.create: temperature must be finite and > 0, got {temperature}")
        if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise ValueError(f"SoftLabelStore.create: shard_tokens must be a positive int, got {shard_tokens!r}")
        if resume and overwrite:
            raise ValueError("SoftLabelStore.create: resume and overwrite are mutually exclusive")
        if index_dtype is None:
            index_name = _TORCH_TO_NAME[smallest_index_dtype(vocab_size)]
        else:
            index_name = _dtype_name(index_dtype, _INDEX_STORAGE, "index_dtype")
        if vocab_size > _INDEX_MAX_VOCAB[index_name]:
            raise ValueError(
                f"SoftLabelStore.create: index_dtype {index_name} cannot hold indices of V={vocab_size} "
                f"(max V {_INDEX_MAX_VOCAB[index_name]})"
            )
        logprob_name = _dtype_name(logprob_dtype, _LOGPROB_STORAGE, "logprob_dtype")
        token_bytes = _STORAGE_DTYPES[index_name][0].itemsize if with_token_ids else 0
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
            "source": _json_normalised(dict(source)) if source is not None else None,
        }
        os.makedirs(directory, exist_ok=True)
        lock = _acquire_writer_lock(directory)
        try:
            manifest_path = os.path.join(directory, MANIFEST_NAME)
            exists = os.path.exists(manifest_path)
            if exists and overwrite:
                _remove_store_files(directory, include_manifest=True)
                exists = False
            if exists and not resume:
                raise FileExistsError(
                    f"SoftLabelStore.create: {directory} already holds a soft-label store; pass resume=True "
                    "(CLI: --resume) to continue it or overwrite=True to replace it"
                )
            if exists:
                manifest = _read_manifest(directory)
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
                reader = SoftLabelStore(directory, verify="size")
                reader.verify()
                manifest["shard_tokens"] = shard_tokens
            else:
                manifest = {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    **parameters,
                    "bytes_per_token": {"soft_labels": soft_bytes, "token_ids": token_bytes, "total": soft_bytes + token_bytes},
                    "checksum": default_checksum_algorithm(),
                    "shard_tokens": shard_tokens,
                    "metadata": _json_normalised(dict(metadata)) if metadata is not None else {},
                    "created": _now(),
                    "updated": _now(),
                    "complete": False,
                    "num_tokens": 0,
                    "shards": [],
                }
            _remove_store_files(directory, include_manifest=False, keep_shards=len(manifest["shards"]))
            _write_manifest(directory, manifest, durable)
        except BaseException:
            _release_writer_lock(lock)
            raise
        return SoftLabelStoreWriter(directory, manifest, lock, durable)


def _acquire_writer_lock(directory: str):
    if _fcntl is None:  # pragma: no cover - Windows: no advisory lock
        return None
    handle = open(os.path.join(directory, LOCK_NAME), "a+")
    try:
        _fcntl.flock(handle.fileno(), _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise SoftLabelStoreError(f"SoftLabelStore: another process is writing to {directory}") from None
    return handle


def _release_writer_lock(handle) -> None:
    if handle is not None and not handle.closed:
        with contextlib.suppress(OSError):
            _fcntl.flock(handle.fileno(), _fcntl.LOCK_UN)
        handle.close()


def _remove_store_files(directory: str, *, include_manifest: bool, keep_shards: int = 0) -> None:
    """Removes temporary files, shard files numbered ≥ keep_shards and optionally the manifest."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        match = _SHARD_FILE.match(name)
        if name.startswith(".") and ".tmp-" in name:
            os.remove(path)
        elif match and int(match.group(1)) >= keep_shards:
            os.remove(path)
        elif include_manifest and name == MANIFEST_NAME:
            os.remove(path)


# --------------------------------------------------------------------------- writer
class SoftLabelStoreWriter:
    """Appends soft labels to a store, committing one shard at a time. Made by `SoftLabelStore.create`.

    Rows are buffered in memory and written as a shard every `shard_tokens` rows; each
    shard commit writes its files (temporary name, fsync, rename) and then atomically
    replaces the manifest. `num_tokens` counts committed rows, `pending_tokens` buffered
    ones. Use as a context manager: a normal exit commits the buffered rows (`close()`),
    an exception discards them (`abort()`), leaving the last committed state.
    """

    def __init__(self, directory: str, manifest: Dict[str, Any], lock, durable: bool) -> None:
        self.directory = directory
        self.manifest = manifest
        self._lock = lock
        self._durable = durable
        self._pending: Dict[str, List[np.ndarray]] = {field: [] for field in _FIELDS}
        self._pending_rows = 0
        dtypes = manifest["dtypes"]
        self._index_dtype = _STORAGE_DTYPES[dtypes["indices"]][1]
        self._logprob_dtype = _STORAGE_DTYPES[dtypes["logprobs"]][1]
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

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

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
            raise SoftLabelStoreError(f"SoftLabelStoreWriter: {self.directory} is marked complete; nothing may be appended")
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
            limit = _INDEX_MAX_VOCAB[self.manifest["dtypes"]["token_ids"]]
            if count and (int(ids.min()) < 0 or int(ids.max()) >= limit):
                raise ValueError(
                    f"append: token ids must lie in [0, {limit}) for {self.manifest['dtypes']['token_ids']} storage, "
                    f"found [{int(ids.min())}, {int(ids.max())}]"
                )
            self._pending["token_ids"].append(
                ids.numpy().astype(_STORAGE_DTYPES[self.manifest["dtypes"]["token_ids"]][0])
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
            for field in _FIELDS:
                if field not in taken:
                    continue
                final_name = f"shard-{shard_number:06d}.{field}.npy"
                temporary = _temporary_name(self.directory, final_name)
                written.append(temporary)
                with open(temporary, "wb") as handle:
                    np.lib.format.write_array(handle, np.ascontiguousarray(taken[field]), version=(1, 0), allow_pickle=False)
                    handle.flush()
                    if self._durable:
                        os.fsync(handle.fileno())
                files[field] = {
                    "file": final_name,
                    "bytes": os.path.getsize(temporary),
                    "checksum": file_checksum(temporary, algorithm),
                }
                final_path = os.path.join(self.directory, final_name)
                os.replace(temporary, final_path)
                written[-1] = final_path
            if self._durable:
                _fsync_directory(self.directory)
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
        manifest["updated"] = _now()
        try:
            # The commit point. If it fails before the rename, the shard files are orphans
            # (numbered past the manifest's shards) that the next writer removes.
            _write_manifest(self.directory, manifest, self._durable)
        except BaseException:
            self._fail()
            raise
        self.manifest = manifest
        self._pending_rows -= rows

    def _fail(self) -> None:
        """After a failed commit the buffer no longer matches the disk: refuse further use."""
        self._pending = None
        self._pending_rows = 0
        _release_writer_lock(self._lock)
        self._lock = None

    def discard_pending(self) -> int:
        """Drops the buffered rows without writing them; returns how many were dropped."""
        self._check_open()
        dropped = self._pending_rows
        self._pending = {field: [] for field in _FIELDS}
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
                manifest = dict(self.manifest, complete=True, updated=_now())
                _write_manifest(self.directory, manifest, self._durable)
                self.manifest = manifest
        finally:
            self._pending = None
            _release_writer_lock(self._lock)
            self._lock = None

    def abort(self) -> int:
        """Discards buffered rows and releases the lock; committed shards stay. Returns rows dropped."""
        if self._pending is None:
            return 0
        dropped = self._pending_rows
        self._pending = None
        self._pending_rows = 0
        with contextlib.suppress(OSError):
            _remove_store_files(self.directory, include_manifest=False, keep_shards=len(self.manifest["shards"]))
        _release_writer_lock(self._lock)
        self._lock = None
        return dropped

    def __enter__(self) -> "SoftLabelStoreWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def reader(self, *, verify: str = "size") -> SoftLabelStore:
        """A `SoftLabelStore` over the rows committed so far."""
        return SoftLabelStore(self.directory, verify=verify)


# --------------------------------------------------------------------------- dataset
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
