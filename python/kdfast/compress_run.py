"""Running the teacher of `kdfast compress`: token ranges, stop requests, and the several-process run.

`labelled_rows` runs the teacher over the calls of the fixed batch plan that hold a token
range and yields the soft labels of exactly that range, so any split of the stream yields
the rows of one run over all of it. `StopRequest` turns the first Ctrl-C/SIGTERM into a
request to stop after the current batch. `run_on_ranks` is `kdfast compress` when it runs
under torchrun (WORLD_SIZE > 1): the ranks join a process group (gloo on the CPU, nccl on
CUDA, where `--device cuda` means `cuda:LOCAL_RANK`), check that they all read the same
token stream and teacher, and fill one store with a `kdfast.store.distributed.
DistributedStoreWriter`: each rank computes its round-robin share of the shards a
one-process run would write, and rank 0 commits them at the end, so the store equals a
one-process store of the same data. A user error is printed once, by rank 0, naming the
rank that met it (`RankError` is printed by the rank that raises it: it lost the others).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from kdfast.argparsing import EXIT_OK, UsageError, one_line
from kdfast.contract.softlabels import SoftLabels
from kdfast.functional import compress_topk
from kdfast.kept_mass import KeptMassStats, kept_mass_warning
from kdfast.store import SoftLabelStore, SoftLabelStoreError
from kdfast.store.distributed import DistributedStoreWriter, RankGroup
from kdfast.teachers import TeacherError
from kdfast.token_stream import batch_plan, token_stream_checksum

__all__ = ["EXIT_INTERRUPTED", "RankError", "StopRequest", "check_logits", "labelled_rows", "report_summary",
           "run_on_ranks", "token_tensor"]

EXIT_INTERRUPTED = 130


class RankError(UsageError):
    """A failure only this rank saw (it lost contact with the others): printed by this rank."""


class StopRequest:
    """First SIGINT/SIGTERM sets `requested`; a second SIGINT raises KeyboardInterrupt.

    The notice (`message`, printed when `announce`) is written with `os.write` (no
    Python-level buffering), which is safe inside a signal handler even when the
    interrupted code was printing.
    """

    def __init__(self, announce: bool, message: str = "stopping after the current batch and committing it "
                                                      "(press Ctrl-C again to abort without committing)") -> None:
        self.requested = False
        self._announce = announce
        self._message = f"\nkdfast compress: {message}\n".encode()
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self._announce:
            os.write(2, self._message)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def token_tensor(tokens: np.ndarray, first: int, end: int, windows: int) -> torch.Tensor:
    """Tokens [first, end) as a fresh int64 tensor [windows, (end - first) / windows] (a copy: the map is read-only)."""
    return torch.from_numpy(np.array(tokens[first:end], dtype=np.int64)).view(windows, -1)


def check_logits(logits: torch.Tensor, vocab_size: int, first: int, end: int) -> None:
    """Raises `UsageError` unless the teacher's logits [..., V] have width `vocab_size` and no NaN or +inf."""
    if logits.shape[-1] != vocab_size:
        raise UsageError(f"the teacher returned V={logits.shape[-1]} for tokens [{first}, {end}), "
                         f"earlier V={vocab_size}")
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        raise UsageError(f"the teacher's logits contain NaN or +inf for tokens [{first}, {end})")


def labelled_rows(teacher, tokens: np.ndarray, args: argparse.Namespace, vocab_size: int, start: int,
                  stop: int) -> Iterator[Tuple[SoftLabels, torch.Tensor]]:
    """Yields (soft labels [n], token ids [n] int64) of tokens [start, stop), one teacher call of the plan at a time.

    The calls are those of the whole stream's plan (`args.seq_len`, `args.batch_size`) that
    hold a token of the range, so the rows equal those of a run over the whole stream; rows
    outside the range are dropped.
    """
    for first, end, windows in batch_plan(int(tokens.shape[0]), args.seq_len, args.batch_size, start=start,
                                          stop=stop):
        token_ids = token_tensor(tokens, first, end, windows)
        logits = teacher(token_ids)
        check_logits(logits, vocab_size, first, end)
        labels = compress_topk(logits, args.k, temperature=args.temperature, index_dtype=torch.int32).flatten()
        low, high = max(start, first) - first, min(stop, end) - first
        yield labels[low:high], token_ids.reshape(-1)[low:high]


def report_summary(args: argparse.Namespace, vocab_size: int, computed: int, elapsed: float, kept: KeptMassStats,
                   say: Callable[[str], None], who: str = "") -> None:
    """Prints the closing lines of a finished run: tokens, shards, tokens/s, bytes/token and the kept mass."""
    reader = SoftLabelStore(args.out, verify="size")
    per_token = reader.bytes_per_token
    say(
        f"kdfast compress: {len(reader)} tokens in {reader.num_shards} shard{'s' * (reader.num_shards != 1)} "
        f"at {args.out} ({computed / max(elapsed, 1e-9):,.0f} tokens/s this run{who}); "
        f"{per_token['soft_labels']} bytes/token of soft labels + {per_token['token_ids']} of token ids "
        f"(dense bfloat16 rows: {2 * vocab_size} bytes/token)"
    )
    if kept.count:
        say(f"kdfast compress: teacher mass kept by the top-{args.k}: mean {100 * kept.mean:.1f}%, 5th percentile "
            f"{100 * kept.percentile(5):.1f}% (over the {kept.count} tokens computed this run"
            f"{' by rank 0' if who else ''})")
        warning = kept_mass_warning(kept.mean)
        if warning:
            print(f"kdfast compress: warning: {warning}", file=sys.stderr)


# --------------------------------------------------------------------------- several processes
def run_on_ranks(args: argparse.Namespace, environment: Tuple[int, int, int], *, load_inputs: Callable,
                 suggest_k: Callable, store_arguments: Callable) -> int:
    """`kdfast compress` as one rank of a torchrun job; returns the exit code.

    Args:
        environment: (rank, world size, local rank).
        load_inputs: args -> (teacher, token ids, data format, tokenizer name, V); raises UsageError.
        suggest_k: (args, teacher, tokens, V) -> exit code; run on rank 0 only.
        store_arguments: (args, data format, tokenizer name, tokens, V) -> keyword arguments
            of `SoftLabelStore.create`.

    Raises:
        UsageError: a user error (printed by rank 0), RankError: this rank lost the others.
    """
    rank, world, local_rank = environment
    if args.device == "cuda":
        args.device = f"cuda:{local_rank}"
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    try:
        if backend == "nccl":
            torch.cuda.set_device(torch.device(args.device))
        group = RankGroup(backend)
    except (RuntimeError, ValueError, AssertionError) as error:
        raise RankError(f"rank {rank}: cannot join the {backend} process group ({one_line(error)})") from None
    try:
        return _compress_on_ranks(group, args, load_inputs, suggest_k, store_arguments)
    except RuntimeError as error:  # a collective failed: another rank died
        reason = one_line(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        reason = re.sub(r"^\[[^\]]*\]\s*", "", reason)  # gloo prefixes its source location
        raise RankError(f"rank {rank}: lost contact with the other ranks ({reason[:200]}); the shards written so "
                        f"far stay in {args.out}: rerun with --resume") from None
    finally:
        group.close()


def _agree(group: RankGroup, error, facts) -> None:
    """Raises the same UsageError on every rank when any rank failed or the ranks disagree on the inputs."""
    everyone = group.gather((error, facts))
    failed = [(rank, message) for rank, (message, _) in enumerate(everyone) if message]
    if failed:
        if len(failed) == group.world and len({message for _, message in failed}) == 1:
            raise UsageError(failed[0][1])
        raise UsageError("; ".join(f"rank {rank}: {message}" for rank, message in failed))
    if len({found for _, found in everyone}) > 1:
        described = ", ".join(f"rank {rank}: {found[0]} tokens, checksum {found[1][:12]}, V={found[2]}"
                              for rank, (_, found) in enumerate(everyone))
        raise UsageError(f"the ranks do not read the same token stream and teacher ({described})")


def _compress_on_ranks(group: RankGroup, args: argparse.Namespace, load_inputs: Callable, suggest_k: Callable,
                       store_arguments: Callable) -> int:
    error, facts, loaded = None, None, None
    try:
        loaded = load_inputs(args)
        facts = (int(loaded[1].shape[0]), token_stream_checksum(loaded[1]), loaded[4])
    except UsageError as failure:
        error = one_line(failure)
    _agree(group, error, facts)
    teacher, tokens, data_format, tokenizer_name, vocab_size = loaded
    if args.suggest_k:
        return suggest_k(args, teacher, tokens, vocab_size) if group.rank == 0 else EXIT_OK
    create = store_arguments(args, data_format, tokenizer_name, tokens, vocab_size)
    create["metadata"]["processes"] = group.world
    num_tokens = int(tokens.shape[0])
    try:
        writer = DistributedStoreWriter(group, args.out, num_tokens=num_tokens, **create)
    except (SoftLabelStoreError, FileExistsError, ValueError) as failure:
        raise UsageError(str(failure)) from None
    except OSError as failure:
        raise UsageError(f"cannot create the store in {args.out}: {failure.strerror or failure}") from None
    quiet = args.quiet or group.rank != 0

    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr)

    if writer.committed_tokens >= num_tokens and not writer.planned_tokens:
        writer.commit()
        say(f"kdfast compress: {args.out} already holds all {num_tokens} tokens")
        return EXIT_OK
    if writer.committed_tokens or writer.planned_tokens < num_tokens - writer.committed_tokens:
        say(f"kdfast compress: resuming {args.out}: {writer.committed_tokens} tokens committed, "
            f"{num_tokens - writer.committed_tokens - writer.planned_tokens} more written earlier, "
            f"{writer.planned_tokens} to compute")
    progress = tqdm(total=sum(shard.stop - shard.start for shard in writer.shards), unit="tok", unit_scale=True,
                    disable=quiet, dynamic_ncols=True, smoothing=0.05, desc=f"compress (rank 0 of {group.world})")
    kept = KeptMassStats()
    failure_message, stopped = None, False
    started = time.perf_counter()
    with StopRequest(announce=not quiet, message="stopping after the current batch; the shards written so far are "
                                                 "kept (press Ctrl-C again to abort)") as stop:
        try:
            for shard in writer.shards:
                for labels, token_ids in labelled_rows(teacher, tokens, args, vocab_size, shard.start, shard.stop):
                    writer.append(labels, None if args.no_token_ids else token_ids)
                    kept.update(labels.tail_logprob)
                    progress.update(token_ids.shape[0])
                    if stop.requested:
                        break
                if stop.requested:
                    writer.discard()
                    stopped = True
                    break
                writer.end_shard()
        except (UsageError, TeacherError, SoftLabelStoreError, OSError) as failure:
            writer.discard()
            failure_message = one_line(failure) if not isinstance(failure, OSError) \
                else f"cannot write to {args.out}: {failure}"
    outcome = writer.commit(error=failure_message, stopped=stopped)
    progress.close()
    elapsed = time.perf_counter() - started
    committed = f"{outcome['num_tokens']} of {num_tokens} tokens are committed in {args.out}" + (
        f", {outcome['pending']} more shards are written" if outcome["pending"] else "")
    if outcome["errors"]:
        raise UsageError("; ".join(outcome["errors"]) + f" ({committed}; rerun with --resume once fixed)")
    if not outcome["complete"]:
        say(f"kdfast compress: interrupted; {committed} (rerun with --resume)")
        return EXIT_INTERRUPTED
    if group.rank == 0:
        report_summary(args, vocab_size, outcome["computed"], elapsed, kept, say, f" by {group.world} processes")
    return EXIT_OK
