"""Fixtures of the command-line tests: a toy teacher file, token files, and an in-process `kdfast` runner.

`toy` is a directory holding `toy_teacher.py` (a seeded function teacher over V = 256,
plus deliberately broken variants: wrong shape, integer logits, NaN logits, one that
raises) and `tokens.npy` (2000 int64 ids, memory-mapped read-only when loaded).
`run_kdfast(argv)` runs `kdfast.cli.main` and returns (exit code, stdout, stderr),
turning argparse's SystemExit into its code; `compress_args(out, ...)` builds a small
`kdfast compress` command over the toy teacher.
"""

from __future__ import annotations

import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdfast import cli

TOY_VOCAB = 256
TOY_TEACHER = textwrap.dedent(
    f"""
    import torch

    VOCAB = {TOY_VOCAB}
    _generator = torch.Generator().manual_seed(0)
    _embedding = torch.randn(VOCAB, 16, generator=_generator)
    _projection = torch.randn(16, VOCAB, generator=_generator) * 2.0

    def teacher(token_ids):
        positions = torch.arange(1, token_ids.shape[1] + 1).view(1, -1, 1)
        return (_embedding[token_ids].cumsum(1) / positions) @ _projection

    def wrong_shape(token_ids):
        return teacher(token_ids)[:, :-1]

    def integer_logits(token_ids):
        return teacher(token_ids).long()

    def nan_logits(token_ids):
        return teacher(token_ids) * float("nan")

    def raises(token_ids):
        return {{}}["missing key"]
    """
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tensors here are tiny: one thread avoids oversubscribing a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """SimpleNamespace(directory, teacher (path to toy_teacher.py), data (tokens.npy), tokens)."""
    directory = tmp_path_factory.mktemp("toy")
    (directory / "toy_teacher.py").write_text(TOY_TEACHER)
    tokens = np.random.default_rng(0).integers(0, TOY_VOCAB, size=2000).astype(np.int64)
    np.save(directory / "tokens.npy", tokens)
    return SimpleNamespace(directory=directory, teacher=str(directory / "toy_teacher.py"),
                           data=str(directory / "tokens.npy"), tokens=tokens)


@pytest.fixture
def run_kdfast(capsys):
    """run_kdfast(argv) -> (exit code, stdout, stderr) of `kdfast.cli.main(argv)`."""

    def run(argv):
        capsys.readouterr()
        try:
            code = cli.main([str(argument) for argument in argv])
        except SystemExit as stop:
            code = stop.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def compress_args(toy):
    """compress_args(out, *extra, teacher=None, data=None): `kdfast compress` arguments over the toy
    teacher and tokens, with small windows and shards."""

    def arguments(out, *extra, teacher=None, data=None):
        return ["compress", "--teacher", teacher or f"{toy.teacher}:teacher", "--data", data or toy.data,
                "--out", str(out), "--k", "8", "--seq-len", "32", "--batch-size", "2", "--shard-tokens", "500",
                "--no-fsync", *extra]

    return arguments
