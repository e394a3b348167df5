"""Shard files of a soft-label store: header checks on open, and reads that keep no file open.

`open_shard_file` stats a shard file listed in the manifest, parses its `.npy` header and
checks it against the manifest (byte count, dtype, shape [rows, k] or [rows], C order, and
header plus payload filling the file exactly); it returns a `ShardFile` recording where the
payload starts and the file's identity (device, inode, size, modification time).
`read_rows` opens the file, checks that identity, reads whole rows at their offset straight
into the caller's array and closes the file again: a store holds no file descriptor and no
memory map between reads, so it can have any number of shards under any open-file limit,
and a shard file replaced since it was opened is reported instead of read. Problems raise
`CorruptShardError` naming the shard file.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Tuple

import numpy as np

from kdfast.store.format import STORAGE_DTYPES, CorruptShardError
from kdfast.store.manifest import row_bytes


class ShardFile(NamedTuple):
    """One checked shard file: where its rows are and which file it was when checked."""

    name: str  # file name, for messages
    path: str
    field: str  # indices, logprobs, tail_logprob or token_ids
    offset: int  # byte offset of row 0 (the .npy header length)
    row_bytes: int
    identity: Tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns when checked


def _identity(status: os.stat_result) -> Tuple[int, int, int, int]:
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def open_shard_file(directory: str, shard: Mapping[str, Any], field: str, manifest: Mapping[str, Any]) -> ShardFile:
    """Checks one file of a shard against the manifest and returns its `ShardFile`.

    Args:
        directory: the store directory. shard: the shard's manifest entry.
        field: "indices", "logprobs", "tail_logprob" or "token_ids".
        manifest: the (validated) manifest, for k and the dtypes.

    Raises:
        CorruptShardError: the file is missing, its size differs from the manifest's
            (truncated or modified), it is not a readable `.npy` file, or its header's
            dtype, shape or order differ from what the manifest implies.
    """
    entry = shard["files"][field]
    name = entry["file"]
    path = os.path.join(directory, name)
    rows = shard["stop"] - shard["start"]
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise CorruptShardError(
            f"SoftLabelStore: shard file {name} ({field} of tokens [{shard['start']}, {shard['stop']})) is missing "
            f"from {directory}", path=path, field=field) from None
    with handle:
        status = os.fstat(handle.fileno())
        if status.st_size != entry["bytes"]:
            raise CorruptShardError(
                f"SoftLabelStore: shard file {name} has {status.st_size} bytes, the manifest records {entry['bytes']} "
                "(truncated or modified)", path=path, field=field)
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except (ValueError, OSError, SyntaxError) as error:
            raise CorruptShardError(f"SoftLabelStore: shard file {name} is not a readable .npy file: {error}",
                                    path=path, field=field) from None
        offset = handle.tell()
    dtype_name = manifest["dtypes"][field]
    expected_dtype = STORAGE_DTYPES[dtype_name][0]
    expected_shape = (rows, manifest["k"]) if field in ("indices", "logprobs") else (rows,)
    if tuple(shape) != expected_shape or dtype != expected_dtype or fortran_order:
        order = ", Fortran order" if fortran_order else ""
        raise CorruptShardError(
            f"SoftLabelStore: shard file {name} holds {dtype}{list(shape)}{order}, the manifest implies "
            f"{expected_dtype}{list(expected_shape)} ({field} of tokens [{shard['start']}, {shard['stop']}))",
            path=path, field=field)
    width = row_bytes(field, manifest["k"], dtype_name)
    if offset + rows * width != status.st_size:
        raise CorruptShardError(
            f"SoftLabelStore: shard file {name} has {status.st_size} bytes, its header implies {offset + rows * width}",
            path=path, field=field)
    return ShardFile(name, path, field, offset, width, _identity(status))


def _replaced(shard_file: ShardFile) -> CorruptShardError:
    return CorruptShardError(
        f"SoftLabelStore: shard file {shard_file.name} was replaced or modified after the store was opened; "
        "reopen the store (or call reload())", path=shard_file.path, field=shard_file.field)


def check_identity(shard_file: ShardFile) -> None:
    """Raises `CorruptShardError` if the file is gone or is not the one checked when the store was opened."""
    try:
        status = os.stat(shard_file.path)
    except FileNotFoundError:
        raise _replaced(shard_file) from None
    if _identity(status) != shard_file.identity:
        raise _replaced(shard_file)


def read_rows(shard_file: ShardFile, first_row: int, out: np.ndarray) -> None:
    """Reads rows [first_row, first_row + len(out)) of a shard file into `out` (C-contiguous).

    The file is opened for this read only.

    Raises:
        CorruptShardError: the file is gone, was replaced or modified since it was checked
            (identity differs), or ends early.
    """
    if out.size == 0:
        return
    memory = memoryview(out.reshape(-1).view(np.uint8))
    try:
        handle = open(shard_file.path, "rb", buffering=0)
    except FileNotFoundError:
        raise _replaced(shard_file) from None
    with handle:
        if _identity(os.fstat(handle.fileno())) != shard_file.identity:
            raise _replaced(shard_file)
        handle.seek(shard_file.offset + first_row * shard_file.row_bytes)
        filled = 0
        while filled < len(memory):
            count = handle.readinto(memory[filled:])
            if not count:
                raise CorruptShardError(f"SoftLabelStore: shard file {shard_file.name} ended early",
                                        path=shard_file.path, field=shard_file.field)
            filled += count
