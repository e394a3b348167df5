"""`kdfast store info`, `verify` and `merge`: inspect, check and concatenate soft-label stores.

- `kdfast store info PATH... [--sample-tokens N] [--json]`: for each store: tokens, shards, k, vocabulary,
  temperature, storage dtypes, bytes per token, teacher, tokenizer and whether the writer
  finished, plus the coverage table: for k' = 1, 2, 4, ... up to the stored k, the mean and
  5th percentile of the teacher's mass kept by the first k' stored entries, over a sample
  of rows read from evenly spaced places (`kdfast.kept_mass`). The stored log-probabilities
  of a row are sorted in descending order, so the first k' of them are what a store written
  with k' would hold; bytes per token are those of such a store.
  With several paths, the summaries follow each other (`--json`: a list).
- `kdfast store verify PATH...`: the full check of every shard file's size, header and
  checksum (`SoftLabelStore.verify()`, a read of the whole store), with a progress bar;
  every path is checked and each bad one gets its error line.
- `kdfast store merge OUT PATH...`: a new store in OUT holding the stores' tokens
  concatenated in the order given (`kdfast.store.merge_stores`: same k, V, T, dtypes,
  teacher and tokenizer, else an error naming the field; one atomic commit; verified after).

Only the store's public API is used. Exit codes: 0 fine, 2 not a store, a damaged store, a
mismatch or a bad option (one line `kdfast store ...: error: ...` on stderr per problem). `add_store_arguments` and
`run_store` plug into the `kdfast` console script; `python -m kdfast.store_cli` runs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from kdfast.argparsing import EXIT_OK, CommandParser, UsageError, report_error
from kdfast.kept_mass import candidate_ks, coverage_rows, format_coverage_table, kept_mass_by_k
from kdfast.store import SoftLabelStore, SoftLabelStoreError, merge_stores, soft_label_bytes_per_token

__all__ = ["add_store_arguments", "coverage_sample", "main", "run_store", "store_summary"]

DEFAULT_SAMPLE_TOKENS = 65536
_SAMPLE_PLACES = 16  # the sample is read in this many evenly spaced runs of rows


def add_store_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `info`, `verify` and `merge` subcommands to `parser` and returns it."""
    commands = parser.add_subparsers(dest="store_command", metavar="COMMAND")
    commands.required = True
    info = commands.add_parser("info", help="summary of a store and the teacher's mass kept for each k' <= k",
                               description="Summary of a soft-label store and its coverage table.")
    info.add_argument("paths", metavar="PATH", nargs="+", help="store directory (holds manifest.json)")
    info.add_argument("--sample-tokens", type=int, default=DEFAULT_SAMPLE_TOKENS, metavar="N",
                      help="rows read for the coverage table (default %(default)s; 0 skips it)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    verify = commands.add_parser("verify", help="check every shard file's size, header and checksum",
                                 description="Check every shard file of a soft-label store (reads the whole store).")
    verify.add_argument("paths", metavar="PATH", nargs="+", help="store directory (holds manifest.json)")
    verify.add_argument("--quiet", action="store_true", help="print nothing when the store is intact")
    merge = commands.add_parser("merge", help="concatenate stores written separately into a new store",
                                description="Write a new store holding the tokens of the given stores in order "
                                            "(same k, vocabulary, temperature, dtypes, teacher and tokenizer).")
    merge.add_argument("out", metavar="OUT", help="output directory (must not hold a store)")
    merge.add_argument("paths", metavar="PATH", nargs="+", help="input store directories, in token order")
    merge.add_argument("--no-fsync", action="store_true", help="skip fsync: safe if the process dies, not the machine")
    merge.add_argument("--quiet", action="store_true", help="print nothing on success")
    return parser


def _open(path: str) -> SoftLabelStore:
    if not os.path.isdir(path):
        raise UsageError(f"{path} is not a directory" if os.path.exists(path) else f"{path} does not exist")
    try:
        return SoftLabelStore(path, verify="size")
    except FileNotFoundError:
        raise UsageError(f"{path} is not a soft-label store (no manifest.json)") from None
    except (SoftLabelStoreError, ValueError) as error:
        raise UsageError(str(error)) from None


def coverage_sample(store: SoftLabelStore, sample_tokens: int) -> Tuple[List[Dict[str, Any]], int]:
    """The coverage table's rows (k', mean, p5, bytes_per_token) from about `sample_tokens` stored rows.

    The rows come from `_SAMPLE_PLACES` evenly spaced runs; all rows when the store is smaller.

    Returns:
        (the rows, one per k' = 1, 2, 4, ..., k; the number of stored rows they come from).
    """
    total = len(store)
    count = min(sample_tokens, total)
    if count <= 0:
        return [], 0
    places = min(_SAMPLE_PLACES, count)
    run = count // places
    starts = np.linspace(0, total - run, places).astype(np.int64) if places > 1 else np.zeros(1, dtype=np.int64)
    ks = candidate_ks(store.k)
    parts: Dict[int, List[np.ndarray]] = {k: [] for k in ks}
    for start in starts:
        labels = store.read(int(start), int(start) + run)
        for k, mass in kept_mass_by_k(labels.logprobs, ks, labels.tail_logprob).items():
            parts[k].append(mass)
    dtypes = store.dtypes
    rows = coverage_rows({k: np.concatenate(chunks) for k, chunks in parts.items()},
                         lambda k: soft_label_bytes_per_token(k, dtypes["indices"], dtypes["logprobs"],
                                                              dtypes["tail_logprob"]))
    return rows, run * places


def store_summary(store: SoftLabelStore) -> Dict[str, Any]:
    """The facts `kdfast store info` prints, as a JSON-ready dict."""
    manifest = store.manifest
    source = manifest.get("source") or {}
    return {
        "path": os.path.abspath(store.directory),
        "tokens": len(store),
        "source_tokens": source.get("num_tokens"),
        "complete": store.complete,
        "shards": store.num_shards,
        "k": store.k,
        "vocab_size": store.vocab_size,
        "temperature": store.temperature,
        "dtypes": store.dtypes,
        "bytes_per_token": store.bytes_per_token,
        "bytes_on_disk": store.nbytes,
        "teacher": manifest.get("teacher"),
        "tokenizer": manifest.get("tokenizer"),
        "created": manifest.get("created"),
        "updated": manifest.get("updated"),
    }


def _print_info(summary: Dict[str, Any], rows: List[Dict[str, Any]], sample: int) -> None:
    tokens, source_tokens = summary["tokens"], summary["source_tokens"]
    if summary["complete"]:
        state = "complete"
    elif source_tokens:
        state = f"incomplete: {tokens:,} of {source_tokens:,} source tokens (resume with kdfast compress --resume)"
    else:
        state = "incomplete"
    per_token = summary["bytes_per_token"]
    dtypes = ", ".join(f"{field} {dtype}" for field, dtype in summary["dtypes"].items() if dtype is not None)
    print(f"store: {summary['path']} ({state})")
    shards = summary["shards"]
    print(f"tokens: {tokens:,} in {shards} shard{'s' * (shards != 1)}, "
          f"{summary['bytes_on_disk'] / 1e6:,.1f} MB on disk")
    print(f"k: {summary['k']}  vocabulary: {summary['vocab_size']}  temperature: {summary['temperature']:g}")
    print(f"dtypes: {dtypes}")
    print(f"bytes/token: {per_token['soft_labels']} soft labels + {per_token['token_ids']} token ids = "
          f"{per_token['total']} (dense bfloat16 rows: {2 * summary['vocab_size']})")
    print(f"teacher: {summary['teacher']}")
    if summary["tokenizer"]:
        print(f"tokenizer: {summary['tokenizer']}")
    if rows:
        print(f"teacher mass kept by the first k' stored entries, from {sample:,} rows:")
        print(format_coverage_table(rows, marked=summary["k"], mark="<- stored k"))


def _run_info(args: argparse.Namespace) -> int:
    if args.sample_tokens < 0:
        raise UsageError(f"--sample-tokens must be >= 0, got {args.sample_tokens}")
    stores = [_open(path) for path in args.paths]
    reports = []
    for store in stores:
        try:
            rows, sample = coverage_sample(store, args.sample_tokens)
        except SoftLabelStoreError as error:
            raise UsageError(str(error)) from None
        reports.append((store_summary(store), rows, sample))
    if args.json:
        documents = [dict(summary, coverage=rows, coverage_sample_tokens=sample) for summary, rows, sample in reports]
        print(json.dumps(documents[0] if len(documents) == 1 else documents, indent=2))
    else:
        for number, report in enumerate(reports):
            if number:
                print()
            _print_info(*report)
    return EXIT_OK


def _verify_one(path: str, quiet: bool) -> None:
    store = _open(path)
    if not quiet:
        print(f"kdfast store verify: checking {store.num_shards} shard(s), {store.nbytes / 1e6:,.1f} MB, "
              f"of {path} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    bar = tqdm(total=len(store), unit="tok", unit_scale=True, desc="verify", disable=quiet, file=sys.stderr)
    try:
        with bar:
            store.verify(progress=lambda shard_number, tokens: bar.update(tokens))
    except SoftLabelStoreError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise UsageError("; ".join(lines)) from None
    if not quiet:
        print(f"kdfast store verify: OK: {len(store):,} tokens in {store.num_shards} shard(s), every checksum "
              f"matches ({time.perf_counter() - started:.1f} s) in {path}")


def _run_verify(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.paths:
        try:
            _verify_one(path, args.quiet)
        except UsageError as error:
            status = report_error("kdfast store verify", error)
    return status


def _run_merge(args: argparse.Namespace) -> int:
    for path in args.paths:
        _open(path)
    if os.path.exists(os.path.join(args.out, "manifest.json")):
        raise UsageError(f"{args.out} already holds a store; choose a new output directory")
    try:
        merged = merge_stores(args.out, args.paths, durable=not args.no_fsync)
    except (SoftLabelStoreError, FileExistsError, ValueError) as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"cannot write the merged store to {args.out}: {error.strerror or error}") from None
    if not args.quiet:
        print(f"kdfast store merge: {args.out}: {len(merged):,} tokens in {merged.num_shards} shard(s) from "
              f"{len(args.paths)} stores, verified")
    return EXIT_OK


def run_store(args: argparse.Namespace) -> int:
    """Runs `kdfast store info|verify|merge` with parsed arguments; returns the exit code."""
    prog = f"kdfast store {args.store_command}"
    run = {"info": _run_info, "verify": _run_verify, "merge": _run_merge}[args.store_command]
    try:
        return run(args)
    except UsageError as error:
        return report_error(prog, error)


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser for `python -m kdfast.store_cli`."""
    return add_store_arguments(CommandParser(prog="kdfast store",
                                             description="Inspect, check and merge soft-label stores."))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `python -m kdfast.store_cli`; returns the exit code."""
    return run_store(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
