"""First steps and steady state of the fresh-gradient training step under each page policy.

Without the gradient cache (`KDFAST_GRADIENT_CACHE=0`) the one-pass kd_loss allocates its N×V
gradient afresh on every call (glibc maps blocks over its mmap threshold and unmaps them when
freed), so every call pays first-touch page faults; with it (the default, kdfast/ops/_buffers.py)
only the first call does, and later calls reuse the block. `KDFAST_HUGE_PAGES`
(csrc/cpu/dispatch.cpp) chooses whether the core asks for transparent huge pages on a fresh
buffer: `always`, `never` or `auto` (wherever THP is available). This script runs one child
process per policy and cache setting (the core reads the variables once), times the first
`--first` calls of a fresh process and the median of the following `--steady` calls, for kdfast
fwd+bwd (forward_kl, T = 2, alpha = 0.5) and for the floor `s + t` into a fresh tensor, and
prints a table plus the THP settings and the load average; the policy column reads
`POLICY+cache` for runs with the cache. `--out PATH` appends the rows to a CSV file (default
benches/results/kd_loss_pages_cpu.csv, `--no-csv` for none). Example:
`taskset -c 0 python benches/bench_kd_loss_pages.py --threads 1`.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("never", "always", "auto")


def _thp(name: str) -> str:
    try:
        return Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().strip()
    except OSError:
        return "unknown"


def child(options: argparse.Namespace) -> None:
    """Runs in the child process: prints one JSON line of timings."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import torch

    import kdfast
    from kdfast.benchmark.memory import malloc_for_timing

    malloc_for_timing()
    torch.set_num_threads(options.threads)
    dtype = getattr(torch, options.dtype)
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(options.rows, options.vocab, generator=generator) * 2).to(dtype).requires_grad_(True)
    teacher = (torch.randn(options.rows, options.vocab, generator=generator) * 2).to(dtype)
    labels = torch.randint(0, options.vocab, (options.rows,), generator=generator)

    def train_step():
        loss = kdfast.functional.kd_loss(student, teacher, labels, temperature=2.0, alpha=0.5)
        (gradient,) = torch.autograd.grad(loss, student)
        return gradient

    def add_step():
        return student.detach() + teacher

    result = {}
    for name, step in (("kdfast fwd+bwd", train_step), ("s + t", add_step)):
        times = []
        for _ in range(options.first + options.steady):
            begin = time.perf_counter()
            out = step()
            times.append((time.perf_counter() - begin) * 1e3)
            del out
        result[name] = dict(first=times[:options.first], steady=statistics.median(times[options.first:]))
    print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--first", type=int, default=5, help="first calls reported one by one (default 5)")
    parser.add_argument("--steady", type=int, default=15, help="later calls whose median is reported (default 15)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--cache", default="on,off", help="gradient cache settings to run: on, off or on,off")
    parser.add_argument("--out", default=str(RESULTS / "kd_loss_pages_cpu.csv"))
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options)
        return 0
    rows = []
    load_before = os.getloadavg()[0]
    settings = [(policy, cache) for cache in options.cache.split(",") for policy in options.policies.split(",")]
    for policy, cache in settings:
        environment = dict(os.environ, KDFAST_HUGE_PAGES=policy, KDFAST_GRADIENT_CACHE="1" if cache == "on" else "0")
        command = [sys.executable, __file__, "--child", "--rows", str(options.rows), "--vocab", str(options.vocab),
                   "--dtype", options.dtype, "--threads", str(options.threads), "--first", str(options.first),
                   "--steady", str(options.steady)]
        output = subprocess.run(command, env=environment, check=True, capture_output=True, text=True).stdout
        for name, timing in json.loads(output.strip().splitlines()[-1]).items():
            label = policy + ("+cache" if cache == "on" else "")
            rows.append(dict(policy=label, step=name, first_ms=" ".join(f"{t:.1f}" for t in timing["first"]),
                             steady_ms=f"{timing['steady']:.1f}"))
    load = os.getloadavg()[0]
    print(f"page policy: {options.dtype} N={options.rows} V={options.vocab}, {options.threads} thread(s), "
          f"THP enabled: {_thp('enabled')}, defrag: {_thp('defrag')}, load average {load_before:.1f} -> {load:.1f} "
          f"({os.cpu_count()} cores)")
    print(f"{'policy':<13} {'step':<16} {'first calls (ms)':<40} steady median ms")
    for row in rows:
        print(f"{row['policy']:<13} {row['step']:<16} {row['first_ms']:<40} {row['steady_ms']}")
    if not options.no_csv:
        path = Path(options.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["timestamp", "dtype", "N", "V", "threads", "thp_enabled",
                                                        "thp_defrag", "load", "policy", "step", "first_ms",
                                                        "steady_ms"])
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow(dict(row, timestamp=stamp, dtype=options.dtype, N=options.rows, V=options.vocab,
                                     threads=options.threads, thp_enabled=_thp("enabled"), thp_defrag=_thp("defrag"),
                                     load=f"{load:.1f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
