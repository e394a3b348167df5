"""Every user error of `kdfast compress` is one line `kdfast compress: error: ...` and exit status 2.

Each case breaks one thing (data path, data content, dtype, teacher, device, output path,
an option out of range) and checks the exit status, that stderr is exactly one line
naming the problem, that no traceback is printed and that no store was written. A
subprocess run checks what a user sees end to end on a good run: no leaked warning (the
read-only memory map of a .npy file) and a progress bar whose shard counter ends at the
number of shards written.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdfast.store import SoftLabelStore


def write_data(directory, kind):
    """A broken --data file of the given kind; returns its path."""
    if kind == "float_pt":
        path = directory / "float.pt"
        torch.save(torch.rand(100) * 200, path)
    elif kind == "whole_float_pt":
        path = directory / "whole.pt"
        torch.save(torch.arange(100, dtype=torch.float32), path)
    elif kind == "float_npy":
        path = directory / "float.npy"
        np.save(path, np.arange(100, dtype=np.float64))
    elif kind == "bool_pt":
        path = directory / "bool.pt"
        torch.save(torch.ones(100, dtype=torch.bool), path)
    elif kind == "text_as_npy":
        path = directory / "notes.npy"
        path.write_text("not an array\n")
    elif kind == "text_as_pt":
        path = directory / "notes.pt"
        path.write_text("not a tensor\n")
    elif kind == "negative":
        path = directory / "negative.npy"
        np.save(path, np.array([3, -1, 4], dtype=np.int32))
    elif kind == "too_large":
        path = directory / "large.npy"
        np.save(path, np.array([3, 256, 4], dtype=np.int32))
    elif kind == "empty":
        path = directory / "empty.npy"
        np.save(path, np.zeros(0, dtype=np.int32))
    elif kind == "missing":
        path = directory / "missing.npy"
    elif kind == "directory":
        path = directory / "folder.npy"
        path.mkdir()
    else:
        raise AssertionError(kind)
    return str(path)


def assert_one_line_error(code, err, fragment):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kdfast compress: error: "), err
    assert fragment in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind, fragment", [
    ("missing", "does not exist"),
    ("directory", "is a directory"),
    ("float_pt", "must have an integer dtype, got torch.float32; convert them"),
    ("whole_float_pt", "must have an integer dtype, got torch.float32; convert them"),
    ("float_npy", "must have an integer dtype, got float64"),
    ("bool_pt", "must have an integer dtype, got torch.bool"),
    ("text_as_npy", "is not a readable .npy array"),
    ("text_as_pt", "is not a readable .pt file"),
    ("negative", "token ids must be >= 0, found -1"),
    ("too_large", "token id 256 is outside the teacher's vocabulary of 256"),
    ("empty", "holds no tokens"),
])
def test_bad_data_is_one_line(tmp_path, run_kdfast, compress_args, kind, fragment):
    data = write_data(tmp_path, kind)
    code, _, err = run_kdfast(compress_args(tmp_path / "store", data=data))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("function, fragment", [
    ("wrong_shape", "returned logits of shape (1, 0, 256) for token ids of shape (1, 1)"),
    ("integer_logits", "must return a floating-point logits tensor"),
    ("nan_logits", "contain NaN"),
    ("raises", "KeyError: 'missing key' ("),
    ("absent", "has no function 'absent'; functions defined there: integer_logits, nan_logits, raises, teacher"),
])
def test_bad_teacher_function_is_one_line(toy, tmp_path, run_kdfast, compress_args, function, fragment):
    code, _, err = run_kdfast(compress_args(tmp_path / "store", teacher=f"{toy.teacher}:{function}"))
    assert_one_line_error(code, err, fragment)
    if function == "raises":
        assert f"{toy.teacher}:" in err  # the line of the teacher's file that failed
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("source, fragment", [
    ("def teacher(ids:\n", "failed to load: SyntaxError"),
    ("import module_that_does_not_exist_anywhere\n", "ModuleNotFoundError: No module named"),
    ("raise RuntimeError('no weights here')\n", "RuntimeError: no weights here"),
])
def test_teacher_file_that_fails_to_import_is_one_line(tmp_path, run_kdfast, compress_args, source, fragment):
    (tmp_path / "broken.py").write_text(source)
    code, _, err = run_kdfast(compress_args(tmp_path / "store", teacher=str(tmp_path / "broken.py")))
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("teacher, fragment", [
    ("no_such_teacher_module:teacher", "teacher module 'no_such_teacher_module' not found: tried"),
    ("./missing/teacher.py", "teacher file ./missing/teacher.py not found"),
    ("./missing_model_directory", "no such model directory"),
])
def test_teacher_that_cannot_be_found_is_one_line(tmp_path, run_kdfast, compress_args, teacher, fragment):
    code, _, err = run_kdfast(compress_args(tmp_path / "store", teacher=teacher))
    assert_one_line_error(code, err, fragment)


def test_a_data_file_as_teacher_is_one_line(toy, tmp_path, run_kdfast, compress_args):
    code, _, err = run_kdfast(compress_args(tmp_path / "store", teacher=toy.data))
    assert_one_line_error(code, err, "is a file; expected a Python file")


@pytest.mark.parametrize("device, fragment", [
    ("gpu", "unknown device 'gpu'"),
    ("meta", "a teacher cannot run on device 'meta'"),
    ("cuda:7", "device 'cuda:7'"),
])
def test_unusable_device_is_one_line(tmp_path, run_kdfast, compress_args, device, fragment):
    if device == "cuda:7" and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, _, err = run_kdfast(compress_args(tmp_path / "store", "--device", device))
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("extra, fragment", [
    (["--k", "0"], "--k must be >= 1, got 0"),
    (["--k", "300"], "--k 300 exceeds the teacher's vocabulary size 256"),
    (["--temperature", "0"], "--temperature must be finite and in [1e-20, 1e+20]"),
    (["--temperature", "-1"], "--temperature must be finite and in [1e-20, 1e+20]"),
    (["--temperature", "nan"], "--temperature must be finite and in [1e-20, 1e+20]"),
    (["--temperature", "inf"], "--temperature must be finite and in [1e-20, 1e+20]"),
    (["--seq-len", "0"], "--seq-len must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--shard-tokens", "0"], "--shard-tokens must be >= 1"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--k", "many"], "argument --k: invalid int value: 'many'"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--data-format", "csv"], "argument --data-format: invalid choice: 'csv'"),
    (["--resume", "--overwrite"], "not allowed with argument"),
    (["--data-format", "text"], "needs --tokenizer"),
])
def test_invalid_option_is_one_line(tmp_path, run_kdfast, compress_args, extra, fragment):
    code, _, err = run_kdfast(compress_args(tmp_path / "store", *extra))
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "store").exists()


def test_missing_out_is_one_line(toy, run_kdfast):
    code, _, err = run_kdfast(["compress", "--teacher", toy.teacher, "--data", toy.data])
    assert_one_line_error(code, err, "required: --out")


def test_unwritable_out_is_one_line(toy, tmp_path, run_kdfast, compress_args):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run_kdfast(compress_args(blocker / "store"))
    assert_one_line_error(code, err, "is a file, not a directory")
    code, _, err = run_kdfast(compress_args(blocker))
    assert_one_line_error(code, err, "exists and is not a directory")


def test_existing_store_without_resume_is_one_line(tmp_path, run_kdfast, compress_args):
    assert run_kdfast(compress_args(tmp_path / "store", "--max-tokens", "100"))[0] == 0
    code, _, err = run_kdfast(compress_args(tmp_path / "store", "--max-tokens", "100"))
    assert_one_line_error(code, err, "store")
    assert len(SoftLabelStore(tmp_path / "store")) == 100  # untouched


def test_a_good_run_leaks_no_warning_and_counts_its_shards(toy, tmp_path):
    """Subprocess: warnings as errors; the .npy is int64, so the tokens are a read-only memory map."""
    out = tmp_path / "store"
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "kdfast.compress_cli", "--teacher", toy.teacher, "--data", toy.data,
         "--out", str(out), "--k", "128", "--seq-len", "64", "--batch-size", "4", "--shard-tokens", "600",
         "--no-fsync"], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr
    store = SoftLabelStore(out)
    assert store.num_shards == 4 and len(store) == 2000  # 600 + 600 + 600 + 200
    final_bar = [part for part in result.stderr.replace("\r", "\n").splitlines() if "100%" in part][-1]
    assert final_bar.rstrip().endswith("shards=4]"), final_bar
