"""One store filled by several processes (the ranks of a torch.distributed group): `DistributedStoreWriter`.

The tokens still to write are cut into the shards a one-process writer would make: shard i
covers [c + (i − n)·S, c + (i − n + 1)·S) ∩ [0, N), where n shards cover the committed
tokens [0, c), S is `shard_tokens` and N the stream's length (`shard_grid`). Rank 0 opens
the store (`open_writer`: the writer lock, resume checks, verification) and holds its
writer lock until the end; shards left written but uncommitted by an earlier run
(`kdfast.store.pending`) that pass their checksums are committed if they continue the
store, or kept and not recomputed. The remaining shards are dealt round-robin: rank r
writes shards r, r + W, ... of them, each to its final file names (temporary files tagged
with the rank) and then a pending entry. `commit()` gathers every rank's outcome; rank 0
checks that every shard of the plan has a pending entry of this store with the expected
range and that its files match it (size, `.npy` header, sampled checksum; each writer took
the whole-file checksum right after writing), and commits them all in one atomic manifest
replacement, marking the store complete. If a rank failed or stopped, rank 0 commits the
intact shards that continue the store and leaves the others pending for `--resume`.
Readers only ever see the manifest, so the result is the store one process would write.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from kdfast.contract.softlabels import SoftLabels
from kdfast.store.format import SoftLabelStoreError
from kdfast.store.pending import (
    check_entry,
    contiguous_entries,
    read_pending_entries,
    remove_pending_entries,
    store_key,
    write_pending_entry,
    write_shard_files,
)
from kdfast.store.reader import SoftLabelStore
from kdfast.store.writer import SoftLabelStoreWriter, open_writer, remove_store_files, to_storage

__all__ = ["DistributedStoreWriter", "RankGroup", "ShardRange", "distributed_environment", "shard_grid"]

# Ranks that finish their shards wait for the others at the commit; keep the group's timeout long.
GROUP_TIMEOUT = datetime.timedelta(hours=6)


class ShardRange(NamedTuple):
    """Shard `number` of a store covers tokens [start, stop)."""

    number: int
    start: int
    stop: int


def shard_grid(first_number: int, start: int, num_tokens: int, shard_tokens: int) -> List[ShardRange]:
    """The shards a one-process writer makes from token `start` (its shard `first_number`) to `num_tokens`."""
    return [ShardRange(first_number + offset, position, min(position + shard_tokens, num_tokens))
            for offset, position in enumerate(range(start, num_tokens, shard_tokens))]


def distributed_environment() -> Optional[Tuple[int, int, int]]:
    """(rank, world size, local rank) from the RANK, WORLD_SIZE and LOCAL_RANK variables torchrun sets, when
    WORLD_SIZE > 1; else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    except (KeyError, ValueError):
        return None


class RankGroup:
    """The default torch.distributed process group, created from the environment if none exists yet.

    Args:
        backend: "gloo" (CPU) or "nccl" (CUDA; set the CUDA device first).
    """

    def __init__(self, backend: str) -> None:
        self.owned = not dist.is_initialized()
        if self.owned:
            dist.init_process_group(backend, timeout=GROUP_TIMEOUT)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def gather(self, value: Any) -> List[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        values: List[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def close(self) -> None:
        """Destroys the process group if this object created it."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


class DistributedStoreWriter:
    """One rank's share of a store that every rank of `group` writes (see the module docstring).

    Every rank constructs it with the same arguments (collective). Then each rank writes
    its `shards` in order: `append(soft_labels, token_ids)` the rows of a shard, in token
    order, then `end_shard()`; `discard()` drops a partly appended shard. Finally every rank
    calls `commit()` (collective).

    Args:
        group: the `RankGroup`.
        directory: the store directory (shared by every rank).
        num_tokens: N, the stream's length; the store is complete when it holds N tokens.
        **create: the arguments of `SoftLabelStore.create` (vocab_size, k, temperature,
            dtypes, shard_tokens, teacher, source, resume, overwrite, durable, ...).

    Raises:
        SoftLabelStoreError, FileExistsError, ValueError, OSError: on rank 0 as
            `SoftLabelStore.create` raises them; on the other ranks as SoftLabelStoreError
            with rank 0's message.
    """

    def __init__(self, group: RankGroup, directory: str, *, num_tokens: int, **create: Any) -> None:
        self.group = group
        self.directory = os.fspath(directory)
        self.num_tokens = int(num_tokens)
        self._durable = bool(create.get("durable", True))
        self._writer: Optional[SoftLabelStoreWriter] = None
        self._kept: Dict[int, Dict[str, Any]] = {}
        outcome: Dict[str, Any]
        failure: Optional[BaseException] = None
        if group.rank == 0:
            try:
                outcome = self._open(create)
            except (SoftLabelStoreError, FileExistsError, ValueError, OSError) as error:
                failure, outcome = error, {"error": str(error) or type(error).__name__}
        else:
            outcome = {}
        outcome = group.broadcast(outcome)
        if failure is not None:
            raise failure
        if "error" in outcome:
            raise SoftLabelStoreError(outcome["error"], path=self.directory)
        self.manifest: Dict[str, Any] = outcome["manifest"]
        self._key = store_key(self.manifest)
        todo = [shard for shard in outcome["grid"] if shard.number not in outcome["kept"]]
        self.shards: List[ShardRange] = todo[group.rank::group.world]
        self.planned_tokens = sum(shard.stop - shard.start for shard in todo)
        self._rows: List[Dict[str, Any]] = []
        self._written: List[int] = []
        self._current = 0
        self.computed_tokens = 0

    def _open(self, create: Dict[str, Any]) -> Dict[str, Any]:
        writer = open_writer(self.directory, reader_class=SoftLabelStore, keep_pending=True, **create)
        self._writer = writer
        manifest = writer.manifest
        grid = shard_grid(len(manifest["shards"]), writer.num_tokens, self.num_tokens,
                          int(manifest["shard_tokens"]))
        by_number = {shard.number: shard for shard in grid}
        self._kept = {number: entry for number, entry in writer.kept_pending.items()
                      if number in by_number and (entry["start"], entry["stop"]) == by_number[number][1:]}
        stale = set(writer.kept_pending) - set(self._kept)
        if stale:  # written for another shard size or stream length: recomputed
            remove_store_files(self.directory, include_manifest=False, keep_shards=len(manifest["shards"]),
                               keep=self._kept)
        return {"manifest": manifest, "grid": grid, "kept": sorted(self._kept)}

    @property
    def committed_tokens(self) -> int:
        """Tokens committed when the store was opened (including shards adopted from an earlier run)."""
        return int(self.manifest["num_tokens"])

    def append(self, soft_labels: SoftLabels, token_ids: Optional[torch.Tensor] = None) -> None:
        """Adds rows of the current shard (`shards[i]` after i `end_shard()` calls), in token order."""
        if self._current >= len(self.shards):
            raise SoftLabelStoreError(f"DistributedStoreWriter: rank {self.group.rank} has no shard left to write")
        self._rows.append(to_storage(self.manifest, soft_labels, token_ids, self.directory))

    def discard(self) -> None:
        """Drops the rows appended to the current shard."""
        self._rows = []

    def end_shard(self) -> None:
        """Writes the current shard's files and its pending entry.

        Raises:
            SoftLabelStoreError: the rows appended are not exactly the shard's.
        """
        shard = self.shards[self._current]
        rows = sum(part["tail_logprob"].shape[0] for part in self._rows)
        if rows != shard.stop - shard.start:
            raise SoftLabelStoreError(f"DistributedStoreWriter: shard {shard.number} covers "
                                      f"[{shard.start}, {shard.stop}) but {rows} rows were appended")
        arrays = {field: np.concatenate([part[field] for part in self._rows]) for field in self._rows[0]}
        self._rows = []
        tag = f"r{self.group.rank}-"
        files = write_shard_files(self.directory, shard.number, arrays, self.manifest["checksum"], self._durable, tag)
        entry = {"index": shard.number, "start": shard.start, "stop": shard.stop, "files": files}
        write_pending_entry(self.directory, entry, self._key, self._durable, tag)
        self._written.append(shard.number)
        self._current += 1
        self.computed_tokens += rows

    def commit(self, *, error: Optional[str] = None, stopped: bool = False) -> Dict[str, Any]:
        """Collective: rank 0 checks the written shards and commits them; returns the outcome on every rank.

        Args:
            error: this rank's failure in words, if it failed (its shards written so far are kept).
            stopped: this rank stopped early (interrupted) without an error.

        Returns:
            {"num_tokens": committed tokens, "complete": bool, "errors": ["rank r: ...", ...],
             "pending": shards left written but uncommitted, "computed": tokens written by all ranks}.
        """
        statuses = self.group.gather({"error": error, "stopped": stopped, "written": self._written,
                                      "computed": self.computed_tokens})
        outcome: Dict[str, Any] = {}
        if self.group.rank == 0:
            try:
                outcome = self._commit(statuses)
            except (SoftLabelStoreError, OSError) as failure:
                outcome = {"num_tokens": self._writer.num_tokens, "complete": False, "pending": 0,
                           "errors": [f"rank 0: cannot commit: {failure}"]}
            finally:
                self._writer.close()
            outcome["computed"] = sum(status["computed"] for status in statuses)
        return self.group.broadcast(outcome)

    def _commit(self, statuses: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        writer = self._writer
        errors = [f"rank {rank}: {status['error']}" for rank, status in enumerate(statuses) if status["error"]]
        manifest = writer.manifest
        grid = shard_grid(len(manifest["shards"]), writer.num_tokens, self.num_tokens,
                          int(manifest["shard_tokens"]))
        writers = {number: rank for rank, status in enumerate(statuses) for number in status["written"]}
        entries = read_pending_entries(self.directory, manifest)
        good: Dict[int, Dict[str, Any]] = {}
        for shard in grid:
            entry = entries.get(shard.number)
            who = f"rank {writers[shard.number]}" if shard.number in writers else "an earlier run"
            if entry is None or (entry["start"], entry["stop"]) != (shard.start, shard.stop):
                if shard.number in writers or shard.number in self._kept:
                    errors.append(f"{who}: shard {shard.number} has no pending entry for [{shard.start}, "
                                  f"{shard.stop}) in {self.directory}")
                continue
            problem = check_entry(self.directory, entry, manifest, whole=False)
            if problem is None:
                good[shard.number] = entry
            else:
                errors.append(f"{who}: {problem}")
        chosen = contiguous_entries(manifest, good)
        complete = len(chosen) == len(grid) and not errors and not any(status["stopped"] for status in statuses)
        writer.commit_written(chosen, complete=complete)
        if errors:
            # a shard that fails its check is recomputed by the next run
            remove_pending_entries(self.directory, [shard.number for shard in grid if shard.number not in good])
        return {"num_tokens": writer.num_tokens, "complete": complete, "errors": errors,
                "pending": len(good) - len(chosen)}
