"""The token stream `kdfast compress` reads, and the fixed plan of teacher calls over it.

`load_token_stream(path, data_format, tokenizer)` returns the token ids of a `.npy` file
(memory-mapped), a `.pt`/`.pth` file (a tensor or a list of tensors or ints) or a text file
(tokenised line by line) as a 1-D integer numpy array. Token ids must have an integer
dtype: floating-point ids are rejected even when every value is whole, since converting
them silently could truncate. Every problem with the file (missing, unreadable, wrong
content) raises `TokenStreamError`, a `ValueError` whose message names the file.
`token_stream_checksum` fingerprints the ids independently of the file's dtype, and
`batch_plan` cuts the stream into the teacher calls that every run, resumed or not, makes.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["DATA_FORMATS", "TokenStreamError", "batch_plan", "data_format_of", "load_token_stream",
           "token_stream_checksum"]

DATA_FORMATS = ("auto", "npy", "pt", "text")
_EXTENSION_FORMATS = {".npy": "npy", ".pt": "pt", ".pth": "pt"}
_TEXT_LINES_PER_CALL = 1024
_HASH_CHUNK_TOKENS = 1 << 22


class TokenStreamError(ValueError):
    """The token file is missing, unreadable, or holds something other than integer token ids."""


def data_format_of(path: str, data_format: str = "auto") -> str:
    """The format `load_token_stream` uses: `data_format`, or for "auto" by extension (.npy, .pt/.pth, else text)."""
    if data_format not in DATA_FORMATS:
        raise TokenStreamError(f"unknown data format {data_format!r}; expected one of {', '.join(DATA_FORMATS)}")
    if data_format == "auto":
        return _EXTENSION_FORMATS.get(os.path.splitext(path)[1].lower(), "text")
    return data_format


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


def _not_integer(path: str, dtype: object) -> TokenStreamError:
    return TokenStreamError(
        f"{path}: token ids must have an integer dtype, got {dtype}; convert them first "
        "(numpy: ids.astype(np.int64), torch: ids.long()) after checking that every value is a whole number"
    )


def _load_pt(path: str) -> np.ndarray:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
        first_line = str(error).split(". ")[0].splitlines()[0] if str(error) else ""
        raise TokenStreamError(f"{path} is not a readable .pt file of token ids "
                               f"({type(error).__name__}: {first_line})") from None
    if isinstance(loaded, (list, tuple)):
        try:
            parts = [torch.as_tensor(item).reshape(-1) for item in loaded]
        except (TypeError, ValueError, RuntimeError) as error:
            raise TokenStreamError(f"{path}: expected a tensor or a list of tensors or ints of token ids ({error})") \
                from None
        loaded = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    if not isinstance(loaded, torch.Tensor):
        raise TokenStreamError(f"{path}: expected a tensor or a list of tensors of token ids, "
                               f"got {type(loaded).__name__}")
    if loaded.is_floating_point() or loaded.is_complex() or loaded.dtype == torch.bool:
        raise _not_integer(path, loaded.dtype)
    return loaded.reshape(-1).to(torch.int64).numpy()


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

    Raises:
        TokenStreamError: the file is missing or unreadable, or its ids are not integers.
    """
    data_format = data_format_of(path, data_format)
    if not os.path.exists(path):
        raise TokenStreamError(f"data file {path} does not exist")
    if os.path.isdir(path):
        raise TokenStreamError(f"data path {path} is a directory; expected a .npy, .pt or text file")
    try:
        if data_format == "npy":
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as error:
                reason = str(error).split(". ")[0]
                raise TokenStreamError(f"{path} is not a readable .npy array of token ids ({reason})") from None
            if not isinstance(array, np.ndarray):
                raise TokenStreamError(f"{path} holds several arrays (.npz); save the token ids with np.save")
            array = array.reshape(-1)
        elif data_format == "pt":
            array = _load_pt(path)
        else:
            if tokenizer is None:
                raise TokenStreamError(f"{path} is read as text and needs a tokenizer: pass --tokenizer")
            try:
                array = _read_text_tokens(path, tokenizer, append_eos)
            except UnicodeDecodeError as error:
                raise TokenStreamError(f"{path} is read as text but is not UTF-8 ({error.reason} at byte "
                                       f"{error.start}); pass --data-format npy or pt for token-id files") from None
    except OSError as error:
        raise TokenStreamError(f"cannot read data file {path}: {error.strerror or error}") from None
    if array.dtype.kind not in "iu":
        raise _not_integer(path, array.dtype)
    return array, data_format


def token_stream_checksum(tokens: np.ndarray) -> str:
    """blake2b-128 of the token ids as little-endian int64, independent of the file's dtype."""
    hasher = hashlib.blake2b(digest_size=16)
    for start in range(0, tokens.shape[0], _HASH_CHUNK_TOKENS):
        hasher.update(np.ascontiguousarray(tokens[start : start + _HASH_CHUNK_TOKENS], dtype="<i8").tobytes())
    return hasher.hexdigest()


def batch_plan(num_tokens: int, seq_len: int, batch_size: int, *, start: int = 0,
               stop: Optional[int] = None) -> Iterator[Tuple[int, int, int]]:
    """Yields (first token, end token, windows) of every teacher call, in order.

    Full windows of `seq_len` are grouped `batch_size` at a time from token 0; a final
    shorter window, if any, is its own call. The plan depends only on its arguments.
    With `start`/`stop`, only the calls that hold a token of [start, stop) are yielded
    (found without walking the calls before them), so processes that share out the
    tokens make exactly the calls of one process.
    """
    stop = num_tokens if stop is None else min(stop, num_tokens)
    start = max(start, 0)
    if start >= stop:
        return
    full_windows = num_tokens // seq_len
    for first_window in range(start // seq_len // batch_size * batch_size, full_windows, batch_size):
        if first_window * seq_len >= stop:
            return
        windows = min(batch_size, full_windows - first_window)
        if (first_window + windows) * seq_len > start:
            yield first_window * seq_len, (first_window + windows) * seq_len, windows
    if num_tokens % seq_len and full_windows * seq_len < stop:
        yield full_windows * seq_len, num_tokens, 1
