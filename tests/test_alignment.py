"""Tests of `kdfast.alignment`: byte-offset alignment of two tokenizations and the per-span helpers.

The spans must equal the groups of TRL's `_align_by_byte_offsets` (TRL's own code, loaded by
`tests/trl_gold.py`; a plain-Python walk of the same rule when TRL is absent) on random offset
pairs with zero-width tokens, different lengths and empty sides, and on real tokenizations of
local text by two byte-level BPE tokenizers of different vocabulary sizes. Batched inputs
(right and left padding with masks, lists of sequences, tensors) must equal row-by-row
alignment. Closed spans must cover the same bytes on both sides. `span_logprobs` must equal
per-span sums (and pass gradients), `span_positions` the first and last token of each span.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

import kdfast
from kdfast.alignment import align_byte_offsets, char_to_byte_offsets, sequential_groups, span_logprobs, span_positions
from trl_gold import load_uld_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def walk_groups(s_offsets, t_offsets):
    """The alignment rule written as the two-pointer walk: TRL's function when it can be loaded."""
    uld = load_uld_class()
    if uld is not None:
        return uld._align_by_byte_offsets(s_offsets, t_offsets)
    return sequential_groups(s_offsets, t_offsets)


def random_offsets(rng, n_bytes, density, zero_width=0.1, eos=0.5):
    """[(start, end)] tokens covering bytes 0..n_bytes, with zero-width tokens sprinkled in."""
    cuts = np.sort(rng.choice(np.arange(1, n_bytes), size=int(density * (n_bytes - 1)), replace=False))
    bounds = np.concatenate([[0], cuts, [n_bytes]])
    tokens = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if rng.random() < zero_width:
            tokens.append((start, start))
        tokens.append((start, end))
    if rng.random() < eos:
        tokens.append((n_bytes, n_bytes))
    return np.asarray(tokens, dtype=np.int64).reshape(-1, 2)


def assert_same_bytes(student, teacher, alignment, row=0):
    """Each closed span covers the same byte range on both sides."""
    student_groups, teacher_groups = alignment.groups(row)
    for span in range(int(alignment.num_closed[row])):
        s_tokens, t_tokens = student[student_groups[span]], teacher[teacher_groups[span]]
        assert len(s_tokens) and len(t_tokens)
        assert s_tokens[-1, 1] == t_tokens[-1, 1]
        if span:
            previous = student[student_groups[span - 1]][-1, 1]
            assert previous == teacher[teacher_groups[span - 1]][-1, 1]


@pytest.mark.parametrize("seed", range(20))
def test_random_pairs_equal_the_walk(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        n_bytes = int(rng.integers(1, 60))
        student = random_offsets(rng, n_bytes, rng.random())
        other_bytes = n_bytes if rng.random() < 0.7 else int(rng.integers(1, 60))
        teacher = random_offsets(rng, other_bytes, rng.random())
        if rng.random() < 0.2:
            student = np.concatenate([[[0, 0]], student])  # a BOS only the student has
        alignment = align_byte_offsets(student, teacher)
        assert alignment.groups(0) == walk_groups(student.tolist(), teacher.tolist())
        assert_same_bytes(student, teacher, alignment)
        # offsets far from 0 (e.g. relative to a long document) take the binary-search path
        shift = 10**9
        shifted = align_byte_offsets(student + shift, teacher + shift)
        assert torch.equal(shifted.student_spans, alignment.student_spans)
        assert torch.equal(shifted.teacher_spans, alignment.teacher_spans)


def test_edge_cases():
    cases = [
        ([], [[0, 3]]),  # one side empty: everything is one tail span
        ([[0, 3]], []),
        ([], []),
        ([[0, 0], [0, 3], [3, 5]], [[0, 5], [5, 5]]),  # BOS on one side, EOS on the other
        ([[0, 0], [0, 2]], [[0, 0], [0, 2]]),  # BOS on both sides: a span of its own
        ([[0, 2], [2, 4]], [[0, 2], [2, 4], [4, 9]]),  # the teacher runs past the student
        ([[0, 4], [4, 4], [4, 4]], [[0, 4], [4, 4]]),  # repeated zero-width tokens
    ]
    for student, teacher in cases:
        alignment = align_byte_offsets([np.asarray(student).reshape(-1, 2)], [np.asarray(teacher).reshape(-1, 2)])
        assert alignment.groups(0) == walk_groups(student, teacher), (student, teacher)
    empty_student = align_byte_offsets(np.zeros((2, 0, 2)), np.tile(np.array([[0, 1], [1, 2], [2, 3]]), (2, 1, 1)))
    assert empty_student.num_closed.tolist() == [0, 0] and empty_student.num_spans.tolist() == [1, 1]
    assert empty_student.groups(1) == ([[]], [[0, 1, 2]])
    alignment = align_byte_offsets(np.array([[0, 2], [2, 4]]), np.array([[0, 2], [2, 4], [4, 9]]))
    assert alignment.num_closed.tolist() == [2] and alignment.num_spans.tolist() == [3]
    assert alignment.span_mask().tolist() == [[True, True, False]]
    assert alignment.span_mask(include_tail=True).tolist() == [[True, True, True]]


def test_sequential_groups_is_trls_walk():
    uld = load_uld_class()
    if uld is None:
        pytest.skip("TRL's ULDLoss cannot be loaded")
    rng = np.random.default_rng(7)
    for _ in range(300):
        student, teacher = random_offsets(rng, 60, 0.4), random_offsets(rng, 60, 0.25)
        assert sequential_groups(student.tolist(), teacher.tolist()) == uld._align_by_byte_offsets(
            student.tolist(), teacher.tolist())


def test_zero_width_token_after_the_text_sits_at_its_end():
    # a special token reported at (0, 0) after the text is placed at the end of the bytes before it
    student = np.array([[0, 3], [3, 6], [0, 0]])
    teacher = np.array([[0, 6], [6, 6]])
    alignment = align_byte_offsets(student, teacher)
    same_as = align_byte_offsets(np.array([[0, 3], [3, 6], [6, 6]]), teacher)
    assert torch.equal(alignment.student_spans, same_as.student_spans)
    assert alignment.groups(0) == ([[0, 1], [2]], [[0], [1]])


@pytest.mark.parametrize("padding", ["right", "left"])
def test_padded_batches_equal_rows(padding):
    rng = np.random.default_rng(7)
    rows = [(random_offsets(rng, n, 0.5), random_offsets(rng, n, 0.3)) for n in (5, 30, 1, 17)]
    def pad(sequences):
        width = max(len(sequence) for sequence in sequences)
        offsets = np.zeros((len(sequences), width, 2), dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=bool)
        for index, sequence in enumerate(sequences):
            where = slice(0, len(sequence)) if padding == "right" else slice(width - len(sequence), width)
            offsets[index, where] = sequence
            mask[index, where] = True
        return torch.from_numpy(offsets), torch.from_numpy(mask).long()
    student, student_mask = pad([s for s, _ in rows])
    teacher, teacher_mask = pad([t for _, t in rows])
    batched = align_byte_offsets(student, teacher, student_mask=student_mask, teacher_mask=teacher_mask)
    listed = align_byte_offsets([s for s, _ in rows], [torch.from_numpy(t) for _, t in rows])
    assert batched.student_spans.dtype == torch.int64
    assert (batched.student_spans[student_mask == 0] == -1).all()
    for row, (s, t) in enumerate(rows):
        expected = walk_groups(s.tolist(), t.tolist())
        assert batched.groups(row) == expected
        assert listed.groups(row) == expected
        single = align_byte_offsets(s, t)
        assert single.num_spans.tolist() == [int(batched.num_spans[row])]


def test_char_to_byte_offsets():
    text = "a→b€😀 ü"
    offsets = np.array([[0, 1], [1, 2], [2, 4], [4, 5], [5, 7], [7, 7]])
    expected = np.array([[0, 1], [1, 4], [4, 8], [8, 12], [12, 15], [15, 15]])
    assert np.array_equal(char_to_byte_offsets(text, offsets), expected)
    assert char_to_byte_offsets("", np.zeros((0, 2), dtype=np.int64)).shape == (0, 2)


def test_errors():
    with pytest.raises(ValueError, match="2 student sequences but 1 teacher"):
        align_byte_offsets([np.zeros((1, 2))] * 2, [np.zeros((1, 2))])
    with pytest.raises(ValueError, match="shape"):
        align_byte_offsets(np.zeros((3, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        align_byte_offsets(np.array([[0, -1]]), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="mask shape"):
        align_byte_offsets(np.zeros((2, 3, 2)), np.zeros((2, 3, 2)), student_mask=np.ones((2, 4)))
    with pytest.raises(ValueError, match="which"):
        span_positions(torch.zeros(1, 2, dtype=torch.long), which="middle")


# ------------------------------------------------------------------------ real tokenizers

def byte_offsets(text, encoding):
    """The tokenizer's character offsets as UTF-8 byte offsets (checked against a plain loop)."""
    starts = np.concatenate([[0], np.cumsum([len(ch.encode("utf-8")) for ch in text])])
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    converted = char_to_byte_offsets(text, offsets)
    assert np.array_equal(converted, starts[offsets])
    return converted


@pytest.fixture(scope="module")
def tokenizer_pair():
    tokenizers = pytest.importorskip("tokenizers")
    texts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        with open(path, encoding="utf-8") as handle:
            texts.extend(part for part in handle.read().split("\n\n") if part.strip())
    pair = []
    for vocab_size in (300, 1200):
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                                 initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer=trainer)
        pair.append(tokenizer)
    return pair, texts


def test_real_tokenizations_equal_the_walk(tokenizer_pair):
    (small, large), texts = tokenizer_pair
    chosen = [text for text in texts if any(ord(ch) > 127 for ch in text)][:20] + texts[:20]
    student_offsets, teacher_offsets = [], []
    for text in chosen:
        student = byte_offsets(text, small.encode(text))
        teacher = byte_offsets(text, large.encode(text))
        assert len(student) > len(teacher)  # the smaller vocabulary splits into more tokens
        student_offsets.append(np.concatenate([[[0, 0]], student]))  # a BOS on the student side
        teacher_offsets.append(teacher)
    alignment = align_byte_offsets(student_offsets, teacher_offsets)
    for row, (student, teacher) in enumerate(zip(student_offsets, teacher_offsets)):
        assert alignment.groups(row) == walk_groups(student.tolist(), teacher.tolist())
        assert_same_bytes(student, teacher, alignment, row)
        assert int(alignment.num_spans[row]) == int(alignment.num_closed[row])  # same text: no tail
        assert int(alignment.num_closed[row]) < len(teacher_offsets[row]) + 1


# ------------------------------------------------------------------------ per-span helpers

def test_span_logprobs_and_positions():
    rng = np.random.default_rng(3)
    rows = [(random_offsets(rng, n, 0.6), random_offsets(rng, n, 0.3)) for n in (12, 40, 3)]
    alignment = align_byte_offsets([s for s, _ in rows], [t for _, t in rows])
    spans = alignment.student_spans
    logprobs = -torch.rand(spans.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logprobs.requires_grad_(True)
    width = alignment.max_spans
    merged = span_logprobs(logprobs, spans, width)
    first = span_positions(spans, width, "first")
    last = span_positions(spans, width, "last")
    assert merged.shape == (3, width)
    for row in range(3):
        groups = alignment.groups(row)[0]
        for span in range(width):
            tokens = groups[span] if span < len(groups) else []
            expected = logprobs[row, tokens].sum() if tokens else torch.zeros((), dtype=torch.float64)
            torch.testing.assert_close(merged[row, span], expected)
            assert first[row, span].item() == (tokens[0] if tokens else -1)
            assert last[row, span].item() == (tokens[-1] if tokens else -1)
    merged.sum().backward()
    assert torch.equal(logprobs.grad, (spans >= 0).to(torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        span_logprobs(logprobs[:, :1], spans)


def test_spans_pair_rows_for_uld(tokenizer_pair):
    """The cross-tokenizer recipe of docs/cross_tokenizer.md: the logits rows that predict each
    closed span's first token are paired, and uld_loss on them has a finite gradient that
    reaches exactly the chosen student rows."""
    (small, large), texts = tokenizer_pair
    batch = texts[3:6]
    student_offsets = [byte_offsets(text, small.encode(text)) for text in batch]
    teacher_offsets = [byte_offsets(text, large.encode(text)) for text in batch]
    alignment = align_byte_offsets(student_offsets, teacher_offsets)
    width = alignment.max_spans
    student_first = span_positions(alignment.student_spans, width, "first")
    teacher_first = span_positions(alignment.teacher_spans, width, "first")
    use = alignment.span_mask() & (student_first > 0) & (teacher_first > 0)
    for row, (student, teacher) in enumerate(zip(student_offsets, teacher_offsets)):
        # the paired rows (before each span's first token) have read the same bytes on both sides:
        # their tokens end at the same byte (starts may differ: byte-level BPE tokens that split one
        # multi-byte character carry that character's whole offsets)
        chosen = use[row].nonzero().flatten()
        assert np.array_equal(student[student_first[row, chosen] - 1, 1], teacher[teacher_first[row, chosen] - 1, 1])
    rows = torch.arange(len(batch))[:, None]
    generator = torch.Generator().manual_seed(0)
    student_logits = torch.randn(len(batch), alignment.student_spans.shape[1], 300, generator=generator)
    student_logits.requires_grad_(True)
    teacher_logits = torch.randn(len(batch), alignment.teacher_spans.shape[1], 1200, generator=generator)
    student_rows = student_logits[rows, (student_first - 1).clamp(min=0)]
    teacher_rows = teacher_logits[rows, (teacher_first - 1).clamp(min=0)]
    loss = kdfast.uld_loss(student_rows, teacher_rows, k=64, mask=use)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    touched = student_logits.grad.abs().sum(-1) > 0
    expected = torch.zeros_like(touched)
    for row in range(len(batch)):
        expected[row, student_first[row, use[row]] - 1] = True
    assert torch.equal(touched, expected)
