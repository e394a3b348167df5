"""`kdfast compress`: run a teacher over a token stream and write its top-k soft labels to a store.

The token stream (a `.npy`/`.pt` array of token ids, flattened, or a text file tokenised
line by line) is cut into consecutive windows of `--seq-len` tokens (the last one may be
shorter); the teacher sees each window on its own and the soft labels of token i are
`compress_topk` of the teacher's logits at i (its prediction of token i + 1 given the
window up to i). Full windows go to the teacher `--batch-size` at a time in a fixed plan,
so a resumed run recomputes exactly the batches an uninterrupted run would and the result
does not depend on where a run stopped. Output: a `kdfast.SoftLabelStore` in `--out`.
`--resume` continues an interrupted run after verifying the committed shards and the run
parameters (a mismatch is an error). Ctrl-C (or SIGTERM) stops after the current batch and
commits what was computed; a second Ctrl-C aborts and discards the uncommitted rows.
Exit codes: 0 done, 2 bad arguments or a store/data mismatch, 130 interrupted.

`add_compress_arguments(parser)` and `run_compress(args)` plug into the `kdfast` console
script; `python -m kdfast.compress_cli ...` runs it on its own.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from kdfast.functional import compress_topk
from kdfast.store import DEFAULT_SHARD_TOKENS, SoftLabelStore, SoftLabelStoreError
from kdfast.teachers import load_teacher, load_tokenizer, resolve_torch_dtype

__all__ = ["add_compress_arguments", "run_compress", "main", "load_token_stream", "batch_plan"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_TEXT_LINES_PER_CALL = 1024
_HASH_CHUNK_TOKENS = 1 << 22


def add_compress_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the `kdfast compress` options to `parser` and returns it."""
    parser.add_argument("--teacher", required=True,
                        help="Hugging Face causal LM (hub name or local directory), or module:function / "
                             "file.py:function mapping token ids [B, L] to logits [B, L, V]")
    parser.add_argument("--data", required=True,
                        help="token ids (.npy or .pt, any shape, flattened) or a text file (one document per line)")
    parser.add_argument("--data-format", choices=("auto", "npy", "pt", "text"), default="auto",
                        help="how to read --data (default: by extension; anything but .npy/.pt/.pth is text)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer for text data (default: the teacher, when it is a Hugging Face model)")
    parser.add_argument("--no-eos", action="store_true",
                        help="text data: do not append the tokenizer's EOS token after each line")
    parser.add_argument("--out", required=True, help="store directory")
    parser.add_argument("--k", type=int, default=64, help="teacher tokens kept per position (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T (default 1.0)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per teacher window (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per teacher call (default 8)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS})")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="storage dtype of the kept log-probabilities (default float16); the tail is float32")
    parser.add_argument("--index-dtype", choices=("auto", "uint16", "int32"), default="auto",
                        help="storage dtype of indices and token ids "
                             "(default auto: uint16 when V <= 65536, else int32)")
    parser.add_argument("--teacher-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="Hugging Face teacher weights/compute dtype "
                             "(default auto: bfloat16 on CUDA, else float32)")
    parser.add_argument("--device", default="cpu", help="teacher device, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of --data")
    parser.add_argument("--no-token-ids", action="store_true", help="do not store the input token ids in the shards")
    resume_group = parser.add_mutually_exclusive_group()
    resume_group.add_argument("--resume", action="store_true",
                              help="continue an interrupted run in --out (parameters must match)")
    resume_group.add_argument("--overwrite", action="store_true", help="replace an existing store in --out")
    parser.add_argument("--no-fsync", action="store_true",
                        help="skip fsync after each shard: still safe if the process dies, not if the machine does")
    parser.add_argument("--trust-remote-code", action="store_true", help="passed to Hugging Face from_pretrained")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


# --------------------------------------------------------------------------- data
def _read_text_tokens(path: str, tokenizer, append_eos: bool) -> np.ndarray:
    eos = getattr(tokenizer, "eos_token_id", None) if append_eos else None
    pieces: List[np.ndarray] = []

    def encode(lines: List[str]) -> None:
        for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(list(ids) + ([eos] if eos is not None else []), dtype=np.int64))

    with open(path, "r", encoding="utf-8") as handle:
        lines: List[str] = []
        for line in handle:
            line = line.rstrip("\n")
            if line.strip():
                lines.append(line)
            if len(lines) == _TEXT_LINES_PER_CALL:
                encode(lines)
                lines = []
        if lines:
            encode(lines)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def load_token_stream(path: str, data_format: str = "auto", tokenizer=None,
                      append_eos: bool = True) -> Tuple[np.ndarray, str]:
    """Reads the token stream to compress.

    Args:
        path: `.npy` (memory-mapped) or `.pt`/`.pth` (a tensor, or a list of tensors or ints)
            of integer token ids, flattened in row-major order; or a text file, every
            non-empty line tokenised without special tokens, followed by EOS if
            `append_eos` and the tokenizer has one.
        data_format: "auto" (by extension), "npy", "pt" or "text".
        tokenizer: a Hugging Face tokenizer, required for text.

    Returns:
        (token ids as a 1-D integer numpy array, the format used).
    """
    if data_format == "auto":
        extension = os.path.splitext(path)[1].lower()
        data_format = {".npy": "npy", ".pt": "pt", ".pth": "pt"}.get(extension, "text")
    if data_format == "npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        array = array.reshape(-1)
    elif data_format == "pt":
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(loaded, (list, tuple)):
            loaded = (torch.cat([torch.as_tensor(item).reshape(-1) for item in loaded]) if loaded
                      else torch.zeros(0, dtype=torch.int64))
        if not isinstance(loaded, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor or a list of tensors of token ids, "
                             f"got {type(loaded).__name__}")
        array = loaded.reshape(-1).to(torch.int64).numpy()
    elif data_format == "text":
        if tokenizer is None:
            raise ValueError(f"{path} is read as text and needs a tokenizer: pass --tokenizer")
        array = _read_text_tokens(path, tokenizer, append_eos)
    else:
        raise ValueError(f"unknown data format {data_format!r}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"{path}: token ids must be integers, got dtype {array.dtype}")
    return array, data_format


def _token_stream_checksum(tokens: np.ndarray) -> str:
    """blake2b-128 of the token ids as little-endian int64, independent of the file's dtype."""
    hasher = hashlib.blake2b(digest_size=16)
    for start in range(0, tokens.shape[0], _HASH_CHUNK_TOKENS):
        hasher.update(np.ascontiguousarray(tokens[start : start + _HASH_CHUNK_TOKENS], dtype="<i8").tobytes())
    return hasher.hexdigest()


def batch_plan(num_tokens: int, seq_len: int, batch_size: int) -> Iterator[Tuple[int, int, int]]:
    """Yields (first token, end token, windows) of every teacher call, in order.

    Full windows of `seq_len` are grouped `batch_size` at a time from token 0; a final
    shorter window, if any, is its own call. The plan depends only on its arguments.
    """
    full_windows = num_tokens // seq_len
    for first_window in range(0, full_windows, batch_size):
        windows = min(batch_size, full_windows - first_window)
        yield first_window * seq_len, (first_window + windows) * seq_len, windows
    if num_tokens % seq_len:
        yield full_windows * seq_len, num_tokens, 1


# --------------------------------------------------------------------------- signals
class _StopRequest:
    """First SIGINT/SIGTERM sets `requested`; a second SIGINT raises KeyboardInterrupt.

    The notice is written with `os.write` (no Python-level buffering), which is safe inside
    a signal handler even when the interrupted code was printing.
    """

    def __init__(self, announce: bool) -> None:
        self.requested = False
        self._announce = announce
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self._announce:
            os.write(
                2,
                b"\nkdfast compress: stopping after the current batch and committing it "
                b"(press Ctrl-C again to abort without committing)\n",
            )

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------- run
def _error(message: str) -> int:
    print(f"kdfast compress: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check_arguments(args: argparse.Namespace) -> Optional[str]:
    for name in ("k", "seq_len", "batch_size", "shard_tokens"):
        value = getattr(args, name)
        if value < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {value}"
    if not (args.temperature > 0 and np.isfinite(args.temperature)):
        return f"--temperature must be finite and > 0, got {args.temperature}"
    if args.max_tokens is not None and args.max_tokens < 1:
        return f"--max-tokens must be >= 1, got {args.max_tokens}"
    return None


def run_compress(args: argparse.Namespace) -> int:
    """Runs `kdfast compress` with parsed arguments (see `add_compress_arguments`); returns the exit code."""
    try:
        return _run_compress(args)
    except KeyboardInterrupt:  # before the store was opened, e.g. while the teacher loads
        print("kdfast compress: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run_compress(args: argparse.Namespace) -> int:
    problem = _check_arguments(args)
    if problem:
        return _error(problem)
    quiet = args.quiet

    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr)

    try:
        teacher = load_teacher(
            args.teacher,
            device=args.device,
            dtype=resolve_torch_dtype(args.teacher_dtype, args.device),
            trust_remote_code=args.trust_remote_code,
        )
        tokenizer_name = args.tokenizer
        tokenizer = None
        data_format = args.data_format
        if data_format == "auto":
            data_format = {".npy": "npy", ".pt": "pt", ".pth": "pt"}.get(os.path.splitext(args.data)[1].lower(), "text")
        if data_format == "text":
            tokenizer_name = tokenizer_name or teacher.default_tokenizer
            if tokenizer_name is None:
                return _error(f"{args.data} is text; a function teacher needs --tokenizer")
            tokenizer = load_tokenizer(tokenizer_name, trust_remote_code=args.trust_remote_code)
        if tokenizer_name is not None and os.path.exists(tokenizer_name):
            tokenizer_name = os.path.abspath(tokenizer_name)
        tokens, data_format = load_token_stream(args.data, data_format, tokenizer, append_eos=not args.no_eos)
    except (OSError, ValueError, TypeError, ImportError, AttributeError) as error:
        return _error(str(error))
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    num_tokens = int(tokens.shape[0])
    if num_tokens == 0:
        return _error(f"{args.data} holds no tokens")
    if int(tokens.min()) < 0:
        return _error(f"{args.data}: token ids must be >= 0, found {int(tokens.min())}")

    # One short forward pass tells the vocabulary size (the logits width, which can exceed
    # the tokenizer's vocabulary) before the store is opened.
    probe = teacher(torch.as_tensor(np.asarray(tokens[:1], dtype=np.int64)).view(1, 1))
    vocab_size = int(probe.shape[-1])
    if args.k > vocab_size:
        return _error(f"--k {args.k} exceeds the teacher's vocabulary size {vocab_size}")
    if int(tokens.max()) >= vocab_size:
        return _error(f"{args.data}: token id {int(tokens.max())} is outside the teacher's vocabulary of {vocab_size}")
    source = {
        "format": data_format,
        "num_tokens": num_tokens,
        "token_checksum": _token_stream_checksum(tokens),
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
    try:
        writer = SoftLabelStore.create(
            args.out,
            vocab_size=vocab_size,
            k=args.k,
            temperature=args.temperature,
            index_dtype=None if args.index_dtype == "auto" else args.index_dtype,
            logprob_dtype=args.dtype,
            with_token_ids=not args.no_token_ids,
            shard_tokens=args.shard_tokens,
            teacher=teacher.name,
            tokenizer=tokenizer_name,
            source=source,
            metadata=metadata,
            resume=args.resume,
            overwrite=args.overwrite,
            durable=not args.no_fsync,
        )
    except (SoftLabelStoreError, FileExistsError, ValueError) as error:
        return _error(str(error))

    stored = writer.num_tokens
    if writer.complete or stored >= num_tokens:
        writer.close(complete=True)
        say(f"kdfast compress: {args.out} already holds all {num_tokens} tokens")
        return EXIT_OK
    if stored:
        say(f"kdfast compress: resuming {args.out} at token {stored} of {num_tokens}")
    from tqdm.auto import tqdm

    progress = tqdm(
        total=num_tokens, initial=stored, unit="tok", unit_scale=True, disable=quiet,
        dynamic_ncols=True, smoothing=0.05, desc="compress",
    )
    started = time.perf_counter()
    computed = 0
    interrupted = False
    try:
        with _StopRequest(announce=not quiet) as stop:
            for first, end, windows in batch_plan(num_tokens, args.seq_len, args.batch_size):
                if end <= stored:
                    continue
                token_ids = torch.from_numpy(np.asarray(tokens[first:end], dtype=np.int64)).view(windows, -1)
                logits = teacher(token_ids)
                if logits.shape[-1] != vocab_size:
                    raise ValueError(f"teacher returned V={logits.shape[-1]} for tokens [{first}, {end}), "
                                     f"earlier V={vocab_size}")
                if bool(torch.isnan(logits).any()):
                    raise ValueError(f"teacher logits contain NaN for tokens [{first}, {end})")
                labels = compress_topk(logits, args.k, temperature=args.temperature, index_dtype=torch.int32).flatten()
                skip = stored - first if first < stored else 0
                writer.append(labels[skip:], None if args.no_token_ids else token_ids.reshape(-1)[skip:])
                stored = end
                computed += end - first - skip
                progress.update(end - first - skip)
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
    except (ValueError, TypeError) as error:
        writer.abort()
        progress.close()
        return _error(str(error))
    except BaseException:
        writer.abort()
        progress.close()
        raise
    progress.close()
    elapsed = max(time.perf_counter() - started, 1e-9)
    reader = SoftLabelStore(args.out, verify="size")
    per_token = reader.bytes_per_token
    if interrupted:
        say(f"kdfast compress: interrupted; {len(reader)} of {num_tokens} tokens committed in {args.out} "
            f"(rerun with --resume)")
        return EXIT_INTERRUPTED
    say(
        f"kdfast compress: {len(reader)} tokens in {reader.num_shards} shards at {args.out} "
        f"({computed / elapsed:,.0f} tokens/s this run); {per_token['soft_labels']} bytes/token of soft labels "
        f"+ {per_token['token_ids']} of token ids (dense bfloat16 rows: {2 * vocab_size} bytes/token)"
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser for `python -m kdfast.compress_cli`."""
    parser = argparse.ArgumentParser(
        prog="kdfast compress",
        description="Run a teacher over a token stream and store its top-k soft labels (kdfast.SoftLabelStore).",
    )
    return add_compress_arguments(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `python -m kdfast.compress_cli`; returns the exit code."""
    return run_compress(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
