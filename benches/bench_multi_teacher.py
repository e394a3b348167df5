"""Multi-teacher KD loss: the fused kernel against eager PyTorch (CPU, or `--device cuda`).

Prints a table and appends its rows to benches/results/multi_teacher_cpu.csv (`--out DIR`
changes the folder, `--no-csv` skips writing). Providers, all computing the same loss
α·CE(s, y) + (1−α)·T²·Σ_m w_m·KL(p_m‖q) (forward_kl, uniform weights, T = 2, α = 0.5,
"mean" over N rows, every label valid) forward + backward (gradient w.r.t. the student):
- `kdfast`: `kdfast.functional.multi_teacher_kd_loss(student, teachers, labels, ...)`.
- `kdfast-mixture`: the same call with combine="mixture" (KL of the teachers' mixture).
- `eager`: what an eager user writes, the sum over teachers of
  `w_m·T²·F.kl_div(F.log_softmax(s/T), F.log_softmax(t_m/T), log_target=True, reduction="batchmean")`
  plus `α·F.cross_entropy(s, y)`.
Teachers are M separate [N, V] tensors (as M models produce them). Minimum bytes of a
forward+backward call: (M + 1)·N·V·size read once + N·V·size written (the gradient); the
table's GB/s uses that formula for each provider.
Timing (`kdfast.benchmark.time_round_robin`): after a warm-up call of each provider, the
providers' calls are interleaved round-robin (`--repeats` rounds), each timed with
`time.process_time` (CPU time of the process, all threads) and `time.perf_counter` (wall);
the table shows the medians and the speed-up uses CPU time, which a busy machine disturbs
less. Peak memory is the extra resident memory one call holds
(`kdfast.benchmark.measure_peak_extra_mb`), inputs excluded.
Default: one thread (`--threads`), M = 4, N = 256, V = 32000, float32; `--teachers 1,2,4`
shows how memory grows with M. With `--device cuda` (benches/gpu_bench.py runs it so), the
inputs live on the GPU, each call is timed with CUDA events (wall ms; the cpu ms column then
repeats it) and peak memory is torch.cuda's, inputs excluded; the CSV is multi_teacher_cuda.csv.
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from kdfast import benchmark, functional

TEMPERATURE = 2.0
ALPHA = 0.5


def eager_loss(student, teachers, labels):
    log_q = F.log_softmax(student / TEMPERATURE, dim=-1)
    weight = 1.0 / len(teachers)
    kd = 0.0
    for teacher in teachers:
        log_p = F.log_softmax(teacher / TEMPERATURE, dim=-1)
        kd = kd + weight * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return ALPHA * F.cross_entropy(student, labels) + (1 - ALPHA) * TEMPERATURE ** 2 * kd


def fused_loss(combine):
    def loss(student, teachers, labels):
        return functional.multi_teacher_kd_loss(student, teachers, labels, combine=combine, temperature=TEMPERATURE,
                                                alpha=ALPHA)
    return loss


PROVIDERS = {"kdfast": fused_loss("sum"), "kdfast-mixture": fused_loss("mixture"), "eager": eager_loss}


def make_step(fn, student, teachers, labels):
    def step():
        leaf = student.detach().requires_grad_(True)
        loss = fn(leaf, teachers, labels)
        loss.backward()
        return loss.detach(), leaf.grad
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teachers", default="4", help="comma-separated teacher counts M (default 4)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--providers", default="kdfast,kdfast-mixture,eager")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--device", default="cpu")
    options = parser.parse_args()

    torch.set_num_threads(options.threads)
    benchmark.malloc_for_timing()
    dtype = getattr(torch, options.dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    providers = [name.strip() for name in options.providers.split(",") if name.strip()]
    load = benchmark.load_average()
    print(f"# {benchmark.machine_name(options.device)}, {options.threads} thread(s), load average {load:.1f}, "
          f"N={options.rows}, V={options.vocab}, {options.dtype}, forward_kl T={TEMPERATURE} alpha={ALPHA}")
    header = (f"{'M':>3} {'provider':<15} {'cpu ms':>9} {'wall ms':>9} {'GB/s':>7} {'peak MB':>8} {'speed-up':>8} "
              f"{'max|Δloss|':>11}")
    print(header)
    machine, commit = benchmark.machine_name(options.device), benchmark.git_commit()
    records = []
    for num_teachers in [int(m) for m in options.teachers.split(",")]:
        generator = torch.Generator().manual_seed(num_teachers)
        device = options.device
        student = torch.randn(options.rows, options.vocab, generator=generator).to(device=device, dtype=dtype)
        teachers = [torch.randn(options.rows, options.vocab, generator=generator).to(device=device, dtype=dtype)
                    for _ in range(num_teachers)]
        labels = torch.randint(0, options.vocab, (options.rows,), generator=generator).to(device)
        reference_loss = None
        steps, losses = {}, {}
        for name in providers:
            steps[name] = make_step(PROVIDERS[name], student, teachers, labels)
            losses[name], _ = steps[name]()
            if name == "eager":
                reference_loss = losses[name]
        timings = benchmark.time_round_robin(steps, options.repeats, device)
        results = {}
        for name in providers:
            peak_mb = benchmark.measure_peak_extra_mb(steps[name], device)
            cpu_ms, wall_ms = timings[name]
            results[name] = dict(loss=losses[name], cpu_ms=cpu_ms, wall_ms=wall_ms, peak_mb=peak_mb)
        minimum_bytes = (num_teachers + 2) * options.rows * options.vocab * size
        for name, result in results.items():
            speedup = results["eager"]["cpu_ms"] / result["cpu_ms"] if "eager" in results else float("nan")
            delta = (abs(float(result["loss"]) - float(reference_loss)) if reference_loss is not None
                     and name != "kdfast-mixture" else float("nan"))
            gbps = minimum_bytes / (result["wall_ms"] * 1e-3) / 1e9
            peak = result["peak_mb"]
            print(f"{num_teachers:>3} {name:<15} {result['cpu_ms']:>9.1f} {result['wall_ms']:>9.1f} {gbps:>7.2f} "
                  f"{(peak if peak is not None else float('nan')):>8.1f} {speedup:>7.1f}x {delta:>11.2e}")
            records.append(dict(
                date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine,
                platform=platform.platform(), commit=commit, threads=options.threads,
                load_average=f"{load:.1f}", dtype=options.dtype, teachers=num_teachers, rows=options.rows,
                vocab=options.vocab, provider=name, pass_name="fwd+bwd", cpu_ms=f"{result['cpu_ms']:.3f}",
                wall_ms=f"{result['wall_ms']:.3f}", gb_per_s=f"{gbps:.3f}",
                peak_extra_mb="" if peak is None else f"{peak:.1f}", speedup_vs_eager_cpu=f"{speedup:.2f}"))
    if not options.no_csv and records:
        path = Path(options.out) / ("multi_teacher_cuda.csv" if options.device.startswith("cuda")
                                    else "multi_teacher_cpu.csv")
        path = benchmark.append_csv(records, path, columns=list(records[0]))
        print(f"# wrote {path}")


if __name__ == "__main__":
    main()
