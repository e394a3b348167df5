"""Byte-offset alignment of two tokenizations of the same text, vectorised.

Two fast tokenizers split one text into different tokens. `align_byte_offsets` groups each
side's tokens into spans that cover the same bytes: walking both sequences of token end
offsets, a span closes exactly where both tokenizers put a boundary (the rule of TRL's
`GOLDTrainer` ULD alignment, `_align_by_byte_offsets`, which walks the two lists in Python).
Here the walk is replaced by its closed form: with non-decreasing end offsets, the m-th token
of one side ending at byte e closes a span together with the m-th token of the other side
ending at e, if there is one; each side's span id is then an exclusive cumulative sum of its
closing tokens. The whole batch is handled at once over row-shifted keys (a count table or
`np.searchsorted`), with no per-token Python loop. `span_logprobs` sums per-token
log-probabilities into per-span ones and `span_positions` finds each span's first or last
token, both with scatter operations; `char_to_byte_offsets` turns a fast tokenizer's
character offsets into byte offsets. `sequential_groups` is the rule itself, the two-pointer
walk over one pair of sequences, kept as the definition the vectorised form is checked and
timed against.
This module needs only numpy and torch; it sits at the bottom of the package layers.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["SpanAlignment", "align_byte_offsets", "char_to_byte_offsets", "sequential_groups", "span_logprobs",
           "span_positions"]

Offsets = Union[np.ndarray, Tensor, Sequence]

# count equal keys with a table indexed by key while it has at most this many entries per token
_TABLE_LIMIT_PER_TOKEN = 16


@dataclasses.dataclass(frozen=True)
class SpanAlignment:
    """Span ids of both tokenizations of a batch of texts.

    Attributes:
        student_spans: [B, L_s] int64, the span of each student token; −1 where the student
            mask is False (padding).
        teacher_spans: [B, L_t] int64, likewise for the teacher.
        num_closed: [B] int64, the spans 0 … num_closed−1 of a row end at a byte boundary both
            tokenizers share: each has at least one token per side and both sides cover
            the same bytes.
        num_spans: [B] int64, num_closed plus one for the tail span when a row has one: the
            tokens after the last shared boundary (one side ran past the other, e.g. a
            truncated text or an EOS only one side has). One of its sides may be empty.
    """

    student_spans: Tensor
    teacher_spans: Tensor
    num_closed: Tensor
    num_spans: Tensor

    @property
    def max_spans(self) -> int:
        """S, the largest num_spans of the batch (the width of per-span tensors)."""
        return int(self.num_spans.max()) if self.num_spans.numel() else 0

    def span_mask(self, include_tail: bool = False) -> Tensor:
        """[B, S] bool: the closed spans (plus the tail spans with include_tail=True)."""
        spans = torch.arange(self.max_spans, device=self.num_spans.device)
        limit = self.num_spans if include_tail else self.num_closed
        return spans[None, :] < limit[:, None]

    def groups(self, row: int = 0) -> tuple:
        """(student_groups, teacher_groups) of one row as lists of token positions per span,
        the form TRL's `_align_by_byte_offsets` returns (positions count the masked-in tokens
        only, in order)."""
        result = []
        for spans in (self.student_spans[row], self.teacher_spans[row]):
            spans = spans[spans >= 0].tolist()
            groups = [[] for _ in range(int(self.num_spans[row]))]
            for position, span in enumerate(spans):
                groups[span].append(position)
            result.append(groups)
        return tuple(result)


def _as_padded(offsets: Offsets, mask) -> tuple:
    """(ends [B, L] int64, mask [B, L] bool) from offsets in any accepted form."""
    if isinstance(offsets, Tensor):
        offsets = offsets.detach().cpu().numpy()
    if isinstance(offsets, np.ndarray) or (len(offsets) > 0 and np.ndim(offsets[0]) == 1):
        array = np.asarray(offsets)
        if array.size == 0 and array.ndim < 2:
            array = array.reshape(0, 2)
        if array.ndim not in (2, 3) or array.shape[-1] != 2:
            raise ValueError(f"align_byte_offsets: offsets must have shape [L, 2] or [B, L, 2], got {array.shape}")
        ends = array[..., 1].astype(np.int64).reshape(array.shape[0] if array.ndim == 3 else 1, array.shape[-2])
        if mask is None:
            valid = np.ones(ends.shape, dtype=bool)
        else:
            valid = np.asarray(mask.detach().cpu() if isinstance(mask, Tensor) else mask).astype(bool)
            valid = valid.reshape(ends.shape) if valid.size == ends.size else valid
            if valid.shape != ends.shape:
                raise ValueError(f"align_byte_offsets: mask shape {valid.shape} does not match the offsets' "
                                 f"{ends.shape}")
        return ends, valid
    if mask is not None:
        raise ValueError("align_byte_offsets: a mask goes with padded [B, L, 2] offsets, not with a list of "
                         "sequences (their lengths already say which tokens exist)")
    rows = [np.asarray(row.detach().cpu() if isinstance(row, Tensor) else row, dtype=np.int64).reshape(-1, 2)
            for row in offsets]
    width = max((len(row) for row in rows), default=0)
    ends = np.zeros((len(rows), width), dtype=np.int64)
    valid = np.zeros((len(rows), width), dtype=bool)
    for index, row in enumerate(rows):
        ends[index, :len(row)] = row[:, 1]
        valid[index, :len(row)] = True
    return ends, valid


def _run_ranks(keys: np.ndarray) -> Optional[np.ndarray]:
    """For sorted keys, the rank of each entry among the equal keys before it (0 for the
    first); None when no key repeats (every rank 0)."""
    starts = np.ones(keys.size, dtype=bool)
    np.not_equal(keys[1:], keys[:-1], out=starts[1:])
    if starts.all():
        return None
    run_starts = np.flatnonzero(starts)
    lengths = np.diff(np.append(run_starts, keys.size))
    return np.arange(keys.size) - np.repeat(run_starts, lengths)


def _closing_tokens(keys: np.ndarray, ranks: Optional[np.ndarray], other: np.ndarray,
                    other_ranks: Optional[np.ndarray], table_size: int) -> np.ndarray:
    """For sorted keys, True where the m-th occurrence of a value has an m-th occurrence in
    the sorted `other` (the tokens that close a span): m < the count of the value in `other`.
    Counts come from a table indexed by key when the key range is small, else from two
    binary searches. Ranks of None mean all 0."""
    if keys.size == 0 or other.size == 0:
        return np.zeros(keys.size, dtype=bool)
    if table_size > _TABLE_LIMIT_PER_TOKEN * (keys.size + other.size) + 4096:
        counts = np.searchsorted(other, keys, side="right") - np.searchsorted(other, keys, side="left")
        return counts > (0 if ranks is None else ranks)
    if other_ranks is None:  # no repeated key on the other side: a presence table suffices
        present = np.zeros(table_size, dtype=bool)
        present[other] = True
        closing = present[keys]
        return closing if ranks is None else closing & (ranks == 0)
    counts = np.bincount(other, minlength=table_size)[keys]
    return counts > (0 if ranks is None else ranks)


def align_byte_offsets(student_offsets: Offsets, teacher_offsets: Offsets, *,
                       student_mask=None, teacher_mask=None) -> SpanAlignment:
    """Groups the tokens of two tokenizations of the same texts into spans of the same bytes.

    A span closes where both sides have a token ending at the same byte offset: walking both
    sides, the side whose current token ends earlier advances, and equal ends close the span
    on both sides. Tokens left after the last shared boundary form one tail span (one of its
    sides may be empty). Only the end offsets are read, and each side's ends are first made
    non-decreasing by a running maximum, so a zero-width token, such as BOS at (0, 0), EOS at
    (n, n), or a special token whose offsets are (0, 0) after the text, sits at the end of the
    bytes before it: it shares a span boundary only with a zero-width token of the other side
    at the same place and rank, and otherwise joins the next span (or the tail). For
    non-decreasing ends the spans equal those of TRL's `_align_by_byte_offsets` on the same
    offsets; TRL compares a (0, 0) token after the text as offset 0 instead.

    Args:
        student_offsets, teacher_offsets: per-token (start, end) byte offsets of the same texts:
            an int array or tensor [L, 2] (one text) or [B, L, 2] (padded batch), or a list of
            B sequences of [L_i, 2] (no mask then). Both sides must have the same B.
        student_mask, teacher_mask: None (every token counts) or [B, L] bool/int masks of the
            padded forms (e.g. attention masks, left or right padding); masked-out tokens get
            span −1 and are skipped.

    Returns:
        SpanAlignment with [B, L_s] / [B, L_t] int64 span ids (B = 1 for one text), num_closed
        and num_spans [B], on the device of `student_offsets` when it is a tensor, else the CPU.
    """
    device = student_offsets.device if isinstance(student_offsets, Tensor) else torch.device("cpu")
    student_ends, student_valid = _as_padded(student_offsets, student_mask)
    teacher_ends, teacher_valid = _as_padded(teacher_offsets, teacher_mask)
    batch = student_ends.shape[0]
    if teacher_ends.shape[0] != batch:
        raise ValueError(f"align_byte_offsets: {batch} student sequences but {teacher_ends.shape[0]} teacher "
                         "sequences")
    largest = max(int(student_ends.max(initial=0)), int(teacher_ends.max(initial=0)))
    if min(int(student_ends.min(initial=0)), int(teacher_ends.min(initial=0))) < 0:
        raise ValueError("align_byte_offsets: byte offsets must be non-negative")
    stride = largest + 1
    sides = []
    for ends, valid in ((student_ends, student_valid), (teacher_ends, teacher_valid)):
        # shifting row r by r·stride makes the flat keys of the whole batch one sorted array,
        # and the running maximum per row a running maximum over the flat array
        shifts = np.arange(batch, dtype=np.int64) * stride
        keys = (ends + shifts[:, None]).reshape(-1) if valid.all() else (ends + shifts[:, None])[valid]
        if keys.size and not (keys[1:] >= keys[:-1]).all():
            keys = np.maximum.accumulate(keys)
        sides.append((None, keys, _run_ranks(keys)))
    table_size = batch * stride
    closed_counts = np.zeros(batch, dtype=np.int64)
    tail = np.zeros(batch, dtype=bool)
    tensors = []
    for (_, keys, ranks), (_, other, other_ranks), (ends, valid) in zip(
            sides, sides[::-1], ((student_ends, student_valid), (teacher_ends, teacher_valid))):
        closing = _closing_tokens(keys, ranks, other, other_ranks, table_size)
        if valid.all():
            closing = closing.reshape(ends.shape)
        else:
            padded = np.zeros(ends.shape, dtype=bool)
            padded[valid] = closing
            closing = padded
        # a token's span: the closing tokens before it in its row (identical counts on both sides)
        span = np.cumsum(closing, axis=1)
        closed_counts = span[:, -1].copy() if span.shape[1] else np.zeros(batch, dtype=np.int64)
        span -= closing
        tail |= (valid & (span == closed_counts[:, None])).any(axis=1)
        out = span if valid.all() else np.where(valid, span, -1)
        tensors.append(torch.from_numpy(out).to(device))
    num_closed = torch.from_numpy(closed_counts).to(device)
    num_spans = torch.from_numpy(closed_counts + tail).to(device)
    return SpanAlignment(tensors[0], tensors[1], num_closed, num_spans)


def sequential_groups(student_offsets: Sequence, teacher_offsets: Sequence) -> tuple:
    """The alignment rule as a two-pointer walk over one pair of (start, end) offset lists.

    Advances the side whose current token ends earlier; when both end at the same byte, the
    tokens walked since the last such boundary form one group on each side. Tokens left on
    either side when the other runs out form a last group pair. Returns (student groups,
    teacher groups), each a list of lists of token positions. One Python step per token: for
    reference and comparison, not for the training step (use `align_byte_offsets`).
    """
    student_groups, teacher_groups = [], []
    s = t = s_start = t_start = 0
    while s < len(student_offsets) and t < len(teacher_offsets):
        s_end, t_end = student_offsets[s][1], teacher_offsets[t][1]
        if s_end < t_end:
            s += 1
        elif s_end > t_end:
            t += 1
        else:
            s, t = s + 1, t + 1
            student_groups.append(list(range(s_start, s)))
            teacher_groups.append(list(range(t_start, t)))
            s_start, t_start = s, t
    if s < len(student_offsets) or t < len(teacher_offsets):
        student_groups.append(list(range(s_start, len(student_offsets))))
        teacher_groups.append(list(range(t_start, len(teacher_offsets))))
    return student_groups, teacher_groups


def char_to_byte_offsets(text: str, offsets) -> np.ndarray:
    """Character offsets (what fast tokenizers return in `offset_mapping`) as UTF-8 byte offsets.

    Args:
        text: the string that was tokenized.
        offsets: [..., 2] int array-like of (start, end) character offsets into `text`.

    Returns:
        int64 array of the same shape: the byte offsets of those characters in text.encode("utf-8").
    """
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    starts = np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])
    return starts[np.asarray(offsets, dtype=np.int64)]


def span_logprobs(token_logprobs: Tensor, spans: Tensor, num_spans: Optional[int] = None) -> Tensor:
    """Sums per-token log-probabilities into per-span ones.

    The sum over a span's tokens is, by the chain rule, the log-probability that a tokenizer's
    model gives the span's byte string (given what precedes it), so the two sides' span
    log-probabilities compare like with like.

    Args:
        token_logprobs: [B, L] float log-probabilities of the observed tokens (differentiable).
        spans: [B, L] int64 span ids from `SpanAlignment` (−1: skipped).
        num_spans: S, the width of the result (default: the largest span id + 1).

    Returns:
        [B, S] tensor in the dtype of token_logprobs; a span with no token of this side is 0.
    """
    if token_logprobs.shape != spans.shape:
        raise ValueError(f"span_logprobs: token_logprobs {tuple(token_logprobs.shape)} and spans "
                         f"{tuple(spans.shape)} must have the same shape")
    width = int(spans.max()) + 1 if num_spans is None else int(num_spans)
    width = max(width, 0)
    index = torch.where(spans >= 0, spans, width).clamp(max=width)
    out = torch.zeros(spans.shape[0], width + 1, dtype=token_logprobs.dtype, device=token_logprobs.device)
    return out.scatter_add(1, index, token_logprobs)[:, :width]


def span_positions(spans: Tensor, num_spans: Optional[int] = None, which: str = "first") -> Tensor:
    """[B, S] int64: the position of each span's first (or last) token, −1 for a span with no
    token of this side. Useful to pick the logits rows that `uld_loss` compares per span."""
    if which not in ("first", "last"):
        raise ValueError(f"span_positions: which must be 'first' or 'last', got {which!r}")
    width = int(spans.max()) + 1 if num_spans is None else int(num_spans)
    width = max(width, 0)
    batch, length = spans.shape
    positions = torch.arange(length, device=spans.device).expand(batch, length)
    index = torch.where(spans >= 0, spans, width).clamp(max=width)
    if which == "first":
        out = torch.full((batch, width + 1), length, dtype=torch.int64, device=spans.device)
        out = out.scatter_reduce(1, index, positions, reduce="amin")[:, :width]
        return torch.where(out == length, -1, out)
    out = torch.full((batch, width + 1), -1, dtype=torch.int64, device=spans.device)
    return out.scatter_reduce(1, index, positions, reduce="amax")[:, :width]
