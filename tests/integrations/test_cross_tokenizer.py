"""kdfast.integrations.cross_tokenizer: both tokenizations of a batch, span pairs, the loss.

- `encode_with_offsets` gives the same ids, masks and byte offsets from a `tokenizers.Tokenizer`
  and from the Hugging Face fast tokenizer wrapping it, including non-ASCII text;
- at every used span pair both models have read exactly the same bytes (the paired positions'
  tokens end at the same byte), and the pairs are exactly the spans of TRL-style per-text groups
  (`SpanAlignment.groups`);
- `cross_tokenizer_kd_loss` equals a float64 loop over texts and spans with
  `kdfast.reference.uld_loss`, values and gradients, for the exact and the top-k form, and is 0
  with a gradient path when nothing pairs;
- `CrossTokenizerCollator` + `cross_tokenizer_distillation_loss` on two tiny Llamas equal
  α·CE + (1 − α)·that loop, and `DistillationTrainer(teacher_tokenizer=...)` computes the same
  loss and lowers it in training.
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


# --------------------------------------------------------------------------------------
# The collator, the two-model loss and DistillationTrainer(teacher_tokenizer=...)


def _tiny_llama(vocab, seed, hidden=16):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_collator_and_two_model_loss(tokenizer_pair, alpha):
    from kdfast.integrations.cross_tokenizer import CrossTokenizerCollator, cross_tokenizer_distillation_loss

    student_tokenizer, teacher_tokenizer = tokenizer_pair
    collate = CrossTokenizerCollator(student_tokenizer, teacher_tokenizer, max_length=48)
    batch = collate([{"text": text} for text in TEXTS[:3]] + [TEXTS[3]])
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)
    student = _tiny_llama(student_tokenizer.get_vocab_size(), 0)
    teacher = _tiny_llama(teacher_tokenizer.get_vocab_size(), 1)
    loss, outputs = cross_tokenizer_distillation_loss(student, teacher, batch, temperature=2.0, alpha=alpha)
    loss.backward()
    logits = outputs.logits.detach().double().requires_grad_(True)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["teacher_input_ids"],
                                 attention_mask=batch["teacher_attention_mask"]).logits.double()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    uld = _loop_reference(logits, teacher_logits, batch["span_pairs"], student_temperature=2.0,
                          teacher_temperature=2.0)
    expected = alpha * ce + (1 - alpha) * uld
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=2e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'text' field"):
        collate([{"other": "x"}])
    with pytest.raises(ValueError, match="lacks"):
        cross_tokenizer_distillation_loss(student, teacher, {"input_ids": batch["input_ids"]})


def test_trainer_with_a_teacher_tokenizer(tokenizer_pair, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from kdfast.integrations import huggingface as hf
    from kdfast.integrations.cross_tokenizer import cross_tokenizer_distillation_loss

    student_tokenizer, teacher_tokenizer = tokenizer_pair
    student_fast = transformers.PreTrainedTokenizerFast(tokenizer_object=student_tokenizer)
    teacher_fast = transformers.PreTrainedTokenizerFast(tokenizer_object=teacher_tokenizer)
    student = _tiny_llama(student_tokenizer.get_vocab_size(), 0)
    teacher = _tiny_llama(teacher_tokenizer.get_vocab_size(), 1, hidden=32)
    with pytest.raises(ValueError, match="does not combine"):
        hf.DistillationTrainer(model=student, teacher_model=teacher, teacher_tokenizer=teacher_fast, fused=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12, learning_rate=1e-2, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)
    dataset = [{"text": text} for text in TEXTS * 4]
    trainer = hf.DistillationTrainer(model=student, args=args, train_dataset=dataset, teacher_model=teacher,
                                     processing_class=student_fast, teacher_tokenizer=teacher_fast, alpha=0.3,
                                     temperature=1.5, max_length=40)
    batch = trainer.data_collator(dataset[:4])
    with torch.no_grad():
        expected, _ = cross_tokenizer_distillation_loss(student, teacher, batch, temperature=1.5, alpha=0.3)
        before = trainer.compute_loss(student, batch).item()
    assert before == pytest.approx(expected.item(), rel=1e-6)
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(student, batch).item()
    assert after < before
