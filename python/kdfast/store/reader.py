"""Reading a soft-label store by token range: `SoftLabelStore`.

The store reflects its manifest as read at open (or `reload()`). Opening reads and checks
the manifest (fields, shard table, its checksum; see `kdfast.store.manifest`) and every
listed shard file's size and `.npy` header (see `kdfast.store.shards`). The first time a
process reads a shard it also checks the shard's files against their checksums (whole
files with `verify="checksum"`, the default; both ends with `verify="size"`); `verify()`
checks everything. Rows are read with positional reads that keep no file open, so a store
pickles cheaply into DataLoader workers and works with any number of shards. Problems
raise `ManifestError` or `CorruptShardError` naming the file. `SoftLabelStore.create`
returns a `SoftLabelStoreWriter` (see `kdfast.store.writer.open_writer`). The format is
specified in docs/soft_label_store.md.
"""

from __future__ import annotations

import bisect
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

import numpy as np
import torch

from kdfast.contract.softlabels import SoftLabels
from kdfast.store.format import (
    DEFAULT_SHARD_TOKENS,
    STORAGE_DTYPES,
    CorruptShardError,
    ManifestFields,
    SoftLabelStoreError,
    file_checksum,
    sample_checksum,
)
from kdfast.store.manifest import read_manifest
from kdfast.store.shards import ShardFile, check_identity, open_shard_file, read_rows
from kdfast.store.writer import SoftLabelStoreWriter, open_writer


class SoftLabelStore(ManifestFields):
    """Reads a soft-label store by token range.

    `store[start:stop]` returns a `SoftLabels` with `indices` [n, k], `logprobs` [n, k],
    `tail_logprob` [n] in the storage dtypes (e.g. uint16/float16/float32; convert with
    `.to(index_dtype=..., logprob_dtype=...)`), n = stop − start; `store[i]` returns one
    row (0-d leading shape). Slices follow Python semantics (negative bounds, clipping);
    steps other than 1 are not supported. The store reflects the manifest as it was when
    it was opened (`reload()` re-reads it), so it can be read while a writer appends.

    Opening validates the manifest (every field, the shard table, its checksum) and checks
    every shard file's size and `.npy` header against it. Instances are picklable and hold
    no open file: each read opens the shard files it needs and closes them again, so a
    store may have any number of shards. Every read checks that the indices lie in
    [0, vocab_size).

    Args:
        directory: the store directory (contains manifest.json).
        verify: when this process first reads a shard, check its files' "checksum"
            (default; one full read of the shard per process) or, with "size", only a
            checksum of each file's first and last 64 KiB (for large stores already checked
            once with `verify()`).

    Raises:
        FileNotFoundError: no manifest in `directory`.
        ManifestError: the manifest is malformed, edited after it was written, or
            inconsistent (naming the field).
        CorruptShardError: a listed shard file is missing, has the wrong size or a header
            that does not match the manifest (naming the file).
    """

    def __init__(self, directory: Union[str, os.PathLike], *, verify: str = "checksum") -> None:
        if verify not in ("checksum", "size"):
            raise ValueError(f"SoftLabelStore: verify must be 'checksum' or 'size', got {verify!r}")
        self.directory = os.fspath(directory)
        self.verify_mode = verify
        self._verified: Set[int] = set()
        self.reload()

    # ------------------------------------------------------------ manifest view
    def reload(self) -> "SoftLabelStore":
        """Re-reads the manifest (e.g. to see shards appended since opening) and rechecks every shard file's
        size and header; returns self."""
        manifest = read_manifest(self.directory)
        fields = [field for field, dtype in manifest["dtypes"].items() if dtype is not None]
        files = [{field: open_shard_file(self.directory, shard, field, manifest) for field in fields}
                 for shard in manifest["shards"]]
        self.manifest = manifest
        self._shards: List[Dict[str, Any]] = list(manifest["shards"])
        self._starts = [shard["start"] for shard in self._shards]
        self._files: List[Dict[str, ShardFile]] = files
        self._verified = set()
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

    @property
    def window(self) -> Optional[int]:
        """Tokens per teacher window (`manifest["source"]["seq_len"]`, as `kdfast compress` records it), or
        None when the manifest does not say."""
        source = self.manifest.get("source")
        length = source.get("seq_len") if isinstance(source, dict) else None
        return length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None

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
        state["_verified"] = set()  # every process checks the shards it reads itself
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------ shard access
    def _check_checksums(self, shard_number: int, whole: bool) -> None:
        algorithm = self.manifest["checksum"]
        for field, entry in self._shards[shard_number]["files"].items():
            path = os.path.join(self.directory, entry["file"])
            if whole:
                expected, actual = entry["checksum"], file_checksum(path, algorithm)
            elif "sample" in entry:
                expected, actual = entry["sample"], sample_checksum(path, algorithm)
            else:  # format version 1 recorded no sampled checksum
                continue
            if actual != expected:
                what = "" if whole else "sampled (first and last 64 KiB) "
                raise CorruptShardError(
                    f"SoftLabelStore: shard file {entry['file']} fails its {what}{algorithm} checksum "
                    f"(expected {expected}, found {actual}): the file was modified, damaged or swapped with another",
                    path=path, field=field)

    def _shard_files(self, shard_number: int) -> Dict[str, ShardFile]:
        """The checked files of a shard; on this process's first use, checks them against their checksums."""
        if shard_number not in self._verified:
            for shard_file in self._files[shard_number].values():
                check_identity(shard_file)
            self._check_checksums(shard_number, whole=self.verify_mode == "checksum")
            self._verified.add(shard_number)
        return self._files[shard_number]

    def _normalise_range(self, start: Optional[int], stop: Optional[int]) -> Tuple[int, int]:
        start, stop, step = slice(start, stop).indices(len(self))
        return start, max(start, stop)

    def read_into(self, field: str, start: int, out: np.ndarray) -> None:
        """Reads rows [start, start + len(out)) of one field straight from the shard files into `out`.

        Args:
            field: "indices", "logprobs", "tail_logprob" or "token_ids".
            start: first row, 0 <= start and start + len(out) <= len(store).
            out: C-contiguous array [n, k] (indices, logprobs) or [n] in the storage dtype
                (`numpy.dtype` of `STORAGE_DTYPES`; uint16 bits for bfloat16), e.g. a view
                of a slot of a (pinned) batch tensor: no other copy is made.

        Raises:
            CorruptShardError: as `read`.
        """
        stop = start + out.shape[0]
        if start < 0 or stop > len(self):
            raise IndexError(f"SoftLabelStore: rows [{start}, {stop}) are outside the {len(self)} stored rows")
        shard_number = max(0, bisect.bisect_right(self._starts, start) - 1)
        position = start
        while position < stop:
            shard = self._shards[shard_number]
            shard_file = self._shard_files(shard_number)[field]
            local_start = position - shard["start"]
            count = min(stop, shard["stop"]) - position
            chunk = out[position - start : position - start + count]
            read_rows(shard_file, local_start, chunk)
            if field == "indices" and chunk.size:
                low, high = int(chunk.min()), int(chunk.max())
                if low < 0 or high >= self.vocab_size:
                    bad = high if high >= self.vocab_size else low
                    raise CorruptShardError(
                        f"SoftLabelStore: shard file {shard_file.name} holds index {bad} "
                        f"in tokens [{position}, {position + count}), outside [0, vocab_size={self.vocab_size}): "
                        "the shard or the manifest's vocab_size is wrong", path=shard_file.path, field="vocab_size")
            position += count
            shard_number += 1

    def _gather(self, field: str, start: int, stop: int) -> torch.Tensor:
        """Reads rows [start, stop) of one field from the shard files into a new tensor."""
        dtype_name = self.manifest["dtypes"][field]
        trailing = (self.k,) if field in ("indices", "logprobs") else ()
        output = np.empty((stop - start,) + trailing, dtype=STORAGE_DTYPES[dtype_name][0])
        self.read_into(field, start, output)
        tensor = torch.from_numpy(output)
        if dtype_name == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return tensor

    def read(self, start: int, stop: int) -> SoftLabels:
        """Soft labels of tokens [start, stop) (Python slice bounds) in the storage dtypes.

        Returns:
            SoftLabels with indices [n, k], logprobs [n, k], tail_logprob [n] on the CPU.

        Raises:
            CorruptShardError: a shard file read fails its checksum, was replaced since the
                store was opened, or holds indices outside [0, vocab_size).
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
            raise SoftLabelStoreError(f"SoftLabelStore: {self.directory} was written without token ids",
                                      path=self.directory, field="token_ids")
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

    def verify(self, progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Checks every shard file's size, `.npy` header and checksums (a full read of the store).

        Args:
            progress: None, or a callable `progress(shard_number, shard_tokens)` called after
                each shard is checked (e.g. to advance a progress bar).

        Raises:
            CorruptShardError: listing every bad shard file found.
        """
        problems = []
        fields = [field for field, dtype in self.manifest["dtypes"].items() if dtype is not None]
        for shard_number, shard in enumerate(self._shards):
            self._verified.discard(shard_number)
            try:
                files = {field: open_shard_file(self.directory, shard, field, self.manifest) for field in fields}
                if files != self._files[shard_number]:
                    raise CorruptShardError(
                        f"SoftLabelStore: a file of shard {shard_number} was replaced or modified after the store "
                        "was opened; reopen the store (or call reload())", path=self.directory)
                self._check_checksums(shard_number, whole=True)
                self._check_checksums(shard_number, whole=False)
                self._verified.add(shard_number)
            except CorruptShardError as error:
                problems.append(str(error))
            if progress is not None:
                progress(shard_number, int(shard["stop"]) - int(shard["start"]))
        if problems:
            raise CorruptShardError(
                f"{len(problems)} corrupt shard file(s) in {self.directory}:\n" + "\n".join(problems),
                path=self.directory)

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
                ones, else `StoreMismatchError` names each difference. Shards that the
                ranks of an interrupted several-process run wrote but did not commit are
                committed when their files pass their checksums and they continue the
                store; the others are removed. Without a store in `directory`, starts a
                new one.
            overwrite: delete an existing store's manifest and shard files first.
            durable: fsync files and the directory after each write (default True).

        Returns:
            A `SoftLabelStoreWriter` holding the directory's writer lock.

        Raises:
            FileExistsError: a store exists and neither resume nor overwrite is set.
            StoreMismatchError: resume with different parameters.
            CorruptShardError, ManifestError: resume over a damaged shard or manifest.
        """
        return open_writer(
            directory, reader_class=SoftLabelStore, vocab_size=vocab_size, k=k, temperature=temperature,
            index_dtype=index_dtype, logprob_dtype=logprob_dtype, with_token_ids=with_token_ids,
            shard_tokens=shard_tokens, teacher=teacher, tokenizer=tokenizer, source=source, metadata=metadata,
            resume=resume, overwrite=overwrite, durable=durable,
        )
