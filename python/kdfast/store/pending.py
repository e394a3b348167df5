"""Shards written but not yet committed: their files, their entry records, their checks and their adoption.

Several processes can fill one store (`kdfast compress` under torchrun): each writes whole
shards, and one of them commits them all to the manifest at the end. This module holds what
both the ordinary writer and that scheme need. `write_shard_files` writes the `.npy` files of
one shard (temporary name, fsync, rename) and returns their manifest entries.
`write_pending_entry` records a written shard in a hidden `.shard-<i>.pending.json` (atomic
replace) holding the shard's manifest entry and the key of the store it belongs to
(`store_key`: a digest of the manifest's parameters and creation time, so entries of
another store in the same directory are never adopted). `read_pending_entries` returns the
well-formed entries of this store by shard number, `check_entry` checks an entry's files
(size, `.npy` header, then the sampled or the whole-file checksum) and `contiguous_entries`
picks the entries that continue the committed shard table. Uncommitted files never appear
to readers: only the manifest lists shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from kdfast.store.format import (
    FIELDS,
    CorruptShardError,
    atomic_write_text,
    file_checksum,
    fsync_directory,
    sample_checksum,
    temporary_name,
)
from kdfast.store.manifest import canonical_json
from kdfast.store.shards import open_shard_file

PENDING_FILE = re.compile(r"^\.shard-(\d{6,})\.pending\.json$")
_KEY_FIELDS = ("vocab_size", "k", "temperature", "dtypes", "teacher", "tokenizer", "source", "checksum", "created")


def pending_name(number: int) -> str:
    """File name of the pending entry of shard `number`."""
    return f".shard-{number:06d}.pending.json"


def store_key(manifest: Mapping[str, Any]) -> str:
    """blake2b-128 of the manifest's parameters and creation time: identifies the store a shard was written for."""
    chosen = {name: manifest.get(name) for name in _KEY_FIELDS}
    return hashlib.blake2b(canonical_json(chosen).encode("ascii"), digest_size=16).hexdigest()


def write_shard_files(directory: str, number: int, arrays: Mapping[str, np.ndarray], algorithm: str,
                      durable: bool, tag: str = "") -> Dict[str, Dict[str, Any]]:
    """Writes the `.npy` files of shard `number` and returns their manifest entries.

    Each file is written to a hidden temporary name (with `tag` and the process id),
    fsynced when `durable`, checksummed and renamed to `shard-<number>.<field>.npy`; on an
    error the files written so far are removed.

    Args:
        arrays: field name -> storage array ([n, k] or [n], storage dtype), fields in `FIELDS` order.
        algorithm: the file checksum algorithm of the store.

    Returns:
        {field: {"file", "bytes", "checksum", "sample"}}.
    """
    files: Dict[str, Dict[str, Any]] = {}
    written: List[str] = []
    try:
        for field in FIELDS:
            if field not in arrays:
                continue
            final_name = f"shard-{number:06d}.{field}.npy"
            temporary = temporary_name(directory, final_name, tag)
            written.append(temporary)
            with open(temporary, "wb") as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(arrays[field]), version=(1, 0),
                                          allow_pickle=False)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            files[field] = {
                "file": final_name,
                "bytes": os.path.getsize(temporary),
                "checksum": file_checksum(temporary, algorithm),
                "sample": sample_checksum(temporary, algorithm),
            }
            final_path = os.path.join(directory, final_name)
            os.replace(temporary, final_path)
            written[-1] = final_path
        if durable:
            fsync_directory(directory)
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise
    return files


def write_pending_entry(directory: str, entry: Mapping[str, Any], key: str, durable: bool, tag: str = "") -> None:
    """Atomically records a shard whose files are written, as `.shard-<index>.pending.json`.

    Args:
        entry: the shard's manifest entry {"index", "start", "stop", "files"}.
        key: `store_key` of the store's manifest.
    """
    text = json.dumps({"store_key": key, "shard": dict(entry)}, sort_keys=True)
    atomic_write_text(directory, pending_name(entry["index"]), text, durable, tag)


def read_pending_entries(directory: str, manifest: Mapping[str, Any]) -> Dict[int, Dict[str, Any]]:
    """The pending shard entries of this store, by shard number (unreadable or foreign records are skipped)."""
    key = store_key(manifest)
    fields = sorted(field for field in FIELDS if manifest["dtypes"][field] is not None)
    entries: Dict[int, Dict[str, Any]] = {}
    for name in os.listdir(directory):
        match = PENDING_FILE.match(name)
        if not match:
            continue
        try:
            with open(os.path.join(directory, name), "r", encoding="utf-8") as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            continue
        shard = record.get("shard") if isinstance(record, dict) else None
        number = int(match.group(1))
        if record.get("store_key") != key or not isinstance(shard, dict) or shard.get("index") != number \
                or not isinstance(shard.get("files"), dict) or sorted(shard["files"]) != fields \
                or not all(isinstance(shard.get(bound), int) for bound in ("start", "stop")):
            continue
        entries[number] = shard
    return entries


def check_entry(directory: str, entry: Mapping[str, Any], manifest: Mapping[str, Any], *, whole: bool) -> Optional[str]:
    """None if the entry's files match it (size, `.npy` header, checksum), else the problem in words.

    Args:
        whole: compare whole-file checksums (a full read) rather than the sampled ones.
    """
    algorithm = manifest["checksum"]
    try:
        for field, recorded in entry["files"].items():
            if recorded.get("file") != f"shard-{entry['index']:06d}.{field}.npy":
                return f"shard {entry['index']}: {field} is recorded as {recorded.get('file')!r}"
            open_shard_file(directory, entry, field, manifest)
            path = os.path.join(directory, recorded["file"])
            key = "checksum" if whole else "sample"
            actual = file_checksum(path, algorithm) if whole else sample_checksum(path, algorithm)
            if actual != recorded.get(key):
                return f"shard file {recorded['file']} fails its {'' if whole else 'sampled '}{algorithm} checksum"
    except CorruptShardError as error:
        return str(error)
    except (OSError, KeyError, TypeError) as error:
        return f"shard {entry.get('index')}: {error}"
    return None


def contiguous_entries(manifest: Mapping[str, Any], entries: Mapping[int, Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The entries numbered len(shards), len(shards) + 1, ... that continue the committed token range."""
    chosen: List[Dict[str, Any]] = []
    number, position = len(manifest["shards"]), int(manifest["num_tokens"])
    while number in entries and entries[number]["start"] == position and entries[number]["stop"] > position:
        chosen.append(dict(entries[number]))
        position = entries[number]["stop"]
        number += 1
    return chosen


def remove_pending_entries(directory: str, numbers) -> None:
    """Removes the pending entry files of the given shard numbers (missing ones are ignored)."""
    for number in numbers:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(directory, pending_name(number)))
