"""Merging stores written separately (e.g. one per node) into one store: `merge_stores`.

The inputs must be complete stores with the same vocabulary size, k, temperature, storage
dtypes (token ids stored or not), teacher and tokenizer (`MergeMismatchError` names the
first field that differs) and, when they record a teacher window length, the same one, with
every input but the last holding whole windows (so the windows of the merged store are the
teachers'). The output holds the inputs' tokens concatenated in the order given: every
input shard becomes one output shard, renumbered, its files copied under a temporary name,
checksummed (the copy must match the input's recorded checksum), fsynced and renamed; then
one atomic manifest replacement commits them all and marks the store complete, with a
`source` that lists the parts. The output is verified after the commit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence, Union

from kdfast.store.format import (
    CorruptShardError,
    SoftLabelStoreError,
    file_checksum,
    fsync_directory,
    sample_checksum,
    temporary_name,
)
from kdfast.store.reader import SoftLabelStore

__all__ = ["MergeMismatchError", "merge_stores"]

MATCHED_FIELDS = ("vocab_size", "k", "temperature", "dtypes", "teacher", "tokenizer")


class MergeMismatchError(SoftLabelStoreError, ValueError):
    """Stores to merge differ in a field that must be equal (named by the error's `field`)."""


def _check_inputs(stores: Sequence[SoftLabelStore]) -> Optional[int]:
    """Raises unless the stores can be concatenated; returns their common teacher window length (or None)."""
    first = stores[0]
    for store in stores:
        if not store.complete:
            source_tokens = (store.manifest.get("source") or {}).get("num_tokens")
            of = f" of {source_tokens}" if source_tokens else ""
            raise SoftLabelStoreError(f"{store.directory} is not complete ({len(store)}{of} tokens); finish it "
                                      "(kdfast compress --resume) before merging", path=store.directory,
                                      field="complete")
        for field in MATCHED_FIELDS:
            if store.manifest.get(field) != first.manifest.get(field):
                raise MergeMismatchError(
                    f"{store.directory}: field {field!r} is {store.manifest.get(field)!r}, {first.directory} has "
                    f"{first.manifest.get(field)!r}; merged stores must have the same {', '.join(MATCHED_FIELDS)}",
                    path=store.directory, field=field)
    windows = {store.window for store in stores}
    if len(windows) > 1:
        raise MergeMismatchError(
            "the stores record different teacher windows (source.seq_len): "
            + ", ".join(f"{store.directory}: {store.window}" for store in stores), field="source.seq_len")
    window = windows.pop()
    for store in stores[:-1]:
        if window is not None and len(store) % window:
            raise MergeMismatchError(
                f"{store.directory} holds {len(store)} tokens, not a multiple of its teacher window {window}: the "
                "windows of the stores after it would not line up; put it last", path=store.directory,
                field="source.seq_len")
    return window


def merge_stores(out: Union[str, os.PathLike], paths: Sequence[Union[str, os.PathLike]], *,
                 durable: bool = True) -> SoftLabelStore:
    """Writes the concatenation of the stores at `paths` (in that order) as a new store in `out`.

    Args:
        out: the output directory: new, or without a store in it.
        paths: at least one input store directory.
        durable: fsync files and directories (default True).

    Returns:
        The merged store, opened and fully verified.

    Raises:
        MergeMismatchError: the inputs differ in k, vocab_size, temperature, dtypes, teacher,
            tokenizer or teacher window, or a window is cut between two inputs.
        SoftLabelStoreError: an input is incomplete or damaged (`CorruptShardError`), or `out`
            already holds a store (`FileExistsError`).
    """
    if not paths:
        raise ValueError("merge_stores: no input store")
    out = os.path.abspath(os.fspath(out))
    stores = [SoftLabelStore(path, verify="size") for path in paths]
    if any(os.path.abspath(store.directory) == out for store in stores):
        raise ValueError(f"merge_stores: the output {out} is also an input")
    window = _check_inputs(stores)
    first = stores[0].manifest
    source = {"format": "merged", "num_tokens": sum(len(store) for store in stores), "seq_len": window,
              "parts": [{"path": os.path.abspath(store.directory), "num_tokens": len(store),
                         "source": store.manifest.get("source")} for store in stores]}
    metadata = {"kdfast_command": "merge",
                "parts": [{"path": os.path.abspath(store.directory), "created": store.manifest.get("created"),
                           "metadata": store.manifest.get("metadata")} for store in stores]}
    writer = SoftLabelStore.create(
        out, vocab_size=first["vocab_size"], k=first["k"], temperature=first["temperature"],
        index_dtype=first["dtypes"]["indices"], logprob_dtype=first["dtypes"]["logprobs"],
        with_token_ids=first["dtypes"]["token_ids"] is not None, shard_tokens=first["shard_tokens"],
        teacher=first.get("teacher"), tokenizer=first.get("tokenizer"), source=source, metadata=metadata,
        durable=durable)
    try:
        entries = _copy_shards(out, stores, writer.manifest["checksum"], durable)
        writer.commit_written(entries, complete=True)
    finally:
        writer.abort()
    merged = SoftLabelStore(out)
    merged.verify()
    return merged


def _copy_shards(out: str, stores: Sequence[SoftLabelStore], algorithm: str, durable: bool) -> List[Dict[str, Any]]:
    """Copies every input shard into `out` as the next shard; returns their manifest entries."""
    entries: List[Dict[str, Any]] = []
    position = 0
    for store in stores:
        for shard in store.manifest["shards"]:
            number = len(entries)
            files: Dict[str, Dict[str, Any]] = {}
            for field, entry in shard["files"].items():
                name = f"shard-{number:06d}.{field}.npy"
                temporary = temporary_name(out, name)
                try:
                    shutil.copyfile(os.path.join(store.directory, entry["file"]), temporary)
                    if durable:
                        with open(temporary, "rb+") as handle:
                            os.fsync(handle.fileno())
                    copied = file_checksum(temporary, store.manifest["checksum"])
                    if copied != entry["checksum"]:
                        raise CorruptShardError(
                            f"{store.directory}: shard file {entry['file']} fails its {store.manifest['checksum']} "
                            "checksum; run kdfast store verify on it", path=os.path.join(store.directory,
                                                                                         entry["file"]), field=field)
                    same = algorithm == store.manifest["checksum"]
                    files[field] = {"file": name, "bytes": entry["bytes"],
                                    "checksum": copied if same else file_checksum(temporary, algorithm),
                                    "sample": sample_checksum(temporary, algorithm)}
                    os.replace(temporary, os.path.join(out, name))
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.remove(temporary)
                    raise
            rows = shard["stop"] - shard["start"]
            entries.append({"index": number, "start": position, "stop": position + rows, "files": files})
            position += rows
    if durable:
        fsync_directory(out)
    return entries
