"""`kdfast compress`: run a teacher over a token stream and write its top-k soft labels to a store.

The token stream (a `.npy`/`.pt` array of integer token ids, flattened, or a text file
tokenised line by line; `kdfast.token_stream`) is cut into consecutive windows of
`--seq-len` tokens (the last one may be shorter); the teacher sees each window on its own
and the soft labels of token i are `compress_topk` of the teacher's logits at i (its
prediction of token i + 1 given the window up to i). Full windows go to the teacher
`--batch-size` at a time in a fixed plan, so a resumed run recomputes exactly the batches
an uninterrupted run would and the result does not depend on where a run stopped.
Output: a `kdfast.SoftLabelStore` in `--out`. `--resume` continues an interrupted run after
verifying the committed shards and the run parameters (a mismatch is an error). Ctrl-C
(or SIGTERM) stops after the current batch and commits what was computed; a second Ctrl-C
aborts and discards the uncommitted rows. Under torchrun (WORLD_SIZE > 1) every rank runs
this command and the ranks share the shards of one store (`kdfast.compress_run.run_on_ranks`),
which equals the one-process store.

The summary reports the teacher's mass kept by the top-k (mean and 5th percentile of
1 − exp(tail_logprob) over the tokens computed) and warns when the mean is below 90%.
`--suggest-k` runs the teacher on the first few batches only, writes nothing, and prints
k ∈ {1, 2, 4, ...} against kept mass and bytes per token (`kdfast.kept_mass`).

Every user error (bad option, missing or non-integer data, a teacher that does not load
or returns the wrong shape, an absent device, an unwritable `--out`) is one line
`kdfast compress: error: ...` on stderr. Exit codes: 0 done, 2 user error or a
store/data mismatch, 130 interrupted. `add_compress_arguments(parser)` and
`run_compress(args)` plug into the `kdfast` console script; `python -m kdfast.compress_cli`
runs it on its own.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from kdfast.argparsing import EXIT_OK, EXIT_USAGE, CommandParser, UsageError, report_error
from kdfast.compress_run import (
    EXIT_INTERRUPTED,
    RankError,
    StopRequest,
    check_logits,
    labelled_rows,
    report_summary,
    run_on_ranks,
    token_tensor,
)
from kdfast.contract.options import TEMPERATURE_RANGE, temperature_in_range
from kdfast.contract.softlabels import smallest_index_dtype
from kdfast.functional import compress_topk
from kdfast.kept_mass import KeptMassStats, candidate_ks, coverage_rows, format_coverage_table, kept_mass_by_k
from kdfast.store import DEFAULT_SHARD_TOKENS, SoftLabelStore, SoftLabelStoreError, soft_label_bytes_per_token
from kdfast.store.distributed import distributed_environment
from kdfast.teachers import (
    TeacherError,
    default_tokenizer,
    load_teacher,
    load_tokenizer,
    parse_device,
    resolve_torch_dtype,
)
from kdfast.token_stream import (
    DATA_FORMATS,
    TokenStreamError,
    batch_plan,
    data_format_of,
    load_token_stream,
    token_stream_checksum,
)

__all__ = ["add_compress_arguments", "run_compress", "main", "load_token_stream", "batch_plan"]

PROG = "kdfast compress"
SUGGEST_K_CAP = 1024  # --suggest-k tabulates k up to this (or V, or --k if larger)
SUGGEST_K_CALLS = 4  # --suggest-k runs the teacher on this many batches of the plan


def add_compress_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `kdfast compress` options to `parser` and returns it."""
    parser.add_argument("--teacher", required=True, metavar="SPEC",
                        help="Hugging Face causal LM (hub name or local directory), or a Python function mapping "
                             "token ids [B, L] to logits [B, L, V]: file.py:FUNCTION, file.py (function `teacher`) "
                             "or module:FUNCTION (module.py in the current directory first)")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="integer token ids (.npy or .pt, any shape, flattened) or a text file "
                             "(one document per line)")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default="auto",
                        help="how to read --data (default %(default)s: by extension; anything but .npy/.pt/.pth "
                             "is text)")
    parser.add_argument("--tokenizer", default=None, metavar="NAME",
                        help="tokenizer for text data (default: the teacher, when it is a Hugging Face model)")
    parser.add_argument("--no-eos", action="store_true",
                        help="text data: do not append the tokenizer's EOS token after each line")
    parser.add_argument("--out", default=None, metavar="DIR", help="store directory (required unless --suggest-k)")
    parser.add_argument("--k", type=int, default=64, help="teacher tokens kept per position (default %(default)s)")
    parser.add_argument("--suggest-k", action="store_true",
                        help=f"run the teacher on the first {SUGGEST_K_CALLS} batches only, write nothing, and print "
                             "k = 1, 2, 4, ... against the teacher's mass kept and bytes per token")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="softmax temperature (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per teacher window (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per teacher call (default %(default)s)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help="tokens per shard (default %(default)s)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="storage dtype of the kept log-probabilities (default %(default)s); the tail is float32")
    parser.add_argument("--index-dtype", choices=("auto", "uint16", "int32"), default="auto",
                        help="storage dtype of indices and token ids "
                             "(default %(default)s: uint16 when V <= 65536, else int32)")
    parser.add_argument("--teacher-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="Hugging Face teacher weights/compute dtype "
                             "(default %(default)s: bfloat16 on CUDA, else float32)")
    parser.add_argument("--device", default="cpu",
                        help="teacher device: cpu, cuda, cuda:N or mps (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N",
                        help="use only the first N tokens of --data")
    parser.add_argument("--no-token-ids", action="store_true", help="do not store the input token ids in the shards")
    resume_group = parser.add_mutually_exclusive_group()
    resume_group.add_argument("--resume", action="store_true",
                              help="continue an interrupted run in --out (parameters must match)")
    resume_group.add_argument("--overwrite", action="store_true", help="replace an existing store in --out")
    parser.add_argument("--no-fsync", action="store_true",
                        help="skip fsync after each shard: still safe if the process dies, not if the machine does")
    parser.add_argument("--trust-remote-code", action="store_true", help="passed to Hugging Face from_pretrained")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary (warnings still print)")
    return parser


# --------------------------------------------------------------------------- checks
def _check_arguments(args: argparse.Namespace) -> None:
    for name in ("k", "seq_len", "batch_size", "shard_tokens"):
        value = getattr(args, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not temperature_in_range(args.temperature):
        low, high = TEMPERATURE_RANGE
        raise UsageError(f"--temperature must be finite and in [{low:g}, {high:g}], got {args.temperature}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.out is None and not args.suggest_k:
        raise UsageError("the following arguments are required: --out (or pass --suggest-k)")


def _check_output(out: str) -> None:
    """Fails early, before the teacher loads, when `out` cannot become a store directory."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {out} exists and is not a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: no permission to create files in {parent}")


def _index_dtype_name(args: argparse.Namespace, vocab_size: int) -> str:
    if args.index_dtype != "auto":
        return args.index_dtype
    return str(smallest_index_dtype(vocab_size)).replace("torch.", "")


# --------------------------------------------------------------------------- run
def run_compress(args: argparse.Namespace) -> int:
    """Runs `kdfast compress` with parsed arguments (see `add_compress_arguments`); returns the exit code."""
    try:
        return _run_compress(args)
    except UsageError as error:
        ranks = distributed_environment()
        if ranks is None or ranks[0] == 0 or isinstance(error, RankError):  # rank 0 reports the ranks' errors
            return report_error(PROG, error)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the store was opened, e.g. while the teacher loads
        print("kdfast compress: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _load_inputs(args: argparse.Namespace):
    """(teacher, token ids, data format, tokenizer name, V) after every check that needs no store."""
    try:
        parse_device(args.device)
        data_format = data_format_of(args.data, args.data_format)
        tokenizer_name, tokenizer = args.tokenizer, None
        if data_format == "text":
            tokenizer_name = tokenizer_name or default_tokenizer(args.teacher)
            if tokenizer_name is None:
                raise UsageError(f"{args.data} is read as text and a function teacher needs --tokenizer")
            tokenizer = load_tokenizer(tokenizer_name, trust_remote_code=args.trust_remote_code)
        if tokenizer_name is not None and os.path.exists(tokenizer_name):
            tokenizer_name = os.path.abspath(tokenizer_name)
        tokens, data_format = load_token_stream(args.data, data_format, tokenizer, append_eos=not args.no_eos)
        if args.max_tokens is not None:
            tokens = tokens[: args.max_tokens]
        if tokens.shape[0] == 0:
            raise UsageError(f"{args.data} holds no tokens")
        if int(tokens.min()) < 0:
            raise UsageError(f"{args.data}: token ids must be >= 0, found {int(tokens.min())}")
        teacher = load_teacher(args.teacher, device=args.device,
                               dtype=resolve_torch_dtype(args.teacher_dtype, args.device),
                               trust_remote_code=args.trust_remote_code)
        # One short forward pass tells the vocabulary size (the logits width, which can exceed
        # the tokenizer's vocabulary) before the store is opened.
        probe = teacher(token_tensor(tokens, 0, 1, 1))
    except (TeacherError, TokenStreamError, ImportError) as error:
        raise UsageError(str(error)) from None
    vocab_size = int(probe.shape[-1])
    check_logits(probe, vocab_size, 0, 1)
    if args.k > vocab_size:
        raise UsageError(f"--k {args.k} exceeds the teacher's vocabulary size {vocab_size}")
    if int(tokens.max()) >= vocab_size:
        raise UsageError(f"{args.data}: token id {int(tokens.max())} is outside the teacher's vocabulary "
                         f"of {vocab_size}")
    return teacher, tokens, data_format, tokenizer_name, vocab_size


def _suggest_k(args: argparse.Namespace, teacher, tokens: np.ndarray, vocab_size: int) -> int:
    """Prints the coverage table of k over the first `SUGGEST_K_CALLS` batches; writes nothing."""
    limit = min(vocab_size, max(SUGGEST_K_CAP, args.k))
    ks = candidate_ks(limit, extra=[args.k])
    parts = {k: [] for k in ks}
    sampled = 0
    for first, end, windows in itertools.islice(batch_plan(int(tokens.shape[0]), args.seq_len, args.batch_size),
                                                SUGGEST_K_CALLS):
        logits = teacher(token_tensor(tokens, first, end, windows))
        check_logits(logits, vocab_size, first, end)
        labels = compress_topk(logits, limit, temperature=args.temperature, index_dtype=torch.int32).flatten()
        for k, mass in kept_mass_by_k(labels.logprobs, ks, labels.tail_logprob).items():
            parts[k].append(mass)
        sampled = end
    index_dtype = _index_dtype_name(args, vocab_size)
    rows = coverage_rows({k: np.concatenate(chunks) for k, chunks in parts.items()},
                         lambda k: soft_label_bytes_per_token(k, index_dtype, args.dtype))
    print(f"teacher {teacher.name} over the first {sampled} tokens of {args.data} (V={vocab_size}, "
          f"T={args.temperature}): mass kept by the top k")
    print(format_coverage_table(rows, marked=args.k))
    token_ids = "" if args.no_token_ids else f"; the token ids add {2 if index_dtype == 'uint16' else 4}"
    print(f"bytes/token: soft labels with {index_dtype} indices and {args.dtype} log-probabilities "
          f"(dense bfloat16 rows: {2 * vocab_size}){token_ids}")
    return EXIT_OK


def _store_arguments(args: argparse.Namespace, data_format: str, tokenizer_name: Optional[str], tokens: np.ndarray,
                     vocab_size: int) -> Dict[str, Any]:
    """The keyword arguments of `SoftLabelStore.create` for this run (parameters, source, metadata)."""
    source = {
        "format": data_format,
        "num_tokens": int(tokens.shape[0]),
        "token_checksum": token_stream_checksum(tokens),
        "seq_len": args.seq_len,
        "append_eos": (not args.no_eos) if data_format == "text" else None,
    }
    metadata = {
        "data": os.path.abspath(args.data),
        "batch_size": args.batch_size,
        "teacher_dtype": str(resolve_torch_dtype(args.teacher_dtype, args.device)).replace("torch.", ""),
        "device": args.device,
        "kdfast_command": "compress",
    }
    return dict(vocab_size=vocab_size, k=args.k, temperature=args.temperature,
                index_dtype=None if args.index_dtype == "auto" else args.index_dtype, logprob_dtype=args.dtype,
                with_token_ids=not args.no_token_ids, shard_tokens=args.shard_tokens, teacher=args.teacher_name,
                tokenizer=tokenizer_name, source=source, metadata=metadata, resume=args.resume,
                overwrite=args.overwrite, durable=not args.no_fsync)


def _load_named_inputs(args: argparse.Namespace):
    """`_load_inputs`, recording the teacher's name in `args.teacher_name` for the manifest."""
    loaded = _load_inputs(args)
    args.teacher_name = loaded[0].name
    return loaded


def _suggest_k_or_usage(args: argparse.Namespace, teacher, tokens: np.ndarray, vocab_size: int) -> int:
    try:
        return _suggest_k(args, teacher, tokens, vocab_size)
    except TeacherError as error:
        raise UsageError(str(error)) from None


def _run_compress(args: argparse.Namespace) -> int:
    _check_arguments(args)
    if not args.suggest_k:
        _check_output(args.out)
    ranks = distributed_environment()
    if ranks is not None:
        return run_on_ranks(args, ranks, load_inputs=_load_named_inputs, suggest_k=_suggest_k_or_usage,
                            store_arguments=_store_arguments)
    quiet = args.quiet

    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr)

    teacher, tokens, data_format, tokenizer_name, vocab_size = _load_named_inputs(args)
    num_tokens = int(tokens.shape[0])
    if args.suggest_k:
        return _suggest_k_or_usage(args, teacher, tokens, vocab_size)
    try:
        writer = SoftLabelStore.create(args.out, **_store_arguments(args, data_format, tokenizer_name, tokens,
                                                                     vocab_size))
    except (SoftLabelStoreError, FileExistsError, ValueError) as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"cannot create the store in {args.out}: {error.strerror or error}") from None

    stored = writer.num_tokens
    if writer.complete or stored >= num_tokens:
        writer.close(complete=True)
        say(f"kdfast compress: {args.out} already holds all {num_tokens} tokens")
        return EXIT_OK
    if stored:
        say(f"kdfast compress: resuming {args.out} at token {stored} of {num_tokens}")
    progress = tqdm(
        total=num_tokens, initial=stored, unit="tok", unit_scale=True, disable=quiet,
        dynamic_ncols=True, smoothing=0.05, desc="compress",
    )
    started = time.perf_counter()
    computed = 0
    kept = KeptMassStats()
    interrupted = False
    try:
        with StopRequest(announce=not quiet) as stop:
            for labels, token_ids in labelled_rows(teacher, tokens, args, vocab_size, stored, num_tokens):
                writer.append(labels, None if args.no_token_ids else token_ids)
                kept.update(labels.tail_logprob)
                computed += token_ids.shape[0]
                progress.update(token_ids.shape[0])
                progress.set_postfix(shards=len(writer.manifest["shards"]), refresh=False)
                if stop.requested:
                    interrupted = True
                    break
            writer.close(complete=not interrupted)
    except KeyboardInterrupt:
        dropped = writer.abort()
        progress.close()
        say(
            f"kdfast compress: aborted; {dropped} uncommitted tokens discarded, {writer.num_tokens} tokens "
            f"committed in {args.out} (rerun with --resume)"
        )
        return EXIT_INTERRUPTED
    except (UsageError, TeacherError, OSError) as error:
        writer.abort()
        progress.close()
        message = str(error) if not isinstance(error, OSError) else f"cannot write to {args.out}: {error}"
        if writer.num_tokens:
            message += f" ({writer.num_tokens} tokens are committed in {args.out}; rerun with --resume once fixed)"
        raise UsageError(message) from None
    except BaseException:
        writer.abort()
        progress.close()
        raise
    progress.set_postfix(shards=len(writer.manifest["shards"]))  # the last shard is committed on close
    progress.close()
    if interrupted:
        say(f"kdfast compress: interrupted; {writer.num_tokens} of {num_tokens} tokens committed in {args.out} "
            f"(rerun with --resume)")
        return EXIT_INTERRUPTED
    report_summary(args, vocab_size, computed, time.perf_counter() - started, kept, say)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser for `python -m kdfast.compress_cli`."""
    parser = CommandParser(
        prog=PROG,
        description="Run a teacher over a token stream and store its top-k soft labels (kdfast.SoftLabelStore).",
    )
    return add_compress_arguments(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `python -m kdfast.compress_cli`; returns the exit code."""
    return run_compress(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
