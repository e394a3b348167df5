"""Soft-label store on the CPU: `kdfast compress` on 1 and 2 processes, and reading batches from the store.

Prints a table and appends its rows to benches/results/store_cpu.csv (`--out DIR` changes
the folder, `--no-csv` skips writing).

1. compress: `kdfast compress` with a small local teacher (a causal mean of embeddings, a
   tanh layer and a projection to V = 8192; k = 64) over the same tokens, run as one process
   with one torch thread, one process with two threads, and two processes (torch.distributed,
   gloo, one thread each). Tokens/s is what `kdfast compress` reports: tokens computed over
   the time from the first teacher call to the commit (process start and teacher loading
   excluded); for two processes rank 0's clock, which includes waiting for rank 1 and the
   commit. The two-process store is compared byte for byte with the one-process store.
   Since a busy machine slows the wall clock of every configuration differently, each
   configuration also reports tokens per CPU second: the CPU time of all its processes
   (`os.wait4`) minus that of the same command stopped after one teacher call per process
   (start-up, loading), over the tokens in between.
2. read: one epoch of shuffled windows (L = 512, 8 windows per batch) of a synthetic store
   (V = 32000, k = 64: uint16 indices, float16 log-probabilities, 260 bytes of soft labels
   per token) from the page cache, in one process: `SoftLabelWindowBatches` with the storage
   index dtype and with int64 indices, against a naive reader that `np.load`s each field's
   shard file (65536 tokens) for every window of a batch and slices it, and the same with
   `np.load(mmap_mode="r")`. GB/s counts soft-label bytes.

Example: `python benches/bench_store.py --quick` (small sizes, under a minute).
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

try:
    import kdfast  # noqa: F401
except ImportError:  # run from a checkout without installing: use python/ next to benches/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from kdfast.benchmark import append_csv, git_commit, load_average, machine_name
from kdfast.contract.softlabels import SoftLabels
from kdfast.store import SoftLabelStore, SoftLabelWindowBatches

COLUMNS = ["timestamp", "machine", "cores", "commit", "load_average", "benchmark", "configuration", "processes",
           "threads_per_process", "tokens", "value", "unit", "ratio", "note"]
TEACHER = textwrap.dedent(
    """
    import torch

    V, H = 8192, 256
    _generator = torch.Generator().manual_seed(0)
    _embedding = torch.randn(V, H, generator=_generator) / H ** 0.5
    _layer = torch.randn(H, H, generator=_generator) / H ** 0.5
    _projection = torch.randn(H, V, generator=_generator) * (4 / H ** 0.5)

    def teacher(token_ids):
        positions = torch.arange(1, token_ids.shape[1] + 1).view(1, -1, 1)
        hidden = torch.tanh((_embedding[token_ids].cumsum(1) / positions) @ _layer)
        return hidden @ _projection
    """
)
RATE = re.compile(r"\(([\d,]+) tokens/s this run")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _compress(arguments: List[str], processes: int, threads: int, log: Path) -> Tuple[float, float]:
    """Runs `kdfast compress`; returns (the tokens/s it reports, rank 0's with several processes; CPU seconds of
    all its processes, from `os.wait4`)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "kdfast", "compress", *arguments]
    port = str(_free_port())
    runs = []
    for rank in range(processes):
        rank_env = env if processes == 1 else dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                                                   LOCAL_RANK=str(rank), WORLD_SIZE=str(processes))
        with open(log.with_suffix(f".{rank}.log"), "w") as stderr:
            runs.append(subprocess.Popen(command, env=rank_env, stderr=stderr, stdout=subprocess.DEVNULL))
    cpu, failed = 0.0, False
    for run in runs:
        _, status, usage = os.wait4(run.pid, 0)
        run.returncode = os.waitstatus_to_exitcode(status)
        cpu += usage.ru_utime + usage.ru_stime
        failed = failed or run.returncode != 0
    output = log.with_suffix(".0.log").read_text()
    if failed:
        raise SystemExit(f"kdfast compress failed:\n{output}")
    match = RATE.search(output)
    return (float(match.group(1).replace(",", "")) if match else float("nan")), cpu


def bench_compress(tokens: int, directory: Path) -> List[Dict[str, object]]:
    (directory / "teacher.py").write_text(TEACHER)
    np.save(directory / "tokens.npy", np.random.default_rng(0).integers(0, 8192, size=tokens))
    common = ["--teacher", f"{directory / 'teacher.py'}:teacher", "--data", str(directory / "tokens.npy"), "--k", "64",
              "--seq-len", "512", "--batch-size", "4", "--shard-tokens", "8192", "--no-fsync"]
    rows = []
    rates, efficiency = {}, {}
    for name, processes, threads in (("1 process", 1, 1), ("1 process", 1, 2), ("2 processes", 2, 1)):
        out = directory / f"store-{processes}-{threads}"
        rates[(processes, threads)], cpu = _compress([*common, "--out", str(out)], processes, threads,
                                                     directory / "log")
        # the CPU time of starting, loading and one teacher call per process, to subtract
        _, fixed = _compress([*common, "--out", str(out) + "-fixed", "--max-tokens", str(2048 * processes)],
                             processes, threads, directory / "log")
        efficiency[(processes, threads)] = (tokens - 2048 * processes) / max(cpu - fixed, 1e-9)
        rows.append({"benchmark": "compress", "configuration": name, "processes": processes,
                     "threads_per_process": threads, "tokens": tokens, "value": rates[(processes, threads)],
                     "unit": "tokens/s"})
        rows.append({"benchmark": "compress", "configuration": name + ", per CPU second", "processes": processes,
                     "threads_per_process": threads, "tokens": tokens, "value": efficiency[(processes, threads)],
                     "unit": "tokens/cpu-s"})
    one, two = directory / "store-1-1", directory / "store-2-1"
    names = sorted(name for name in os.listdir(one) if name.startswith("shard-"))
    identical = names == sorted(name for name in os.listdir(two) if name.startswith("shard-")) and \
        all(filecmp.cmp(one / name, two / name, shallow=False) for name in names)
    if not identical:
        raise SystemExit("the two-process store differs from the one-process store")
    for row in rows:
        key = (row["processes"], row["threads_per_process"])
        per_cpu = row["unit"] == "tokens/cpu-s"
        row["ratio"] = row["value"] / (efficiency if per_cpu else rates)[(1, 1)]
        clock = "CPU time of all processes, start-up and loading subtracted" if per_cpu else "wall clock"
        row["note"] = f"{clock}; ratio vs 1 process, 1 thread" + (
            "; shard files identical to 1 process" if key[0] == 2 else "")
    return rows


def _write_store(directory: Path, tokens: int) -> SoftLabelStore:
    generator = torch.Generator().manual_seed(0)
    with SoftLabelStore.create(directory, vocab_size=32000, k=64, temperature=1.0, with_token_ids=True,
                               shard_tokens=65536, source={"seq_len": 512}, durable=False) as writer:
        for start in range(0, tokens, 65536):
            rows = min(65536, tokens - start)
            labels = SoftLabels(indices=torch.randint(0, 32000, (rows, 64), generator=generator, dtype=torch.int32),
                                logprobs=-torch.rand(rows, 64, generator=generator) * 10,
                                tail_logprob=-torch.rand(rows, generator=generator), temperature=1.0,
                                vocab_size=32000)
            writer.append(labels, torch.randint(0, 32000, (rows,), generator=generator))
        writer.close(complete=True)
    return SoftLabelStore(directory, verify="size")


def _naive_batch(store: SoftLabelStore, starts: List[int], mmap_mode=None) -> Dict[str, np.ndarray]:
    """np.load of each field's whole shard file for every window, then a slice: what a first attempt does
    (`mmap_mode="r"`: the same with memory maps, which read only the rows sliced)."""
    fields: Dict[str, List[np.ndarray]] = {"indices": [], "logprobs": [], "tail_logprob": []}
    for start in starts:
        shard = next(entry for entry in store.manifest["shards"] if entry["start"] <= start < entry["stop"])
        for field, parts in fields.items():
            array = np.load(os.path.join(store.directory, shard["files"][field]["file"]), mmap_mode=mmap_mode)
            parts.append(array[start - shard["start"] : start - shard["start"] + 512])
    return {field: np.stack(parts) for field, parts in fields.items()}


def bench_read(tokens: int, directory: Path, naive_batches: int) -> List[Dict[str, object]]:
    store = _write_store(directory / "store", tokens)
    per_token = store.bytes_per_token["soft_labels"]
    rows = []
    rates = {}
    for name, index_dtype in (("SoftLabelWindowBatches, storage indices", None),
                              ("SoftLabelWindowBatches, int64 indices", torch.int64)):
        dataset = SoftLabelWindowBatches(store, 8, seed=0, index_dtype=index_dtype)
        for _ in dataset:  # warm: page cache, first-use checks
            pass
        dataset.set_epoch(1)
        started = time.perf_counter()
        count = sum(1 for _ in dataset)
        elapsed = time.perf_counter() - started
        rates[name] = count * 8 * 512 * per_token / elapsed / 1e9
        rows.append({"configuration": name, "tokens": count * 8 * 512, "value": rates[name]})
    windows = (SoftLabelWindowBatches(store, 8, seed=0).rank_windows(1) * 512).tolist()
    naive = 0.0
    for name, mmap_mode, batches in (("naive np.load per batch", None, naive_batches),
                                     ("np.load(mmap_mode='r') per batch", "r", len(windows) // 8)):
        _naive_batch(store, windows[:8], mmap_mode)  # warm
        started = time.perf_counter()
        for batch in range(batches):
            _naive_batch(store, windows[batch * 8 : (batch + 1) * 8], mmap_mode)
        rate = batches * 8 * 512 * per_token / (time.perf_counter() - started) / 1e9
        naive = naive or rate
        rows.append({"configuration": name, "tokens": batches * 8 * 512, "value": rate})
    for row in rows:
        row.update(benchmark="read", processes=1, threads_per_process=torch.get_num_threads(), unit="GB/s",
                   ratio=row["value"] / naive, note="ratio vs naive np.load per batch; page cache, shuffled windows")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compress-tokens", type=int, default=131072, help="tokens compressed (default %(default)s)")
    parser.add_argument("--read-tokens", type=int, default=1 << 20,
                        help="tokens in the read store (default %(default)s)")
    parser.add_argument("--naive-batches", type=int, default=16, help="batches timed for the naive reader")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test, not a measurement)")
    parser.add_argument("--skip-compress", action="store_true")
    parser.add_argument("--skip-read", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), metavar="DIR")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.compress_tokens, args.read_tokens, args.naive_batches = 16384, 65536, 4
    load_before = load_average()
    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory() as temporary:
        if not args.skip_compress:
            rows += bench_compress(args.compress_tokens, Path(temporary))
        if not args.skip_read:
            rows += bench_read(args.read_tokens, Path(temporary), args.naive_batches)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load = max(load_before, load_average())
    for row in rows:
        row.update(timestamp=stamp, machine=machine_name("cpu"), cores=os.cpu_count(), commit=git_commit(),
                   load_average=f"{load:.2f}")
    print(f"{machine_name('cpu')}, {os.cpu_count()} cores, load average up to {load:.2f}")
    print(f"{'benchmark':<9} {'configuration':<42} {'procs':>5} {'threads':>7} {'value':>12} {'unit':<9} {'ratio':>6}")
    for row in rows:
        print(f"{row['benchmark']:<9} {row['configuration']:<42} {row['processes']:>5} {row['threads_per_process']:>7} "
              f"{row['value']:>12,.2f} {row['unit']:<9} {row['ratio']:>6.2f}")
    if not args.no_csv:
        for row in rows:
            row["value"], row["ratio"] = f"{row['value']:.4g}", f"{row['ratio']:.3f}"
        print(f"wrote {append_csv(rows, Path(args.out) / 'store_cpu.csv', COLUMNS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
