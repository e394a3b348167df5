"""`kdfast compress` run by several processes (torch.distributed, gloo): the store equals a one-process store.

The ranks are started as torchrun starts them (one `python -m kdfast compress` per rank with
MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK set; once through torchrun itself)
over a seeded toy teacher of V = 256. The teacher file can make one rank exit abruptly after
a given number of teacher calls (TOY_EXIT_RANK, TOY_EXIT_AFTER), which is how a killed rank
is simulated. Every store is compared file by file with the store one process writes from
the same data: the soft labels and token ids must be byte-identical and the manifests must
list the same shards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from kdfast.compress_cli import main
from kdfast.store import SoftLabelStore

TOY_TEACHER = textwrap.dedent(
    """
    import os, torch

    _generator = torch.Generator().manual_seed(0)
    _embedding = torch.randn(256, 16, generator=_generator)
    _projection = torch.randn(16, 256, generator=_generator) * 2.0
    _calls = 0

    def teacher(token_ids):
        global _calls
        _calls += 1
        if "TOY_EXIT_RANK" in os.environ and os.environ.get("RANK") == os.environ["TOY_EXIT_RANK"] \\
                and _calls > int(os.environ["TOY_EXIT_AFTER"]):
            os._exit(3)  # a rank that dies without cleaning up
        positions = torch.arange(1, token_ids.shape[1] + 1).view(1, -1, 1)
        return (_embedding[token_ids].cumsum(1) / positions) @ _projection
    """
)
# 2000 tokens in windows of 32 (the last one 16 tokens), 2 windows per call: shard boundaries
# at multiples of 500 fall inside teacher calls.
OPTIONS = ["--k", "8", "--seq-len", "32", "--batch-size", "2", "--shard-tokens", "500", "--no-fsync", "--quiet"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(directory, `compress` arguments without --out) over the toy teacher and 2000 tokens."""
    directory = tmp_path_factory.mktemp("toy")
    (directory / "toy_teacher.py").write_text(TOY_TEACHER)
    np.save(directory / "tokens.npy", np.random.default_rng(0).integers(0, 256, size=2000))
    return directory, ["--teacher", f"{directory / 'toy_teacher.py'}:teacher", "--data",
                       str(directory / "tokens.npy"), *OPTIONS]


@pytest.fixture(scope="module")
def one_process_store(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*toy[1], "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(world, arguments, *, extra_env=None, per_rank=None, torchrun=False, timeout=180):
    """Runs `kdfast compress ARGUMENTS` on `world` ranks; returns [(exit code, stderr)] (one entry with torchrun)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   "-m", "kdfast", "compress", *arguments]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        return [(done.returncode, done.stderr)]
    port = str(free_port())
    processes = []
    for rank in range(world):
        rank_env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                        WORLD_SIZE=str(world))
        rank_arguments = [*arguments, *((per_rank or {}).get(rank, []))]
        processes.append(subprocess.Popen([sys.executable, "-m", "kdfast", "compress", *rank_arguments],
                                          env=rank_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        return [(process.wait(timeout=timeout), process.stderr.read()) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.stderr.close()


def shard_files(directory):
    return sorted(name for name in os.listdir(directory) if name.startswith("shard-"))


def assert_same_store(directory, reference):
    assert shard_files(directory) == shard_files(reference)
    for name in shard_files(reference):
        assert (directory / name).read_bytes() == (reference / name).read_bytes(), name
    manifest, expected = (json.loads((path / "manifest.json").read_text()) for path in (directory, reference))
    assert manifest["shards"] == expected["shards"] and manifest["complete"] and manifest["num_tokens"] == 2000
    assert not [name for name in os.listdir(directory) if ".pending." in name or ".tmp-" in name]
    store, baseline = SoftLabelStore(directory), SoftLabelStore(reference)
    store.verify()
    assert torch.equal(store.token_ids(), baseline.token_ids())
    assert torch.equal(store[:].logprobs, baseline[:].logprobs) and torch.equal(store[:].indices, baseline[:].indices)


def identities(directory, numbers):
    """(inode, mtime) of every file of the given shards: unchanged if the shard was not rewritten."""
    return {name: (os.stat(directory / name).st_ino, os.stat(directory / name).st_mtime_ns)
            for name in shard_files(directory) if int(name.split(".")[0].split("-")[1]) in numbers}


def test_torchrun_writes_the_one_process_store(toy, one_process_store, tmp_path):
    out = tmp_path / "store"
    results = launch(2, [*toy[1], "--out", str(out)], torchrun=True)
    assert all(code == 0 for code, _ in results), results
    assert_same_store(out, one_process_store)
    assert json.loads((out / "manifest.json").read_text())["metadata"]["processes"] == 2


# rank that dies, teacher calls it makes first (the first one finds V), shards left written by the
# killed run, ranks of the resumed run
KILLS = [
    # rank 1 dies in its second shard, rank 0 finishes shards 0 and 2; one process resumes: it
    # commits shards 0-2 and computes shard 3
    ("1", 12, {0, 1, 2}, 1),
    # rank 0 dies in shard 0: shards 1 and 3 wait, written, for shard 0; three processes resume
    ("0", 3, {1, 3}, 3),
]


@pytest.mark.parametrize("dead_rank, calls, written, resume_world", KILLS)
def test_resume_after_a_rank_dies_keeps_the_written_shards(toy, one_process_store, tmp_path, dead_rank, calls,
                                                           written, resume_world):
    out = tmp_path / "store"
    arguments = [*toy[1], "--out", str(out)]
    results = launch(2, arguments, extra_env={"TOY_EXIT_RANK": dead_rank, "TOY_EXIT_AFTER": str(calls)})
    assert results[int(dead_rank)][0] == 3
    survivor = results[1 - int(dead_rank)]
    assert survivor[0] == 2 and "lost contact with the other ranks" in survivor[1] and "--resume" in survivor[1]
    assert len(SoftLabelStore(out)) == 0  # nothing is committed before every rank is done
    pending = {int(name.split("-")[1].split(".")[0]) for name in os.listdir(out) if name.endswith(".pending.json")}
    assert pending == written
    before = identities(out, written)
    if resume_world == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert main([*arguments, "--resume"]) == 0
        finally:
            torch.set_num_threads(threads)
    else:
        results = launch(resume_world, [*arguments, "--resume"])
        assert all(code == 0 for code, _ in results), results
    assert identities(out, written) == before  # not recomputed, not rewritten
    assert_same_store(out, one_process_store)


def test_ranks_that_read_different_streams_are_refused_once(toy, tmp_path):
    out = tmp_path / "store"
    results = launch(2, [*toy[1], "--out", str(out)], per_rank={1: ["--max-tokens", "1000"]})
    assert [code for code, _ in results] == [2, 2]
    assert results[1][1] == ""  # rank 0 reports for every rank
    lines = results[0][1].strip().splitlines()
    assert len(lines) == 1 and "do not read the same token stream" in lines[0] and "rank 1: 1000 tokens" in lines[0]
    assert not out.exists() or not (out / "manifest.json").exists()
