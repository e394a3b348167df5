"""examples/llm_cross_tokenizer.py: its options, its smoke run, and the span pairing it trains on.

The pairing is checked on two real byte-level BPE tokenizations of the same pieces: at every
used (student, teacher) pair both models have read the same bytes (the paired positions'
tokens end at the same byte), and the next token on each side exists.
"""

import argparse
import json

import pytest
import torch
from test_examples import assert_smoke_notice, has_row, load_example

from kdfast.integrations.cross_tokenizer import paired_rows


def test_every_option_has_help_naming_its_default():
    pytest.importorskip("transformers")
    parser = load_example("llm_cross_tokenizer").build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action)
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"
        assert text.lower().count("default") <= 1, f"{action.option_strings}: {text!r}"
        if action.default not in (None, False) and not isinstance(action.default, list):
            assert "default" in text.lower(), f"{action.option_strings} does not name its default: {text!r}"


def test_span_pairs_end_at_the_same_byte_on_both_sides(tmp_path):
    pytest.importorskip("tokenizers")
    module = load_example("llm_cross_tokenizer")
    texts = ["def add(a, b):\n    return a + b\n" * 20, "class Point:\n    x: int = 0\n    y: int = 0\n" * 20]
    student_tokenizer = module.train_tokenizer(texts, 300, str(tmp_path))
    teacher_tokenizer = module.train_tokenizer(texts, 400, str(tmp_path))
    pieces = module.text_pieces(texts, 60)
    assert pieces and all(len(piece) == 60 for piece in pieces)
    student = module.encode_with_offsets(student_tokenizer, pieces, 40)
    teacher = module.encode_with_offsets(teacher_tokenizer, pieces, 40)
    pairs = module.span_pairs(student["offsets"], teacher["offsets"], student["attention_mask"],
                              teacher["attention_mask"])
    used = pairs[..., 0] >= 0
    assert int(used.sum()) > len(pieces)  # most pieces pair several spans
    for row, span in used.nonzero().tolist():
        s_row, t_row = pairs[row, span].tolist()
        # the predicted tokens follow the paired rows, whose tokens end at the same byte
        assert student["attention_mask"][row, s_row + 1] and teacher["attention_mask"][row, t_row + 1]
        assert int(student["offsets"][row, s_row, 1]) == int(teacher["offsets"][row, t_row, 1])
    assert bool((pairs[~used] == -1).all())


def test_masked_labels_and_paired_rows():
    pytest.importorskip("transformers")
    module = load_example("llm_cross_tokenizer")
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = ids != 0
    assert torch.equal(module.masked_labels(ids, mask), torch.tensor([[6, 7, -100, -100], [9, -100, -100, -100]]))
    student_logits, teacher_logits = torch.randn(2, 4, 3), torch.randn(2, 5, 7)
    pairs = torch.tensor([[[0, 1], [2, 3]], [[1, 0], [-1, -1]]])
    student_rows, teacher_rows = paired_rows(student_logits, teacher_logits, pairs)
    assert torch.equal(student_rows, torch.stack([student_logits[0, 0], student_logits[0, 2], student_logits[1, 1]]))
    assert torch.equal(teacher_rows, torch.stack([teacher_logits[0, 1], teacher_logits[0, 3], teacher_logits[1, 0]]))


def test_plain_uld_equals_the_reference():
    pytest.importorskip("transformers")
    import kdfast

    module = load_example("llm_cross_tokenizer")
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 40, generator=generator), torch.randn(6, 55, generator=generator)
    expected = kdfast.reference.uld_loss(student.double(), teacher.double())
    assert torch.allclose(module.plain_uld(student, teacher).double(), expected, rtol=1e-5, atol=1e-7)


def test_smoke_run(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    module = load_example("llm_cross_tokenizer")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert_smoke_notice(out)
    assert has_row(out, "student alone (CE)") and has_row(out, "student, CE + 1·ULD", whole=False)
    assert has_row(out, "plain PyTorch (two sorts)") and has_row(out, "kdfast uld_loss, exact")
    result = json.load(open(tmp_path / "results.json", encoding="utf-8"))
    assert result["teacher_vocab"] <= 512 and result["student_vocab"] <= 384 and result["span_pairs"] > 0
    row = result["seeds"][0]
    assert all(0 < row[key] < 20 for key in ("alone", "uld"))
