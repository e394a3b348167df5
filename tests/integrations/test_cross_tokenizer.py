"""kdfast.integrations.cross_tokenizer: both tokenizations of a batch, span pairs, the loss.

- `encode_with_offsets` gives the same ids, masks and byte offsets from a `tokenizers.Tokenizer`
  and from the Hugging Face fast tokenizer wrapping it, including non-ASCII text;
- at every used span pair both models have read exactly the same bytes (the paired positions'
  tokens end at the same byte), and the pairs are exactly the spans of TRL-style per-text groups
  (`SpanAlignment.groups`);
- `cross_tokenizer_kd_loss` equals a float64 loop over texts and spans with
  `kdfast.reference.uld_loss`, values and gradients, for the exact and the top-k form, and is 0
  with a gradient path when nothing pairs.
"""

import pytest
import torch

import kdfast
from kdfast.integrations.cross_tokenizer import (
    cross_tokenizer_kd_loss,
    encode_cross,
    encode_with_offsets,
    paired_rows,
    span_pairs,
)

tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["def add(a, b):\n    return a + b  # sum\n", "naïve café → über\n", "class Point:\n    x: int = 0\n", "x"]


def _train(vocab_size, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer_pair():
    corpus = [text * 30 for text in TEXTS]
    return _train(280, corpus), _train(330, corpus)


def test_plain_and_hugging_face_tokenizers_encode_alike(tokenizer_pair):
    transformers = pytest.importorskip("transformers")
    student, _ = tokenizer_pair
    plain = encode_with_offsets(student, TEXTS, 64)
    wrapped = encode_with_offsets(transformers.PreTrainedTokenizerFast(tokenizer_object=student), TEXTS, 64)
    for key in plain:
        assert torch.equal(plain[key], wrapped[key]), key
    # byte offsets: the non-ASCII text's last token ends at its UTF-8 length
    row = TEXTS.index("naïve café → über\n")
    count = int(plain["attention_mask"][row].sum())
    assert int(plain["offsets"][row, count - 1, 1]) == len(TEXTS[row].encode("utf-8"))


@pytest.mark.parametrize("max_length", [3, 8, 64])
def test_pairs_end_at_the_same_byte_and_match_the_groups(tokenizer_pair, max_length):
    student_tokenizer, teacher_tokenizer = tokenizer_pair
    batch = encode_cross(TEXTS, student_tokenizer, teacher_tokenizer, max_length)
    student = encode_with_offsets(student_tokenizer, TEXTS, max_length)
    teacher = encode_with_offsets(teacher_tokenizer, TEXTS, max_length)
    pairs = batch["span_pairs"]
    assert torch.equal(pairs, span_pairs(student["offsets"], teacher["offsets"], student["attention_mask"],
                                         teacher["attention_mask"]))
    alignment = kdfast.alignment.align_byte_offsets(student["offsets"], teacher["offsets"],
                                                    student_mask=student["attention_mask"].bool(),
                                                    teacher_mask=teacher["attention_mask"].bool())
    for row in range(len(TEXTS)):
        student_groups, teacher_groups = alignment.groups(row)
        expected = [(s[0] - 1, t[0] - 1) for span, (s, t) in enumerate(zip(student_groups, teacher_groups))
                    if span < int(alignment.num_closed[row]) and s and t and s[0] > 0 and t[0] > 0]
        used = pairs[row][pairs[row, :, 0] >= 0]
        assert [tuple(pair) for pair in used.tolist()] == expected
        for s_row, t_row in used.tolist():  # both models have read exactly the same bytes there
            assert int(student["offsets"][row, s_row, 1]) == int(teacher["offsets"][row, t_row, 1])


def _loop_reference(student_logits, teacher_logits, pairs, **options):
    rows = []
    for b in range(pairs.shape[0]):
        for s_row, t_row in pairs[b].tolist():
            if s_row >= 0:
                rows.append(kdfast.reference.uld_loss(student_logits[b, s_row][None].double(),
                                                      teacher_logits[b, t_row][None].double(),
                                                      reduction="none", **options))
    return torch.cat(rows).mean()


@pytest.mark.parametrize("k", [None, 5])
@pytest.mark.parametrize("temperatures", [(1.0, 1.0), (2.0, 0.5)])
def test_loss_equals_a_float64_loop(tokenizer_pair, k, temperatures):
    student_tokenizer, teacher_tokenizer = tokenizer_pair
    batch = encode_cross(TEXTS, student_tokenizer, teacher_tokenizer, 64)
    generator = torch.Generator().manual_seed(3)
    b, ls, lt = batch["input_ids"].shape[0], batch["input_ids"].shape[1], batch["teacher_input_ids"].shape[1]
    student = torch.randn(b, ls, 40, generator=generator, dtype=torch.float64)
    teacher = torch.randn(b, lt, 57, generator=generator, dtype=torch.float64)
    options = dict(student_temperature=temperatures[0], teacher_temperature=temperatures[1])
    leaf = student.float().requires_grad_(True)
    loss = cross_tokenizer_kd_loss(leaf, teacher.float(), batch["span_pairs"], k=k, **options)
    loss.backward()
    reference_leaf = student.clone().requires_grad_(True)
    if k is None:
        expected = _loop_reference(reference_leaf, teacher, batch["span_pairs"], **options)
    else:
        student_rows, teacher_rows = paired_rows(reference_leaf, teacher, batch["span_pairs"])
        expected = kdfast.reference.uld_loss(student_rows, teacher_rows, k=k, **options)
    expected.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), reference_leaf.grad, rtol=2e-4, atol=2e-6)


def test_no_pairs_gives_zero_with_a_gradient_path():
    student = torch.randn(2, 3, 7, requires_grad=True)
    pairs = torch.full((2, 1, 2), -1, dtype=torch.int64)
    loss = cross_tokenizer_kd_loss(student, torch.randn(2, 4, 9), pairs)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    assert cross_tokenizer_kd_loss(student, torch.randn(2, 4, 9), pairs, reduction="none").shape == (0,)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="batch sizes"):
        paired_rows(torch.randn(2, 3, 4), torch.randn(3, 3, 4), torch.zeros(2, 1, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="fast tokenizer"):
        encode_with_offsets(object(), ["a"], 4)
    with pytest.raises(ValueError, match="max_length"):
        encode_with_offsets(object(), ["a"], 0)
