"""Top-k soft labels on the CPU: compression speed, sparse-loss speed, storage per token.

Prints three tables and appends their rows to benches/results/ (topk_cpu.csv and
topk_storage.csv; `--out DIR` changes the folder, `--no-csv` skips writing):

1. compress: `kdfast.compress_topk(t, k, temperature=T)` against eager PyTorch doing the same
   job with `torch.topk` + `torch.log_softmax` (+ gather, + the tail as log1p(−Σ kept), which
   is what an eager user writes), optionally `torch.compile` of that (`--providers`), and
   `read`: `torch.sum` of the same teacher, the core's read rate in that run (printed as a
   ratio under the table).
   Minimum bytes: N·V·size_t read + N·k·(4 + 4) + 4·N written.
2. sparse loss, forward and forward+backward (gradient w.r.t. the student): the bucket-mode
   `kdfast.functional.sparse_kd_loss` against the same bucket loss written eagerly with
   gather / scatter / masked log-sum-exp, and against the dense `kdfast.functional.kd_loss`
   on the full teacher row. forward_kl, T = 2, α = 0.5, every 16th label ignored.
   Minimum bytes: fwd N·V·size_s + N·k·8 + 12·N; fwd+bwd adds N·V·size_s (the gradient).
3. storage: bytes per token of a dense teacher row against SoftLabels at float32 (int32
   indices) and at the compact storage dtypes (`SoftLabels.for_storage`).

Timing: each call is timed with both `time.perf_counter` (wall) and `time.process_time`
(CPU time of the whole process, all threads); the table shows medians of both and the
speed-ups use CPU time, which a busy machine disturbs less. Default: one thread
(`--threads`), N = 1024, V = 128256, k = 64, float32 and bfloat16 logits.
Example: `python benches/bench_topk.py --quick` (small shapes, seconds).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

try:
    import kdfast
except ImportError:  # run from a checkout without installing: use python/ next to benches/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import kdfast
from kdfast.benchmark import append_csv, git_commit, load_average, machine_name, time_within_budget

RESULT_COLUMNS = [
    "timestamp", "machine", "cores", "threads", "commit", "load_average", "benchmark", "dtype", "N", "V", "k",
    "pass", "provider", "median_wall_ms", "median_cpu_ms", "gbps_cpu", "speedup_cpu", "repeats", "status",
]
STORAGE_COLUMNS = ["timestamp", "commit", "V", "k", "layout", "bytes_per_token", "ratio_vs_dense_bf16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- baselines


def eager_compress(teacher: torch.Tensor, k: int, temperature: float):
    """torch.topk + log_softmax: (indices, logprobs, tail_logprob) as a PyTorch user writes it."""
    _, indices = torch.topk(teacher, k, dim=-1)
    log_probs = torch.log_softmax(teacher.float() / temperature, dim=-1)
    logprobs = log_probs.gather(-1, indices)
    tail = torch.log1p(-logprobs.exp().sum(-1).clamp(max=1.0))
    return indices, logprobs, tail


def eager_bucket_loss(student: torch.Tensor, soft_labels, labels: torch.Tensor, alpha: float,
                      ignore_index: int = -100) -> torch.Tensor:
    """The bucket-mode forward_kl + α·CE of sparse_kd_loss in eager PyTorch (gather/scatter)."""
    temperature = soft_labels.temperature
    scaled = student.float() / temperature
    indices = soft_labels.indices.long()
    log_normaliser = torch.logsumexp(scaled, -1, keepdim=True)
    kept = scaled.gather(-1, indices)
    kept_mask = torch.zeros_like(scaled, dtype=torch.bool).scatter_(-1, indices, True)
    tail = torch.logsumexp(scaled.masked_fill(kept_mask, -math.inf), -1, keepdim=True)
    student_log_buckets = torch.cat([kept, tail], -1) - log_normaliser
    teacher_buckets = torch.cat([soft_labels.logprobs.float(), soft_labels.tail_logprob.float()[..., None]], -1)
    teacher_log_buckets = teacher_buckets - torch.logsumexp(teacher_buckets, -1, keepdim=True)
    teacher_probs = teacher_log_buckets.exp()
    divergence = torch.where(teacher_probs > 0, teacher_probs * (teacher_log_buckets - student_log_buckets),
                             0.0).sum(-1)
    valid = labels != ignore_index
    cross_entropy = F.cross_entropy(student.float(), labels, ignore_index=ignore_index, reduction="none")
    rows = alpha * cross_entropy + (1 - alpha) * temperature * temperature * divergence
    return torch.where(valid, rows, 0.0).sum() / valid.sum().clamp(min=1)


# ----------------------------------------------------------------------------- checks


def relative_difference(value: torch.Tensor, expected: torch.Tensor) -> float:
    value, expected = value.double(), expected.double()
    return float((value - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


# ----------------------------------------------------------------------------- benchmarks


def bench_compress(dtype, rows, vocab, k, options, results: List[Dict]) -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = (torch.randn(rows, vocab, generator=generator) * 3).to(dtype)
    temperature = 2.0
    providers: Dict[str, Callable] = {
        "kdfast": lambda: kdfast.compress_topk(teacher, k, temperature=temperature),
        "eager": lambda: eager_compress(teacher, k, temperature),
    }
    if "compile" in options.providers:
        compiled = torch.compile(eager_compress, dynamic=False)
        providers["compile"] = lambda: compiled(teacher, k, temperature)
    # The core's read rate in this hour: torch.sum reads the same teacher bytes once (it moves
    # between runs on a VM, and compress_topk with it).
    providers["read"] = lambda: teacher.sum()
    min_bytes = rows * vocab * teacher.element_size() + rows * k * 8 + rows * 4
    expected = eager_compress(teacher, k, temperature)
    for name, step in providers.items():
        if name not in options.providers:
            continue
        status = "ok"
        try:
            out = step()
            if name != "read":
                logprobs = out.logprobs if name == "kdfast" else out[1]
                difference = relative_difference(logprobs.float(), expected[1])
                if difference > 1e-4:
                    status = f"differs from eager: rel {difference:.1e}"
            wall, cpu, repeats = time_within_budget(step, repeats=options.repeats,
                                                    min_repeats=options.min_repeats, budget_s=options.budget)
        except Exception as error:  # keep going: one failing provider must not end the table
            wall = cpu = float("nan")
            repeats, status = 0, f"failed: {type(error).__name__}: {str(error)[:80]}"
        results.append(dict(benchmark="compress", dtype=str(dtype).replace("torch.", ""), N=rows, V=vocab, k=k,
                            **{"pass": "fwd"}, provider=name, median_wall_ms=wall, median_cpu_ms=cpu,
                            gbps_cpu=min_bytes / (cpu * 1e6) if cpu > 0 else float("nan"), repeats=repeats,
                            status=status))


def bench_sparse_loss(dtype, rows, vocab, k, options, results: List[Dict]) -> None:
    generator = torch.Generator().manual_seed(1)
    student = (torch.randn(rows, vocab, generator=generator) * 3).to(dtype)
    teacher = (torch.randn(rows, vocab, generator=generator) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[::16] = -100
    temperature, alpha = 2.0, 0.5
    soft_labels = kdfast.compress_topk(teacher, k, temperature=temperature)
    losses: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "kdfast": lambda s: kdfast.functional.sparse_kd_loss(s, soft_labels, labels, alpha=alpha),
        "eager": lambda s: eager_bucket_loss(s, soft_labels, labels, alpha),
        "dense": lambda s: kdfast.functional.kd_loss(s, teacher, labels, temperature=temperature, alpha=alpha),
    }
    size = student.element_size()
    with torch.no_grad():
        expected_loss = eager_bucket_loss(student, soft_labels, labels, alpha)
    for pass_name in options.passes:
        min_bytes = rows * vocab * size + rows * k * 8 + rows * 12
        if pass_name == "fwd+bwd":
            min_bytes += rows * vocab * size
        leaf = student.detach().clone().requires_grad_(pass_name == "fwd+bwd")
        for name, loss_of in losses.items():
            if name not in options.providers:
                continue
            if pass_name == "fwd":
                def step(loss_of=loss_of):
                    with torch.no_grad():
                        return loss_of(leaf)
            else:
                def step(loss_of=loss_of):
                    loss = loss_of(leaf)
                    torch.autograd.grad(loss, leaf)
                    return loss.detach()

            status = "ok"
            try:
                loss = step()
                if name == "kdfast":
                    difference = relative_difference(loss, expected_loss)
                    if difference > 1e-4:
                        status = f"differs from eager: rel {difference:.1e}"
                wall, cpu, repeats = time_within_budget(step, repeats=options.repeats,
                                                        min_repeats=options.min_repeats, budget_s=options.budget)
            except Exception as error:  # keep going: one failing provider must not end the table
                wall = cpu = float("nan")
                repeats, status = 0, f"failed: {type(error).__name__}: {str(error)[:80]}"
            results.append(dict(benchmark="sparse_kd_loss" if name != "dense" else "kd_loss (dense)",
                                dtype=str(dtype).replace("torch.", ""), N=rows, V=vocab, k=k, **{"pass": pass_name},
                                provider=name, median_wall_ms=wall, median_cpu_ms=cpu,
                                gbps_cpu=min_bytes / (cpu * 1e6) if cpu > 0 else float("nan"), repeats=repeats,
                                status=status))


def storage_rows(vocabs, ks) -> List[Dict]:
    rows = []
    for vocab in vocabs:
        dense_bf16 = 2 * vocab
        for k in ks:
            teacher = torch.randn(2, vocab)
            soft_labels = kdfast.compress_topk(teacher, k)
            layouts = {
                "dense float32": 4 * vocab,
                "dense bfloat16": dense_bf16,
                "topk int32+float32": soft_labels.bytes_per_token,
                "topk for_storage (float16)": soft_labels.for_storage(torch.float16).bytes_per_token,
            }
            for layout, size in layouts.items():
                rows.append(dict(V=vocab, k=k, layout=layout, bytes_per_token=size,
                                 ratio_vs_dense_bf16=dense_bf16 / size))
    return rows


# ----------------------------------------------------------------------------- output


def add_speedups(results: List[Dict]) -> None:
    """speedup_cpu: the eager provider's median CPU time / this one's, same table, case and pass."""
    def table(row):
        return "compress" if row["benchmark"] == "compress" else "loss"

    for row in results:
        reference = next((other for other in results if other["provider"] == "eager" and table(other) == table(row)
                          and all(other[key] == row[key] for key in ("dtype", "N", "V", "k", "pass"))), None)
        row["speedup_cpu"] = (reference["median_cpu_ms"] / row["median_cpu_ms"]
                              if reference and row["median_cpu_ms"] > 0 else float("nan"))


def format_table(results: List[Dict]) -> str:
    header = f"{'benchmark':<16} {'dtype':<9} {'N':>5} {'V':>7} {'k':>4} {'pass':<8} {'provider':<8} " \
             f"{'wall ms':>9} {'cpu ms':>9} {'GB/s':>6} {'vs eager':>9}  status"
    lines = [header, "-" * len(header)]
    for row in results:
        lines.append(
            f"{row['benchmark']:<16} {row['dtype']:<9} {row['N']:>5} {row['V']:>7} {row['k']:>4} {row['pass']:<8} "
            f"{row['provider']:<8} {row['median_wall_ms']:>9.2f} {row['median_cpu_ms']:>9.2f} {row['gbps_cpu']:>6.2f} "
            f"{row['speedup_cpu']:>8.2f}x  {row['status']}"
        )
    return "\n".join(lines)


def read_rate_lines(results: List[Dict]) -> List[str]:
    """kdfast's compress_topk against torch.sum of the same teacher, per dtype (GB/s of CPU time)."""
    lines = []
    for row in results:
        if row["benchmark"] != "compress" or row["provider"] != "kdfast":
            continue
        read = next((other for other in results if other["benchmark"] == "compress" and other["provider"] == "read"
                     and other["dtype"] == row["dtype"]), None)
        if read and read["gbps_cpu"] > 0:
            lines.append(f"compress {row['dtype']}: kdfast {row['gbps_cpu']:.2f} GB/s per core, "
                         f"{row['gbps_cpu'] / read['gbps_cpu']:.2f} of torch.sum's {read['gbps_cpu']:.2f}")
    return lines


def format_storage(rows: List[Dict]) -> str:
    header = f"{'V':>7} {'k':>4} {'layout':<28} {'bytes/token':>12} {'dense bf16 / this':>18}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['V']:>7} {row['k']:>4} {row['layout']:<28} {row['bytes_per_token']:>12} "
                     f"{row['ratio_vs_dense_bf16']:>17.1f}x")
    return "\n".join(lines)


def append_rows(path: Path, columns: List[str], rows: List[Dict]) -> None:
    """Appends rows to `path` (`kdfast.benchmark.append_csv`), floats with 4 decimals, other keys dropped."""
    records = [{key: (f"{value:.4f}" if isinstance(value, float) else value) for key, value in row.items()
                if key in columns} for row in rows]
    append_csv(records, path, columns=columns)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_topk.py", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--providers", default="kdfast,eager,dense,read",
                        help="comma list of kdfast, eager, dense (dense kd_loss; loss table only), "
                             "compile (torch.compile of the eager compression; compress table only) and read "
                             "(torch.sum of the same teacher, the core's read rate; compress table only)")
    parser.add_argument("--passes", default="fwd,fwd+bwd")
    parser.add_argument("--benchmarks", default="compress,sparse,storage")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timed calls per measurement")
    parser.add_argument("--quick", action="store_true", help="N=64, V=32000: a smoke test")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--no-csv", action="store_true")
    options = parser.parse_args(argv)
    if options.quick:
        options.rows, options.vocab, options.repeats, options.budget = 64, 32000, 3, 1.0
    options.providers = options.providers.split(",")
    options.passes = options.passes.split(",")
    options.benchmarks = options.benchmarks.split(",")
    return options


def main(argv: Optional[List[str]] = None) -> int:
    options = parse_args(argv)
    torch.set_num_threads(options.threads)
    load = load_average()
    print(f"kdfast {kdfast.__version__}, torch {torch.__version__}, {machine_name('cpu')}, "
          f"{torch.get_num_threads()} thread(s), load average {load:.1f} ({os.cpu_count()} cores)")
    results: List[Dict] = []
    for dtype_name in options.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        if "compress" in options.benchmarks:
            bench_compress(dtype, options.rows, options.vocab, options.k, options, results)
        if "sparse" in options.benchmarks:
            bench_sparse_loss(dtype, options.rows, options.vocab, options.k, options, results)
    common = dict(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=machine_name("cpu"), cores=os.cpu_count(), threads=torch.get_num_threads(),
                  commit=git_commit(), load_average=f"{load:.1f}")
    if results:
        add_speedups(results)
        print(format_table(results))
        for line in read_rate_lines(results):
            print(line)
    storage = storage_rows([32000, 128256, 151936, 256000], [32, 64]) if "storage" in options.benchmarks else []
    if storage:
        print()
        print(format_storage(storage))
    if not options.no_csv:
        out = Path(options.out)
        if results:
            append_rows(out / "topk_cpu.csv", RESULT_COLUMNS, [{**common, **row} for row in results])
        if storage:
            append_rows(out / "topk_storage.csv", STORAGE_COLUMNS,
                      [{"timestamp": common["timestamp"], "commit": common["commit"], **row} for row in storage])
    return 0


if __name__ == "__main__":
    sys.exit(main())
