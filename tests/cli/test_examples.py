"""Smoke tests of the worked examples in `examples/` (and of `kdfast demo`'s reproducibility):
each script's `--smoke` configuration runs in-process, must say that its numbers are not
meaningful, print its result table and write `results.json`; two runs with the same seed
print the same numbers whatever the global random state before them; `--help` works and
every option has a help line naming its default at most once; `--method` accepts registry
names; unavailable datasets are skipped cleanly; and the pieces with a checkable contract
(the synthetic review grammar's labels, the causal-LM label shift, token windows, the numpy
MFCCs, WAV reading, the speaker-disjoint split, the Speech Commands folder reader) are
verified."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import wave

import numpy as np
import pytest
import torch

from kdfast import demo

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"kdfast_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def has_row(out: str, label: str, whole: bool = True) -> bool:
    """Whether `out` holds a Markdown table row whose first cell is `label` (or starts with it)."""
    end = r" *\|" if whole else ""
    return re.search(r"^\| " + re.escape(label) + end, out, re.M) is not None


def assert_smoke_notice(out: str) -> None:
    """The smoke notice opens the output and stands beside the result table."""
    notice = load_example("_shared").SMOKE_NOTE
    assert out.startswith(notice) and "not meaningful" in notice
    assert re.search(rf"^{re.escape(notice)}\n\| ", out, re.M)


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["image_digits", "text_sentiment", "speech_digits", "make_spoken_digits",
                                  "llm_distill"])
def test_help(name, capsys):
    if name == "llm_distill":
        pytest.importorskip("transformers")
    module = load_example(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage" in out and ("--smoke" in out or name == "make_spoken_digits")
    if name in ("image_digits", "text_sentiment", "speech_digits"):
        assert "--method" in out and "fitnets" in out


@pytest.mark.parametrize("name", ["image_digits", "text_sentiment", "speech_digits", "make_spoken_digits",
                                  "llm_distill", "demo"])
def test_every_option_has_help_with_its_default_once(name):
    if name == "llm_distill":
        pytest.importorskip("transformers")
    parser = demo.build_parser() if name == "demo" else load_example(name).build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"
        text = formatter._expand_help(action)
        assert text.lower().count("default") <= 1, f"{action.option_strings}: {text!r}"
        if action.default not in (None, False) and not isinstance(action.default, list):
            assert "default" in text.lower(), f"{action.option_strings} does not name its default: {text!r}"


def printed_numbers(out: str) -> str:
    """The output with wall-clock times blanked and the smoke notice's lines kept."""
    return re.sub(r"\d+(\.\d+)? s on", "… s on", out)


@pytest.mark.parametrize("name", ["image_digits", "text_sentiment", "demo"])
def test_same_seed_same_numbers(name, tmp_path, capsys):
    """Two runs with the same seed print identical numbers, although the global generators
    (which a fresh process seeds at random) are in different states before each run."""
    if name == "demo":
        pytest.importorskip("matplotlib")

        def run():
            return demo.main(["--quick", "--epochs", "2", "--out", str(tmp_path)])
    else:
        module = load_example(name)

        def run():
            return module.main(["--smoke", "--out", str(tmp_path)])
    outputs = []
    for state in (1, 2):
        torch.manual_seed(state)
        random.seed(state)
        np.random.seed(state)
        assert run() == 0
        outputs.append(printed_numbers(capsys.readouterr().out))
    assert re.search(r"\d+\.\d\d", outputs[0]) and outputs[0] == outputs[1]
    if name == "demo":  # --quick is the demo's smoke configuration and says so
        assert outputs[0].startswith(demo.QUICK_NOTE) and "not meaningful" in demo.QUICK_NOTE


def test_image_digits_smoke(tmp_path, capsys):
    module = load_example("image_digits")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert_smoke_notice(out)
    assert has_row(out, "teacher (CNN)") and has_row(out, "student alone") and "student distilled" in out
    assert "fold 0" in out  # the cross-validated α/T table
    result = json.load(open(tmp_path / "results.json", encoding="utf-8"))["results"][0]
    assert result["dataset"] == "digits" and len(result["seeds"]) == 1
    assert {result["alpha"], result["temperature"]} <= {0.5, 0.9, 2.0}
    row = result["seeds"][0]
    assert all(0.0 <= row[key] <= 1.0 for key in ("teacher", "student_alone", "distilled"))
    assert row["train_size"] + row["test_size"] == 1797


def test_image_unavailable_dataset_is_skipped(tmp_path, capsys):
    module = load_example("image_digits")
    assert module.main(["--datasets", "mnist", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path)]) == 0
    assert "[mnist] skipped: no MNIST IDX files" in capsys.readouterr().out
    assert json.load(open(tmp_path / "results.json", encoding="utf-8"))["results"] == []


def _write_idx(path, array, compress):
    import gzip

    import numpy

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + numpy.ascontiguousarray(array, dtype=numpy.uint8).tobytes()
    with (gzip.open if compress else open)(str(path) + (".gz" if compress else ""), "wb") as handle:
        handle.write(data)


@pytest.mark.parametrize("layout", ["plain", "torchvision-gz"])
def test_image_reads_mnist_idx_files(tmp_path, layout):
    import numpy

    module = load_example("image_digits")
    rng = numpy.random.default_rng(0)
    directory = tmp_path / "MNIST" / "raw" if layout == "torchvision-gz" else tmp_path
    directory.mkdir(parents=True, exist_ok=True)
    images = {"train": rng.integers(0, 256, (30, 28, 28)), "t10k": rng.integers(0, 256, (12, 28, 28))}
    labels = {"train": rng.integers(0, 10, 30), "t10k": rng.integers(0, 10, 12)}
    for split in ("train", "t10k"):
        _write_idx(directory / f"{split}-images-idx3-ubyte", images[split], layout != "plain")
        _write_idx(directory / f"{split}-labels-idx1-ubyte", labels[split], layout != "plain")
    x_train, y_train, x_test, y_test = module.load_split("mnist", 0, str(tmp_path), 0)
    assert x_train.shape == (30, 1, 28, 28) and x_test.shape == (12, 1, 28, 28) and x_train.dtype == torch.float32
    assert torch.equal(x_train[:, 0], torch.as_tensor(images["train"] / 255.0, dtype=torch.float32))
    assert torch.equal(y_test, torch.as_tensor(labels["t10k"]))
    x_sub, y_sub, _, _ = module.load_split("mnist", 1, str(tmp_path), 10)
    assert x_sub.shape[0] == 10 and y_sub.shape == (10,)
    if layout == "plain":  # the whole script on these files: teacher, student alone, distilled
        out = tmp_path / "out"
        assert module.main(["--datasets", "mnist", "--data-dir", str(tmp_path), "--seeds", "0", "--epochs", "1",
                            "--teacher-epochs", "1", "--out", str(out)]) == 0
        (result,) = json.load(open(out / "results.json", encoding="utf-8"))["results"]
        assert result["dataset"] == "mnist" and result["seeds"][0]["test_size"] == 12


def test_image_reads_cifar10_batches_and_rejects_truncated_idx(tmp_path):
    import pickle

    import numpy

    module = load_example("image_digits")
    rng = numpy.random.default_rng(1)
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (4, 3072)).astype(numpy.uint8),
                         b"labels": rng.integers(0, 10, 4).tolist()}
        with open(directory / name, "wb") as handle:
            pickle.dump(batches[name], handle)
    x_train, y_train, x_test, y_test = module.load_split("cifar10", 0, str(tmp_path), 0)
    assert x_train.shape == (20, 3, 32, 32) and x_test.shape == (4, 3, 32, 32)
    first = torch.as_tensor(batches["data_batch_1"][b"data"][0].reshape(3, 32, 32) / 255.0, dtype=torch.float32)
    assert torch.equal(x_train[0], first)
    assert y_test.tolist() == batches["test_batch"][b"labels"]
    _write_idx(tmp_path / "bad", numpy.zeros((3, 4, 4)), False)
    with open(tmp_path / "bad", "r+b") as handle:
        handle.truncate(20)
    with pytest.raises(module.DatasetUnavailable, match="truncated"):
        module._read_idx(str(tmp_path / "bad"))


def test_text_sentiment_smoke(tmp_path, capsys):
    module = load_example("text_sentiment")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert_smoke_notice(out)
    assert has_row(out, "teacher (BiGRU)") and has_row(out, "student alone (CNN)")
    rows = json.load(open(tmp_path / "results.json", encoding="utf-8"))["results"]
    assert len(rows) == 1 and rows[0]["student_parameters"] < rows[0]["teacher_parameters"]


def test_text_reads_local_sst2_and_imdb_files(tmp_path):
    module = load_example("text_sentiment")
    sst = tmp_path / "SST-2"
    sst.mkdir()
    rows = {"train": [("a fine film", 1), ("dull and slow", 0), ("great fun", 1), ("a mess", 0)],
            "dev": [("lovely", 1), ("awful", 0)]}
    for split, examples in rows.items():
        (sst / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in examples),
                                        encoding="utf-8")
    train_texts, train_labels, test_texts, test_labels = module.load_local_dataset("sst2", str(tmp_path), 3, 10, 0)
    assert len(train_texts) == 3 and set(zip(train_texts, train_labels)) <= set(rows["train"])
    assert sorted(zip(test_texts, test_labels)) == sorted(rows["dev"])
    assert module.load_local_dataset("imdb", str(tmp_path), 3, 3, 0) is None  # absent: fall through
    for split in ("train", "test"):
        for polarity, words in (("pos", "a wonderful<br />film"), ("neg", "a terrible film")):
            folder = tmp_path / "aclImdb" / split / polarity
            folder.mkdir(parents=True)
            (folder / "0_7.txt").write_text(words, encoding="utf-8")
    train_texts, train_labels, _, test_labels = module.load_local_dataset("imdb", str(tmp_path), 10, 10, 0)
    assert sorted(zip(train_texts, train_labels)) == [("a terrible film", 0), ("a wonderful film", 1)]
    assert sorted(test_labels) == [0, 1]
    out = tmp_path / "out"  # the whole script on the SST-2 files
    assert module.main(["--dataset", "sst2", "--data-dir", str(tmp_path), "--seeds", "0", "--epochs", "1",
                        "--teacher-epochs", "1", "--out", str(out)]) == 0
    assert json.load(open(out / "results.json", encoding="utf-8"))["results"]


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
    assert_smoke_notice(out)
    assert has_row(out, "student, dense KD", whole=False) and has_row(out, "student, top-8 KD from the store")
    assert has_row(out, "kdfast kd_loss, dense") and has_row(out, "eager PyTorch, dense")
    assert "{'" not in out  # tables, not raw dicts
    (milliseconds,) = re.findall(r"^\| kdfast kd_loss, dense +\| +(\S+) +\|", out, re.M)
    assert len(milliseconds.replace(".", "").lstrip("0")) <= 3  # three significant digits
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


# --------------------------------------------------------------------------------------
# --method: the kdfast.methods registry in the examples
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, method", [("image_digits", "dkd"), ("image_digits", "fitnets"),
                                          ("text_sentiment", "jsd"), ("text_sentiment", "similarity"),
                                          ("speech_digits", "attention"), ("speech_digits", "rkd")])
def test_examples_accept_a_method(name, method, tmp_path, capsys):
    module = load_example(name)
    assert module.main(["--smoke", "--method", method, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"student distilled ({method}, " in out
    saved = json.load(open(tmp_path / "results.json", encoding="utf-8"))
    rows = saved["results"][0]["seeds"] if name == "image_digits" else saved["results"]
    assert all(0.0 <= row["distilled"] <= 1.0 for row in rows)


@pytest.mark.parametrize("name", ["image_digits", "text_sentiment"])
def test_attention_is_refused_without_feature_maps(name, tmp_path):
    module = load_example(name)
    with pytest.raises(SystemExit, match="needs .*feature maps in both networks"):
        module.main(["--smoke", "--method", "attention", "--out", str(tmp_path)])


def test_unknown_method_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example("speech_digits").main(["--method", "hinton"])
    assert exit_info.value.code == 2 and "invalid choice: 'hinton'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Speech
# --------------------------------------------------------------------------------------


def test_speech_digits_smoke(tmp_path, capsys):
    module = load_example("speech_digits")
    assert module.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert_smoke_notice(out)
    assert has_row(out, "teacher (CNN)") and has_row(out, "student alone (small CNN)")
    assert "student distilled (kd" in out
    saved = json.load(open(tmp_path / "results.json", encoding="utf-8"))
    row = saved["results"][0]
    assert row["student_parameters"] * 10 < row["teacher_parameters"]
    assert row["train_speakers"] == 16 and row["test_speakers"] == 32 and row["test_size"] == 640
    assert all(0.0 <= row[key] <= 1.0 for key in ("teacher", "student_alone", "distilled"))


def test_shipped_feature_file_matches_its_description():
    module = load_example("speech_digits")
    assert os.path.getsize(module.DEFAULT_DATA) < 2_100_000
    data = np.load(module.DEFAULT_DATA)
    config = json.loads(str(data["mfcc_config"]))
    assert config == module.MFCC_CONFIG
    assert data["features"].dtype == np.float16 and data["features"].shape == (2560, 13, 40)
    assert np.bincount(data["labels"]).tolist() == [256] * 10
    assert len(data["speakers"]) == 128 and np.bincount(data["speaker"]).tolist() == [20] * 128
    assert np.isfinite(data["features"].astype(np.float32)).all()


def test_speaker_split_is_disjoint_and_covers_every_variant():
    module = load_example("speech_digits")
    data = module.load_npz(module.DEFAULT_DATA)
    train, test = module.speaker_split(data, seed=1, test_fraction=0.25, train_speakers=32)
    train_speakers, test_speakers = set(data["speaker"][train]), set(data["speaker"][test])
    assert not train_speakers & test_speakers and len(train_speakers) == 32 and len(test_speakers) == 32
    for speakers in (train_speakers, test_speakers):
        assert {data["variants"][s] for s in speakers} == set(data["variants"])  # 16 variants, 2 speakers each
    again = module.speaker_split(data, seed=1, test_fraction=0.25, train_speakers=32)
    assert np.array_equal(again[0], train) and not np.array_equal(module.speaker_split(data, 2, 0.25, 32)[1], test)


def write_wav(path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def test_wav_reading_and_mfcc_properties(tmp_path):
    module = load_example("speech_digits")
    rate = 16000
    time = np.arange(int(0.5 * rate)) / rate
    # a tone over broadband noise, so that every mel band holds energy far above the log floor
    tone = 0.5 * np.sin(2 * math.pi * 440 * time) + 0.05 * np.random.default_rng(0).standard_normal(len(time))
    write_wav(tmp_path / "tone.wav", tone, rate)
    samples, read_rate = module.read_wav(str(tmp_path / "tone.wav"))
    assert read_rate == rate and np.abs(samples - tone).max() < 1e-4

    dct = module.dct_matrix(26, 26)
    np.testing.assert_allclose(dct @ dct.T, np.eye(26), atol=1e-12)
    bank = module.mel_filterbank(26, 512, rate, 20.0, 8000.0)
    assert bank.shape == (26, 257) and bank.min() >= 0 and bank.max() <= 1
    peaks = bank.argmax(axis=1) * rate / 512
    assert np.all(np.diff(peaks) > 0)  # centres rise with the filter index

    features = module.mfcc(samples, rate)
    assert features.shape == (13, 40) and features.dtype == np.float32
    louder = module.mfcc(samples * 4, rate)
    # A gain changes only c0 (the log-energy average): log(16) · sqrt(26) under the orthonormal DCT.
    centre = slice(10, 30)
    np.testing.assert_allclose(louder[0, centre] - features[0, centre], math.log(16) * math.sqrt(26), rtol=1e-3)
    np.testing.assert_allclose(louder[1:, centre], features[1:, centre], atol=1e-3)
    higher = module.mfcc(0.5 * np.sin(2 * math.pi * 2000 * time), rate)
    assert np.abs(higher[1:, centre] - features[1:, centre]).mean() > 1.0  # the spectral shape is seen
    # Leading silence does not move the word out of the window.
    shifted = module.mfcc(np.concatenate([np.zeros(rate // 10), samples]), rate)
    assert shifted.shape == (13, 40)


def make_fake_speech_commands(root, speakers: int = 4, takes: int = 2) -> None:
    """Digit d is a 0.4 s chirp around 300·(d+1) Hz; speakers differ by pitch and noise."""
    rng = np.random.default_rng(0)
    rate = 16000
    time = np.arange(int(0.4 * rate)) / rate
    for digit, word in enumerate(load_example("speech_digits").DIGITS):
        os.makedirs(root / word)
        for speaker in range(speakers):
            for take in range(takes):
                frequency = 300 * (digit + 1) * (1 + 0.03 * speaker)
                samples = 0.4 * np.sin(2 * math.pi * frequency * time * (1 + 0.2 * time))
                samples += 0.01 * rng.standard_normal(len(time))
                write_wav(root / word / f"spk{speaker:02d}ab_nohash_{take}.wav", samples, rate)


def test_speech_commands_folder_is_read_and_trained(tmp_path, capsys):
    module = load_example("speech_digits")
    root = tmp_path / "speech_commands"
    make_fake_speech_commands(root)
    data = module.load_speech_commands(str(root))
    assert data["features"].shape == (80, 13, 40) and np.bincount(data["labels"]).tolist() == [8] * 10
    assert list(data["speakers"]) == ["spk00ab", "spk01ab", "spk02ab", "spk03ab"]
    assert module.load_speech_commands(str(root), max_per_digit=3)["features"].shape[0] == 30
    out_dir = tmp_path / "out"
    assert module.main(["--smoke", "--speech-commands", str(root), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "| speech commands (train 60 clips / 3 speakers, test 20 / 1)" in out
    assert json.load(open(out_dir / "results.json", encoding="utf-8"))["arguments"]["speech_commands"] == str(root)


def test_missing_speech_data_is_skipped(tmp_path, capsys):
    module = load_example("speech_digits")
    assert module.main(["--speech-commands", str(tmp_path / "absent"), "--out", str(tmp_path)]) == 0
    assert "[speech] skipped: no wav files under" in capsys.readouterr().out
    assert module.main(["--data", str(tmp_path / "absent.npz"), "--out", str(tmp_path)]) == 0
    assert "[speech] skipped: no feature file" in capsys.readouterr().out
