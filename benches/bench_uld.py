"""Cross-tokenizer distillation on the CPU: `uld_loss` and byte-offset alignment against plain versions.

Prints one table and appends its rows to benches/results/uld_cpu.csv (`--out DIR` changes the
folder, `--no-csv` skips writing):

1. uld, forward+backward (gradient w.r.t. the student): `kdfast.functional.uld_loss` with
   k=None (exact) and with `--k` (default 256, the top-k form) against the plain PyTorch ULD
   a user writes from the definition (softmax at each temperature, `torch.sort` of both sides,
   zero padding, L1 sum per row, mean; autograd for the gradient), on N×V_s student and N×V_t
   teacher float32 logits (default N = 1024, V_s = 32000, V_t = 50000). The loss of each
   provider is reported next to the plain one (equal at k=None, a lower bound at k < V).
2. align: `kdfast.alignment.align_byte_offsets` on B sequences (default 8 × 2048 tokens a
   side, the same text cut at different random byte boundaries) against TRL's
   `_align_by_byte_offsets` called once per sequence on Python lists (TRL's own function, read
   from the installed `trl` package without importing its trainer; a plain-Python walk of the
   same rule when TRL is missing).

Timing: one thread by default (`--threads`; pin the process with `taskset` for steadier numbers);
each call is timed by wall clock and by process CPU time, and the speed-ups use CPU time, which
a busy machine disturbs less. The CPU, thread count and 1-minute load average are printed and
stored. Example: `taskset -c 0 python benches/bench_uld.py --quick`.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch

try:
    import kdfast
except ImportError:  # run from a checkout without installing: use python/ next to benches/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import kdfast
from kdfast.alignment import align_byte_offsets, sequential_groups
from kdfast.benchmark import append_csv, git_commit, load_average, machine_name, time_within_budget

COLUMNS = ["timestamp", "machine", "threads", "commit", "load_average", "benchmark", "shape", "k", "provider",
           "median_wall_ms", "median_cpu_ms", "speedup_cpu", "repeats", "loss", "status"]


def plain_uld(student: torch.Tensor, teacher: torch.Tensor, student_temperature: float,
              teacher_temperature: float) -> torch.Tensor:
    """ULD written from the definition: sort both softmaxes, pad with zeros, mean over rows of the L1 sums."""
    student_sorted = torch.softmax(student / student_temperature, -1).sort(-1, descending=True).values
    teacher_sorted = torch.softmax(teacher / teacher_temperature, -1).sort(-1, descending=True).values
    width = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    student_sorted = torch.nn.functional.pad(student_sorted, (0, width - student_sorted.shape[-1]))
    teacher_sorted = torch.nn.functional.pad(teacher_sorted, (0, width - teacher_sorted.shape[-1]))
    return (student_sorted - teacher_sorted).abs().sum(-1).mean()


def trl_alignment():
    """(name, function): TRL's `_align_by_byte_offsets` from the installed source, or a Python walk."""
    spec = importlib.util.find_spec("trl")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "experimental", "gold", "gold_trainer.py")
        try:
            with open(path, encoding="utf-8") as handle:
                tree = ast.parse(handle.read())
            cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "ULDLoss")
            method = next(node for node in cls.body if isinstance(node, ast.FunctionDef)
                          and node.name == "_align_by_byte_offsets")
            method.decorator_list = []
            namespace: dict = {}
            exec(compile(ast.Module(body=[method], type_ignores=[]), path, "exec"), namespace)  # noqa: S102
            version = importlib.metadata.version("trl")
            return f"trl {version}", namespace["_align_by_byte_offsets"]
        except (OSError, SyntaxError, StopIteration, importlib.metadata.PackageNotFoundError):
            pass

    return "python walk", sequential_groups


def cut_offsets(rng: np.random.Generator, n_bytes: int, tokens: int) -> np.ndarray:
    cuts = np.sort(rng.choice(np.arange(1, n_bytes), size=tokens - 1, replace=False))
    bounds = np.concatenate([[0], cuts, [n_bytes]])
    return np.stack([bounds[:-1], bounds[1:]], axis=-1).astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--student-vocab", type=int, default=32000)
    parser.add_argument("--teacher-vocab", type=int, default=50000)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=60.0, help="wall seconds of timed calls per provider")
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--no-csv", action="store_true")
    options = parser.parse_args()
    if options.quick:
        options.rows, options.student_vocab, options.teacher_vocab, options.tokens = 64, 3200, 5000, 256
    torch.set_num_threads(options.threads)
    machine = machine_name("cpu")
    start_load = load_average()
    print(f"# {machine}, {options.threads} thread(s), torch {torch.__version__}, kdfast {kdfast.__version__}, "
          f"load average {start_load:.2f}")
    base = dict(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                machine=machine, threads=options.threads, commit=git_commit(), load_average=f"{start_load:.2f}")
    records = []

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(options.rows, options.student_vocab, generator=generator) * 3
    teacher = torch.randn(options.rows, options.teacher_vocab, generator=generator) * 3
    shape = f"N={options.rows} Vs={options.student_vocab} Vt={options.teacher_vocab} float32 Ts=1.5 Tt=2"

    def fwd_bwd(loss_fn):
        def step():
            leaf = student.detach().requires_grad_(True)
            loss = loss_fn(leaf)
            loss.backward()
            return loss.item()
        return step

    providers = [
        ("plain pytorch sort", None, lambda s: plain_uld(s, teacher, 1.5, 2.0)),
        ("kdfast k=None", "exact", lambda s: kdfast.uld_loss(s, teacher, student_temperature=1.5,
                                                             teacher_temperature=2.0)),
        (f"kdfast k={options.k}", str(options.k), lambda s: kdfast.uld_loss(s, teacher, k=options.k,
                                                                              student_temperature=1.5,
                                                                              teacher_temperature=2.0)),
    ]
    plain_cpu = None
    for name, k, loss_fn in providers:
        step = fwd_bwd(loss_fn)
        loss = step()
        wall, cpu, repeats = time_within_budget(step, repeats=options.repeats, min_repeats=2, budget_s=options.budget,
                                                warmup=0)
        plain_cpu = cpu if plain_cpu is None else plain_cpu
        records.append(dict(base, benchmark="uld fwd+bwd", shape=shape, k=k or "", provider=name, median_wall_ms=wall,
                            median_cpu_ms=cpu, speedup_cpu=plain_cpu / cpu, repeats=repeats, loss=f"{loss:.6f}",
                            status="ok"))

    rng = np.random.default_rng(0)
    n_bytes = options.tokens * 4
    student_offsets = [cut_offsets(rng, n_bytes, options.tokens) for _ in range(options.sequences)]
    teacher_offsets = [cut_offsets(rng, n_bytes, options.tokens) for _ in range(options.sequences)]
    batch_student, batch_teacher = np.stack(student_offsets), np.stack(teacher_offsets)
    student_lists = [offsets.tolist() for offsets in student_offsets]
    teacher_lists = [offsets.tolist() for offsets in teacher_offsets]
    trl_name, trl_align = trl_alignment()
    expected = [trl_align(s, t) for s, t in zip(student_lists, teacher_lists)]
    alignment = align_byte_offsets(batch_student, batch_teacher)
    status = "ok" if all(alignment.groups(row) == tuple(expected[row]) for row in range(options.sequences)) \
        else "MISMATCH"
    shape = f"B={options.sequences} L={options.tokens} per side"
    baseline_cpu = None
    for name, step in ((f"{trl_name} per sequence (lists)", lambda: [trl_align(s, t) for s, t in
                                                                    zip(student_lists, teacher_lists)]),
                       ("kdfast align_byte_offsets (batched)", lambda: align_byte_offsets(batch_student,
                                                                                          batch_teacher))):
        wall, cpu, repeats = time_within_budget(step, repeats=50, min_repeats=5, budget_s=10.0)
        baseline_cpu = cpu if baseline_cpu is None else baseline_cpu
        records.append(dict(base, benchmark="align", shape=shape, k="", provider=name, median_wall_ms=wall,
                            median_cpu_ms=cpu, speedup_cpu=baseline_cpu / cpu, repeats=repeats, loss="",
                            status=status))

    print(f"{'benchmark':<12} {'shape':<44} {'provider':<40} {'wall ms':>10} {'cpu ms':>10} {'speed-up':>9} "
          f"{'loss':>10}")
    for record in records:
        print(f"{record['benchmark']:<12} {record['shape']:<44} {record['provider']:<40} "
              f"{record['median_wall_ms']:>10.1f} {record['median_cpu_ms']:>10.1f} {record['speedup_cpu']:>8.1f}x "
              f"{record['loss']:>10} {record['status'] if record['status'] != 'ok' else ''}")
    print(f"# load average at the end {load_average():.2f}")
    if not options.no_csv:
        path = append_csv(records, Path(options.out) / "uld_cpu.csv", COLUMNS)
        print(f"# appended {len(records)} rows to {path}")


if __name__ == "__main__":
    main()
