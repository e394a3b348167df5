"""Smoke tests of the worked examples in `examples/`: each script's `--smoke` configuration
runs in-process and must print its result table and write `results.json`; `--help` works;
unavailable datasets are skipped cleanly; and the pieces with a checkable contract (the
synthetic review grammar's labels, the causal-LM label shift, token windows) are verified."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"kdfast_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["image_digits", "text_sentiment", "llm_distill"])
def test_help(name, capsys):
    if name == "llm_distill":
        pytest.importorskip("transformers")
    module = load_example(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--smoke" in out and "usage" in out


def test_image_digits_smoke(tmp_path, capsys):
    module = load_example("image_digits")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| teacher (CNN) |" in out and "| student alone |" in out and "student distilled" in out
    assert "fold 0" in out  # the cross-validated α/T table
    result = json.load(open(tmp_path / "results.json", encoding="utf-8"))["results"][0]
    assert result["dataset"] == "digits" and len(result["seeds"]) == 1
    assert {result["alpha"], result["temperature"]} <= {0.5, 0.9, 2.0}
    row = result["seeds"][0]
    assert all(0.0 <= row[key] <= 1.0 for key in ("teacher", "student_alone", "distilled"))
    assert row["train_size"] + row["test_size"] == 1797


def test_image_unavailable_dataset_is_skipped(tmp_path, capsys, monkeypatch):
    module = load_example("image_digits")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    assert module.main(["--datasets", "mnist", "--out", str(tmp_path)]) == 0
    assert "[mnist] skipped: torchvision is not installed" in capsys.readouterr().out
    assert json.load(open(tmp_path / "results.json", encoding="utf-8"))["results"] == []


def test_text_sentiment_smoke(tmp_path, capsys):
    module = load_example("text_sentiment")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| teacher (BiGRU) |" in out and "| student alone (CNN) |" in out
    rows = json.load(open(tmp_path / "results.json", encoding="utf-8"))["results"]
    assert len(rows) == 1 and rows[0]["student_parameters"] < rows[0]["teacher_parameters"]


def _rule_label(text: str, module) -> int:
    """Re-derive a review's label from its words, independently of the grammar code."""
    positive, negative = set(module.POSITIVE), set(module.NEGATIVE)

    def clause_polarity(clause: str) -> int:
        words = clause.split()
        adjective = words[-1]
        assert adjective in positive or adjective in negative, clause
        negated = any(word in module.NEGATIONS for word in words)
        return int(adjective in positive) ^ int(negated)

    if " but " in text:
        return clause_polarity(text.split(" but ")[1])
    if " although " in text:
        return clause_polarity(text.split(" although ")[0])
    if " and " in text:
        first, second = text.split(" and ")
        assert clause_polarity(first) == clause_polarity(second)
        return clause_polarity(first)
    return clause_polarity(text)


def test_synthetic_reviews_follow_their_rules():
    module = load_example("text_sentiment")
    texts, labels = module.synthetic_reviews(500, seed=3)
    assert (texts, labels) == module.synthetic_reviews(500, seed=3)
    assert texts != module.synthetic_reviews(500, seed=4)[0]
    assert all(_rule_label(text, module) == label for text, label in zip(texts, labels))
    assert 0.4 < sum(labels) / len(labels) < 0.6
    assert sum(" but " in text for text in texts) > 100 and sum(" not " in text for text in texts) > 50


def test_text_encoding_pads_and_marks_unknown_words():
    module = load_example("text_sentiment")
    vocabulary = module.build_vocabulary(["the plot was good", "the plot was bad"])
    assert min(vocabulary.values()) == 2 and vocabulary["the"] < vocabulary["good"]
    ids = module.encode(["the plot was great", "the"], vocabulary, max_length=5)
    assert ids.shape == (2, 5) and ids.dtype == torch.int64
    assert ids[0, 3] == 1 and ids[0, 4] == 0 and torch.all(ids[1, 1:] == 0)


def test_llm_distill_smoke(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    module = load_example("llm_distill")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| student, dense KD" in out and "| student, top-8 KD from the store" in out
    assert "| kdfast kd_loss, dense |" in out and "| eager PyTorch, dense |" in out
    result = json.load(open(tmp_path / "results.json", encoding="utf-8"))
    assert result["vocab_size"] <= 512 and result["store_bytes"] > 0
    row = result["seeds"][0]
    assert all(0 < row[key] < 20 for key in ("alone", "dense", "topk"))


def test_llm_label_shift_and_windows():
    pytest.importorskip("transformers")
    module = load_example("llm_distill")
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert torch.equal(module.next_token_labels(ids), torch.tensor([[6, 7, -100], [9, 10, -100]]))

    class FakeEncoding:
        def __init__(self, ids):
            self.ids = ids

    class FakeTokenizer:
        def encode_batch(self, texts):
            return [FakeEncoding(list(range(len(text)))) for text in texts]

    windows = module.token_windows(FakeTokenizer(), ["abcde", "xyz"], 3)
    assert windows.tolist() == [[0, 1, 2], [3, 4, 0], ]
    with pytest.raises(RuntimeError, match="fewer than one window"):
        module.token_windows(FakeTokenizer(), ["ab"], 3)
