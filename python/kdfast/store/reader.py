"""Reading a soft-label store by token range: `SoftLabelStore`.

The store reflects its manifest as read at open (or `reload()`): shards listed there are
memory-mapped lazily, per process, so a store pickles cheaply into DataLoader workers.
File sizes are checked on every open, `.npy` headers on a shard's first use and, by
default, each shard's checksum the first time the process touches it; `verify()` checks
everything. Problems raise `CorruptShardError` naming the shard file. `SoftLabelStore.create`
validates the parameters, builds or checks the manifest (resume) under the writer lock and
returns a `SoftLabelStoreWriter`. The format is specified in docs/soft_label_store.md.
"""

from __future__ import annotations

import bisect
import math
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from kdfast.contract.softlabels import SoftLabels, smallest_index_dtype
from kdfast.store.format import (
    DEFAULT_SHARD_TOKENS,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_MAX_VOCAB,
    INDEX_STORAGE,
    LOGPROB_STORAGE,
    MANIFEST_NAME,
    STORAGE_DTYPES,
    TORCH_TO_NAME,
    CorruptShardError,
    ManifestFields,
    SoftLabelStoreError,
    StoreMismatchError,
    default_checksum_algorithm,
    file_checksum,
    json_normalised,
    read_manifest,
    soft_label_bytes_per_token,
    storage_dtype_name,
    utc_now,
    write_manifest,
)
from kdfast.store.writer import SoftLabelStoreWriter, acquire_writer_lock, release_writer_lock, remove_store_files


class SoftLabelStore(ManifestFields):
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
        manifest = read_manifest(self.directory)
        self.manifest = manifest
        self._shards: List[Dict[str, Any]] = list(manifest["shards"])
        self._starts = [shard["start"] for shard in self._shards]
        self._maps = {}
        for shard in self._shards:
            self._check_sizes(shard)
        return self




    @property
    def dtypes(self) -> Dict[str, Optional[str]]:
        """Storage dtype names of indices, logprobs, tail_logprob and token_ids (None if absent)."""
        return dict(self.manifest["dtypes"])

    @property
    def has_token_ids(self) -> bool:
        """Whether shards also store the input token ids."""
        return self.manifest["dtypes"].get("token_ids") is not None


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
            expected_dtype = STORAGE_DTYPES[dtype_name][0]
            path = self._path(entry)
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as error:
                raise CorruptShardError(
                    f"SoftLabelStore: shard file {entry['file']} is not a readable .npy file: {error}"
                ) from None
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
        numpy_dtype, torch_dtype = STORAGE_DTYPES[dtype_name]
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
            raise CorruptShardError(
                f"{len(problems)} corrupt shard file(s) in {self.directory}:\n" + "\n".join(problems)
            )

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
                reader = SoftLabelStore(directory, verify="size")
                reader.verify()
                manifest["shard_tokens"] = shard_tokens
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
            write_manifest(directory, manifest, durable)
        except BaseException:
            release_writer_lock(lock)
            raise
        return SoftLabelStoreWriter(directory, manifest, lock, durable, reader_class=SoftLabelStore)
