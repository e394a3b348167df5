"""End-to-end tests of `kdfast compress` (kdfast.compress_cli).

Two teachers, neither downloaded: a seeded toy function (`file.py:teacher`, a causal
running mean of random embeddings projected to V = 256) that can be slowed down through an
environment variable, and a tiny randomly initialised GPT-2 saved with `save_pretrained`
(with a word-level tokenizer built in the test). The stored soft labels are compared with
the teacher run on each window directly. The interruption tests run the CLI in a
subprocess, SIGKILL or SIGINT it mid-run, check the store left behind, resume it, and
compare with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from kdfast import reference
from kdfast.compress_cli import batch_plan, main
from kdfast.store import SoftLabelStore

TOY_VOCAB = 256
TOY_TEACHER = textwrap.dedent(
    f"""
    import os, time, torch

    VOCAB = {TOY_VOCAB}
    _generator = torch.Generator().manual_seed(0)
    _embedding = torch.randn(VOCAB, 16, generator=_generator)
    _projection = torch.randn(16, VOCAB, generator=_generator) * 2.0

    def teacher(token_ids):
        time.sleep(float(os.environ.get("TOY_TEACHER_DELAY", "0")))
        positions = torch.arange(1, token_ids.shape[1] + 1, device=token_ids.device).view(1, -1, 1)
        hidden = _embedding.to(token_ids.device)[token_ids].cumsum(1) / positions
        return hidden @ _projection.to(token_ids.device)
    """
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These tensors are tiny: one thread avoids oversubscribing a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(teacher spec, token file, token ids) for the toy function teacher."""
    directory = tmp_path_factory.mktemp("toy")
    (directory / "toy_teacher.py").write_text(TOY_TEACHER)
    tokens = np.random.default_rng(0).integers(0, TOY_VOCAB, size=2000).astype(np.int32)
    np.save(directory / "tokens.npy", tokens)
    return f"{directory / 'toy_teacher.py'}:teacher", str(directory / "tokens.npy"), tokens


@pytest.fixture(scope="module")
def uninterrupted_toy_store(toy, tmp_path_factory):
    """Directory of one uninterrupted run over the whole toy stream (the interruption tests' baseline)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(toy_arguments(toy, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def toy_arguments(toy, out, *extra):
    spec, data, _ = toy
    return ["--teacher", spec, "--data", data, "--out", str(out), "--k", "8", "--seq-len", "32",
            "--batch-size", "2", "--shard-tokens", "100", "--quiet", "--no-fsync", *extra]


def stored_arrays(directory):
    store = SoftLabelStore(directory)
    store.verify()
    labels = store[:]
    return store, labels, store.token_ids()


def assert_identical_stores(first, second):
    store_a, labels_a, ids_a = stored_arrays(first)
    store_b, labels_b, ids_b = stored_arrays(second)
    assert len(store_a) == len(store_b)
    assert torch.equal(labels_a.indices, labels_b.indices)
    assert torch.equal(labels_a.logprobs, labels_b.logprobs)
    assert torch.equal(labels_a.tail_logprob, labels_b.tail_logprob)
    assert torch.equal(ids_a, ids_b)


def expected_per_window(teacher, tokens, seq_len, k, temperature):
    """Reference soft labels, running the teacher on one window at a time."""
    parts = []
    for start in range(0, len(tokens), seq_len):
        window = torch.as_tensor(np.asarray(tokens[start : start + seq_len], dtype=np.int64)).view(1, -1)
        with torch.no_grad():
            logits = teacher(window)
        parts.append(reference.compress_topk(logits.double(), k, temperature=temperature).flatten())
    return parts[0].cat(parts)


def assert_close_to_reference(stored, expected, logprob_rtol):
    """Same indices; logprobs within the storage dtype's rounding; the float32 tail within 1e-4."""
    assert torch.equal(stored.indices.to(torch.int64), expected.indices.to(torch.int64))
    torch.testing.assert_close(stored.logprobs.double(), expected.logprobs, atol=1e-5, rtol=logprob_rtol)
    torch.testing.assert_close(stored.tail_logprob.double(), expected.tail_logprob, atol=1e-5, rtol=1e-4)


def run_cli_subprocess(arguments, log_path, delay):
    environment = dict(os.environ, TOY_TEACHER_DELAY=str(delay), OMP_NUM_THREADS="1")
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "kdfast.compress_cli", *arguments], stderr=log, stdout=log,
                            env=environment), log


def wait_for_shards(process, out, count, timeout=60.0):
    manifest_path = os.path.join(out, "manifest.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.exists(manifest_path):
            with open(manifest_path) as handle:
                if len(json.load(handle)["shards"]) >= count:
                    return
        time.sleep(0.005)
    raise AssertionError(f"the compress run ended or stalled before writing {count} shards (rc={process.poll()})")


# --------------------------------------------------------------------------- function teacher
def test_batch_plan_covers_the_stream_in_fixed_windows():
    plan = list(batch_plan(num_tokens=230, seq_len=32, batch_size=3))
    assert plan == [(0, 96, 3), (96, 192, 3), (192, 224, 1), (224, 230, 1)]
    assert list(batch_plan(64, 32, 8)) == [(0, 64, 2)]


def test_function_teacher_store_matches_the_teacher_window_by_window(toy, tmp_path):
    spec, data, tokens = toy
    out = tmp_path / "out"
    tokens = tokens[:1000]
    assert main(toy_arguments(toy, out, "--max-tokens", "1000", "--dtype", "float32", "--temperature", "1.5")) == 0
    store, labels, token_ids = stored_arrays(out)
    assert store.complete and len(store) == 1000 and store.num_shards == 10
    assert (store.vocab_size, store.k, store.temperature) == (TOY_VOCAB, 8, 1.5)
    assert store.dtypes == {"indices": "uint16", "logprobs": "float32", "tail_logprob": "float32",
                            "token_ids": "uint16"}
    assert store.bytes_per_token == {"soft_labels": 8 * (2 + 4) + 4, "token_ids": 2, "total": 54}
    assert store.manifest["teacher"] == spec
    assert store.manifest["source"]["num_tokens"] == 1000 and store.manifest["source"]["seq_len"] == 32
    assert torch.equal(token_ids, torch.as_tensor(tokens, dtype=torch.int64))

    sys.path.insert(0, os.path.dirname(spec.split(":")[0]))
    try:
        from toy_teacher import teacher
    finally:
        sys.path.pop(0)
    expected = expected_per_window(teacher, tokens, seq_len=32, k=8, temperature=1.5)
    assert_close_to_reference(labels, expected, logprob_rtol=1e-5)  # float32 storage


def test_resume_and_rerun_checks(toy, tmp_path):
    out = tmp_path / "out"
    assert main(toy_arguments(toy, out, "--max-tokens", "300")) == 0
    assert main(toy_arguments(toy, out, "--max-tokens", "300")) == 2  # exists, no --resume
    assert main(toy_arguments(toy, out, "--max-tokens", "300", "--resume")) == 0  # already complete
    for changed in (["--k", "4"], ["--temperature", "2"], ["--seq-len", "16"], ["--dtype", "bfloat16"]):
        arguments = toy_arguments(toy, out, "--max-tokens", "300", "--resume")
        arguments += changed  # argparse keeps the last value
        assert main(arguments) == 2
    assert main(toy_arguments(toy, out, "--max-tokens", "300", "--overwrite", "--k", "4")) == 0
    assert SoftLabelStore(out).k == 4


def test_resume_mismatch_message_names_the_parameter(toy, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(toy_arguments(toy, out, "--max-tokens", "100")) == 0
    capsys.readouterr()
    assert main(toy_arguments(toy, out, "--max-tokens", "100", "--resume", "--k", "5")) == 2
    assert "k: stored 8, requested 5" in capsys.readouterr().err
    assert main(toy_arguments(toy, out, "--max-tokens", "120", "--resume")) == 2
    assert "source: stored" in capsys.readouterr().err  # a different token stream


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--k", "0"], "--k must be >= 1"),
        (["--k", "300"], "exceeds the teacher's vocabulary size 256"),
        (["--temperature", "0"], "--temperature must be finite and in [1e-20, 1e+20]"),
        (["--data-format", "text"], "needs --tokenizer"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(toy, tmp_path, capsys, extra, message):
    assert main(toy_arguments(toy, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- interruptions
def test_killed_run_leaves_a_consistent_store_and_resume_equals_an_uninterrupted_run(toy, uninterrupted_toy_store,
                                                                                     tmp_path):
    out, log_path = tmp_path / "killed", tmp_path / "killed.log"
    process, log = run_cli_subprocess(toy_arguments(toy, out), log_path, delay=0.03)
    try:
        wait_for_shards(process, str(out), 3)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
        log.close()
    assert process.returncode == -signal.SIGKILL, log_path.read_text()

    reference_out = uninterrupted_toy_store
    survivor, survivor_labels, survivor_ids = stored_arrays(out)
    assert not survivor.complete
    assert 300 <= len(survivor) < 2000 and len(survivor) % 100 == 0  # whole shards only
    _, full_labels, full_ids = stored_arrays(reference_out)
    rows = len(survivor)
    assert torch.equal(survivor_labels.indices, full_labels.indices[:rows])
    assert torch.equal(survivor_labels.logprobs, full_labels.logprobs[:rows])
    assert torch.equal(survivor_ids, full_ids[:rows])

    # 100-token shards end inside 64-token batches: resume recomputes that batch, keeps its tail
    assert main(toy_arguments(toy, out, "--resume")) == 0
    assert SoftLabelStore(out).complete
    assert SoftLabelStore(out).shard_ranges() == SoftLabelStore(reference_out).shard_ranges()
    assert_identical_stores(out, reference_out)


def test_ctrl_c_commits_the_current_batch_then_resume_completes(toy, uninterrupted_toy_store, tmp_path):
    out, log_path = tmp_path / "interrupted", tmp_path / "interrupted.log"
    arguments = [argument for argument in toy_arguments(toy, out) if argument != "--quiet"]
    process, log = run_cli_subprocess(arguments, log_path, delay=0.03)
    try:
        wait_for_shards(process, str(out), 1)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    output = log_path.read_text()
    assert process.returncode == 130, output
    assert "stopping after the current batch" in output and "rerun with --resume" in output
    interrupted = SoftLabelStore(out)
    interrupted.verify()
    assert not interrupted.complete
    assert len(interrupted) % 64 == 0  # everything computed, up to a batch end, was committed
    assert main(toy_arguments(toy, out, "--resume")) == 0
    assert_identical_stores(out, uninterrupted_toy_store)


# --------------------------------------------------------------------------- Hugging Face teacher
@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 (V = 320) and a word-level tokenizer, saved locally."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    directory = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    words = ["[UNK]", "<eos>"] + [f"w{number}" for number in range(100)]
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({word: i for i, word in enumerate(words)},
                                                                  unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", eos_token="<eos>")
    tokenizer.save_pretrained(directory)
    return str(directory), model


def test_hugging_face_teacher_from_token_ids(tiny_gpt2, tmp_path):
    model_directory, model = tiny_gpt2
    tokens = np.random.default_rng(1).integers(0, 320, size=(5, 100))  # 2-D input is flattened
    torch.save(torch.as_tensor(tokens), tmp_path / "tokens.pt")
    out = tmp_path / "out"
    arguments = ["--teacher", model_directory, "--data", str(tmp_path / "tokens.pt"), "--out", str(out),
                 "--k", "16", "--seq-len", "64", "--batch-size", "3", "--shard-tokens", "128", "--quiet"]
    assert main(arguments) == 0
    store, labels, token_ids = stored_arrays(out)
    assert store.complete and len(store) == 500 and store.vocab_size == 320
    assert store.manifest["teacher"] == os.path.abspath(model_directory)
    assert store.bytes_per_token["soft_labels"] == 16 * 4 + 4 <= 6 * 16 + 4
    assert torch.equal(token_ids, torch.as_tensor(tokens.reshape(-1)))
    labels.validate()
    expected = expected_per_window(lambda ids: model(input_ids=ids).logits, tokens.reshape(-1), 64, 16, 1.0)
    assert_close_to_reference(labels, expected, logprob_rtol=1e-3)  # float16 storage


def test_hugging_face_teacher_from_text_with_its_tokenizer(tiny_gpt2, tmp_path):
    model_directory, model = tiny_gpt2
    lines = [" ".join(f"w{(7 * line + 3 * word) % 100}" for word in range(5 + line % 7)) for line in range(30)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines[:15]) + "\n\n" + "\n".join(lines[15:]) + "\n")
    out = tmp_path / "out"
    arguments = ["--teacher", model_directory, "--data", str(tmp_path / "corpus.txt"), "--out", str(out),
                 "--k", "4", "--seq-len", "48", "--batch-size", "2", "--shard-tokens", "64", "--quiet", "--no-fsync",
                 "--temperature", "2.0"]
    assert main(arguments) == 0
    store, labels, token_ids = stored_arrays(out)
    eos_id, first_word_id = 1, 2  # vocabulary: [UNK], <eos>, w0, w1, ...
    expected_ids = []
    for line in lines:  # the blank line is skipped; every line ends with <eos>
        expected_ids += [first_word_id + int(word[1:]) for word in line.split()] + [eos_id]
    assert token_ids.tolist() == expected_ids
    assert store.manifest["tokenizer"] == os.path.abspath(model_directory)
    assert store.manifest["source"]["format"] == "text" and store.manifest["source"]["append_eos"] is True
    expected = expected_per_window(lambda ids: model(input_ids=ids).logits, np.asarray(expected_ids), 48, 4, 2.0)
    assert_close_to_reference(labels, expected, logprob_rtol=1e-3)


def test_kdfast_console_command_runs_compress(toy, tmp_path):
    """`kdfast compress ...` (kdfast.cli) writes the same store as `python -m kdfast.compress_cli ...`."""
    from kdfast import cli

    direct, through_cli = tmp_path / "direct", tmp_path / "cli"
    assert main(toy_arguments(toy, direct, "--max-tokens", "200")) == 0
    assert cli.main(["compress", *toy_arguments(toy, through_cli, "--max-tokens", "200")]) == 0
    _, labels_direct, ids_direct = stored_arrays(direct)
    _, labels_cli, ids_cli = stored_arrays(through_cli)
    assert torch.equal(labels_direct.indices, labels_cli.indices)
    assert torch.equal(labels_direct.logprobs, labels_cli.logprobs)
    assert torch.equal(ids_direct, ids_cli)
