"""GPU comparison table of the dense KD loss, with the copy-bandwidth yardstick and the issue's targets.

Usage: `python benches/gpu_bench.py OUTDIR [--device cuda|cpu] [--quick] [--deadline SECONDS]
[--sections dense,topk]`.
Called by benches/gpu_check.sh; everything it writes goes into OUTDIR:
- `copy_bandwidth.json`: device-to-device copy bandwidth (torch `copy_` of a 1 GiB buffer,
  median of 10 CUDA-event timings; GB/s = bytes read + bytes written, over time).
- `bench_<group>.csv` / `bench_<group>.log`: one `python -m kdfast.benchmark` run per group,
  fwd and fwd+bwd, each in its own process under its own timeout (a failure or a timeout loses
  only that group), in this order: the headline case in bf16 (kdfast, Liger-Kernel,
  torch.compile, eager), few long rows (64 x 256000), many short rows (65536 x 1000) and an
  odd vocabulary (16384 x 50257) in bf16 (kdfast, Liger, eager: no compile, to save its
  compile time), the headline case in
  fp32 (all four), and JSD (4096 x 131072, bf16; Liger's LigerJSD).
- `summary.md` / `summary.json`: every timed row with median ms, GB/s against the minimum
  bytes (each input read once, each output written once), that as % of the copy bandwidth,
  kdfast's GB/s against the bytes its own passes move and that as % of copy bandwidth,
  speed-ups, peak memory; then the targets of the headline case (bf16, N=16384, V=131072,
  forward_kl, T=2, alpha=0.5): fwd+bwd >= 85% of copy bandwidth counting kdfast's passes,
  >= 5x Liger's KL + CE modules, >= 3x torch.compile, no float32 N x V temporary.

kdfast's passes (bytes per element, s/t = student/teacher element sizes): forward reads
student and teacher once (s + t; JSD/TVD sweep the row a second time, from L1/L2 when it
fits); backward reads both again and writes the gradient (s + t + s). fwd+bwd: 2(s + t) + s,
i.e. 10 B/element for bf16 (the floor of any implementation being s + t + s = 6).
`--device cpu --quick` runs the same steps on tiny CPU shapes (a check of this script).

Top-k soft labels (`topk` group, run right after the headline group in its own process:
`gpu_bench.py OUTDIR --topk-only`): `topk_gpu.csv` and `topk_gpu.md` with, per shape,
compress_topk's median ms against the time one read of the teacher logits takes at the
measured copy bandwidth (teacher bytes / copy GB/s, the copy's GB/s counting bytes read plus
bytes written; target ratio <= 1.5), torch.topk + log_softmax for comparison, and sparse_kd_loss fwd+bwd in GB/s on its
minimum bytes (student read once, gradient written once, soft labels read once) as % of the
copy bandwidth (target >= 85%).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import kdfast
from kdfast import functional
from kdfast.benchmark import git_commit, machine_name, median_ms, write_csv

HEADLINE = dict(dtype="bfloat16", rows=16384, vocab=131072, divergence="forward_kl")
TEMPERATURE = 2.0
ALPHA = 0.5
ELEMENT_SIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def benchmark_groups(device: str, quick: bool) -> List[dict]:
    """The benchmark runs, most important first, with their time caps in seconds."""
    if quick:
        return [
            dict(name="headline_bf16", dtype="bfloat16", rows=64, vocab=1000, providers="kdfast,eager", cap=120),
            dict(name="short_rows_fp32", dtype="float32", rows=256, vocab=100, providers="kdfast,eager", cap=120),
            dict(name="topk", kind="topk", cap=120),
        ]
    everything = "kdfast,liger,compile,eager"
    return [
        dict(name="headline_bf16", dtype="bfloat16", rows=16384, vocab=131072, providers=everything, cap=170),
        dict(name="topk", kind="topk", cap=90),
        dict(name="few_long_bf16", dtype="bfloat16", rows=64, vocab=256000, providers="kdfast,liger,eager", cap=50),
        dict(name="many_short_bf16", dtype="bfloat16", rows=65536, vocab=1000, providers="kdfast,liger,eager", cap=50),
        dict(name="odd_vocab_bf16", dtype="bfloat16", rows=16384, vocab=50257, providers="kdfast,liger,eager", cap=50),
        dict(name="headline_fp32", dtype="float32", rows=16384, vocab=131072, providers=everything, cap=150),
        dict(name="jsd_bf16", dtype="bfloat16", rows=4096, vocab=131072, divergence="jsd",
             providers="kdfast,liger,eager", cap=50),
    ]


def measure_copy_bandwidth(device: str, quick: bool) -> Dict[str, float]:
    """Median GB/s of `dst.copy_(src)` (bytes read + bytes written per second), 3 warm-up copies then 10 timed."""
    nbytes = (64 if quick else 1024) * 2**20
    source = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    destination = torch.empty_like(source)
    median = median_ms(lambda: destination.copy_(source), device, repeats=10, warmup=3) / 1e3
    return {"bytes": nbytes, "median_s": median, "gbps": 2 * nbytes / median / 1e9, "device": machine_name(device)}


def run_group(group: dict, device: str, outdir: Path, timeout_s: float, quick: bool) -> dict:
    """One `python -m kdfast.benchmark` run (or the top-k section); returns its status."""
    if group.get("kind") == "topk":
        return run_topk_group(device, outdir, timeout_s, quick)
    csv_path = outdir / f"bench_{group['name']}.csv"
    log_path = outdir / f"bench_{group['name']}.log"
    if csv_path.exists():
        csv_path.unlink()
    command = [
        sys.executable, "-m", "kdfast.benchmark", "--device", device, "--dtypes", group["dtype"],
        "--rows", str(group["rows"]), "--vocab", str(group["vocab"]),
        "--divergence", group.get("divergence", "forward_kl"), "--temperature", str(TEMPERATURE),
        "--alpha", str(ALPHA), "--providers", group["providers"], "--passes", "fwd,fwd+bwd",
        "--repeats", "10", "--min-repeats", "3", "--budget", "0.2" if quick else "0.3", "--warmup", "1",
        "--out", str(csv_path),
    ]
    started = time.time()
    status = "ok"
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        try:
            completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=max(timeout_s, 1.0))
            if completed.returncode != 0:
                status = f"exit code {completed.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s:.0f} s"
    return {"group": group["name"], "status": status, "seconds": round(time.time() - started, 1),
            "csv": csv_path.name if csv_path.exists() else None}


def read_rows(outdir: Path) -> List[dict]:
    rows = []
    for path in sorted(outdir.glob("bench_*.csv")):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                row["group"] = path.stem[len("bench_"):]
                rows.append(row)
    return rows


def _number(text) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def kdfast_pass_bytes(dtype: str, rows: int, vocab: int, pass_name: str) -> int:
    """Bytes kdfast's kernels move (see the module docstring): labels and O(rows) buffers included."""
    size = ELEMENT_SIZE[dtype]
    forward = rows * vocab * (size + size) + rows * 8
    if pass_name == "fwd":
        return forward
    return 2 * forward + rows * vocab * size


def summarise(rows: List[dict], copy_gbps: Optional[float]) -> dict:
    table = []
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        rows_n, vocab = int(row["N"]), int(row["V"])
        median_ms = _number(row.get("median_ms"))
        gbps = _number(row.get("gbps"))
        entry = {
            "group": row["group"], "dtype": row["dtype"], "N": rows_n, "V": vocab, "divergence": row["divergence"],
            "pass": row["pass"], "provider": row["provider"], "median_ms": median_ms, "gbps_min_bytes": gbps,
            "pct_copy_min_bytes": (100 * gbps / copy_gbps) if gbps and copy_gbps else None,
            "peak_extra_mb": _number(row.get("peak_extra_mb")), "status": row.get("status", ""),
            "gbps_kdfast_passes": None, "pct_copy_kdfast_passes": None,
        }
        if row["provider"] == "kdfast" and median_ms and row["dtype"] in ELEMENT_SIZE:
            moved = kdfast_pass_bytes(row["dtype"], rows_n, vocab, row["pass"])
            entry["gbps_kdfast_passes"] = moved / (median_ms * 1e-3) / 1e9
            if copy_gbps:
                entry["pct_copy_kdfast_passes"] = 100 * entry["gbps_kdfast_passes"] / copy_gbps
        table.append(entry)
        by_key.setdefault((row["dtype"], rows_n, vocab, row["divergence"], row["pass"]), {})[row["provider"]] = entry

    for providers in by_key.values():
        kdfast = providers.get("kdfast")
        if not kdfast or not kdfast["median_ms"]:
            continue
        for other in ("liger", "compile", "eager"):
            if other in providers and providers[other]["median_ms"] and str(providers[other]["status"]).startswith(
                    ("ok", "differs")):
                kdfast[f"speedup_vs_{other}"] = providers[other]["median_ms"] / kdfast["median_ms"]

    targets = {}
    key = (HEADLINE["dtype"], HEADLINE["rows"], HEADLINE["vocab"], HEADLINE["divergence"], "fwd+bwd")
    headline = by_key.get(key, {}).get("kdfast")
    if headline:
        float32_mb = HEADLINE["rows"] * HEADLINE["vocab"] * 4 / 1e6
        gradient_mb = HEADLINE["rows"] * HEADLINE["vocab"] * ELEMENT_SIZE[HEADLINE["dtype"]] / 1e6
        targets = {
            "status": headline["status"],
            "fwd+bwd ms": headline["median_ms"],
            "% of copy bandwidth (kdfast passes, 10 B/element)": headline["pct_copy_kdfast_passes"],
            "target >= 85%": _meets(headline["pct_copy_kdfast_passes"], 85.0),
            "% of copy bandwidth (minimum bytes, 6 B/element)": headline["pct_copy_min_bytes"],
            "speed-up vs Liger": headline.get("speedup_vs_liger"),
            "target >= 5x Liger": _meets(headline.get("speedup_vs_liger"), 5.0),
            "speed-up vs torch.compile": headline.get("speedup_vs_compile"),
            "target >= 3x torch.compile": _meets(headline.get("speedup_vs_compile"), 3.0),
            "peak extra MB": headline["peak_extra_mb"],
            "gradient MB": gradient_mb,
            "no float32 N x V temporary": (headline["peak_extra_mb"] < gradient_mb + 0.5 * float32_mb)
            if headline["peak_extra_mb"] is not None else None,
        }
    return {"copy_gbps": copy_gbps, "rows": table, "headline_targets": targets}


def _meets(value: Optional[float], target: float) -> Optional[bool]:
    return None if value is None else value >= target


def _cell(value, digits=2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_summary(summary: dict, groups: List[dict], copy: dict, outdir: Path) -> str:
    lines = [f"# kdfast dense KD loss on {copy.get('device', '?')}", ""]
    copied_mib = copy.get("bytes", 0) / 2**20
    lines.append(f"Copy bandwidth (torch copy_ of {copied_mib:.0f} MiB, read + write): "
                 f"{_cell(copy.get('gbps'), 1)} GB/s")
    lines.append(f"T={TEMPERATURE}, alpha={ALPHA}; GB/s(min) = minimum bytes (inputs read once, gradient written "
                 "once) / time; GB/s(kdfast) = bytes of kdfast's passes (fwd: s+t, fwd+bwd: 2(s+t)+s per element) / "
                 "time; % = of the copy bandwidth.")
    lines.append("")
    header = ["dtype", "N", "V", "divergence", "pass", "provider", "ms", "GB/s(min)", "%copy(min)", "GB/s(kdfast)",
              "%copy(kdfast)", "x liger", "x compile", "x eager", "peak MB", "status"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    order = {"kdfast": 0, "liger": 1, "compile": 2, "eager": 3}
    for entry in sorted(summary["rows"], key=lambda e: (e["group"], e["pass"], order.get(e["provider"], 9))):
        lines.append("| " + " | ".join([
            entry["dtype"], str(entry["N"]), str(entry["V"]), entry["divergence"], entry["pass"], entry["provider"],
            _cell(entry["median_ms"], 3), _cell(entry["gbps_min_bytes"], 0), _cell(entry["pct_copy_min_bytes"], 1),
            _cell(entry["gbps_kdfast_passes"], 0), _cell(entry["pct_copy_kdfast_passes"], 1),
            _cell(entry.get("speedup_vs_liger")), _cell(entry.get("speedup_vs_compile")),
            _cell(entry.get("speedup_vs_eager")), _cell(entry["peak_extra_mb"], 1), str(entry["status"]),
        ]) + " |")
    lines.append("")
    lines.append("## Headline targets (bf16, N=16384, V=131072, forward_kl, fwd+bwd)")
    if summary["headline_targets"]:
        for name, value in summary["headline_targets"].items():
            lines.append(f"- {name}: {_cell(value)}")
    else:
        lines.append("- no kdfast fwd+bwd result for the headline case")
    lines.append("")
    lines.append("## Benchmark runs")
    for group in groups:
        lines.append(f"- {group['group']}: {group['status']} ({group['seconds']} s)")
    text = "\n".join(lines) + "\n"
    (outdir / "summary.md").write_text(text)
    (outdir / "summary.json").write_text(json.dumps({**summary, "groups": groups, "copy": copy}, indent=2))
    return text


# ------------------------------------------------------------------------------------------
# Top-k soft labels: compress_topk and sparse_kd_loss against the copy-bandwidth yardstick.

TOPK_SHAPES = [
    # (teacher/student dtype, rows, vocab, k)
    ("bfloat16", 4096, 131072, 64),
    ("bfloat16", 2048, 256000, 100),
    ("float32", 2048, 128256, 1024),
    ("bfloat16", 16384, 32000, 32),
]
TOPK_QUICK_SHAPES = [("float32", 64, 1000, 8), ("bfloat16", 32, 5000, 50)]


def run_topk_group(device: str, outdir: Path, timeout_s: float, quick: bool) -> dict:
    """The top-k section in its own process (a crash or a timeout loses only this section)."""
    log_path = outdir / "bench_topk.log"
    command = [sys.executable, str(Path(__file__).resolve()), str(outdir), "--device", device, "--topk-only"]
    if quick:
        command.append("--quick")
    started = time.time()
    status = "ok"
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        try:
            completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=max(timeout_s, 1.0))
            if completed.returncode != 0:
                status = f"exit code {completed.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout_s:.0f} s"
    return {"group": "topk", "status": status, "seconds": round(time.time() - started, 1),
            "csv": "topk_gpu.csv" if (outdir / "topk_gpu.csv").exists() else None}


def topk_section(device: str, outdir: Path, quick: bool) -> int:
    """Times the top-k kernels; writes topk_gpu.csv and topk_gpu.md into outdir."""
    copy_path = outdir / "copy_bandwidth.json"
    copy = json.loads(copy_path.read_text()) if copy_path.exists() else {}
    if "gbps" not in copy:
        copy = measure_copy_bandwidth(device, quick)
    copy_gbps = copy["gbps"]
    repeats = 5 if quick else 10
    commit = git_commit()
    machine = machine_name(device)
    records = []
    for dtype_name, rows, vocab, k in (TOPK_QUICK_SHAPES if quick else TOPK_SHAPES):
        dtype = getattr(torch, dtype_name)
        size = torch.empty((), dtype=dtype).element_size()
        generator = torch.Generator(device=device).manual_seed(rows + vocab + k)
        teacher = (torch.randn(rows, vocab, generator=generator, device=device) * 3).to(dtype)
        student = (torch.randn(rows, vocab, generator=generator, device=device) * 3).to(dtype)
        labels = torch.randint(0, vocab, (rows,), generator=generator, device=device)
        teacher_bytes = rows * vocab * size
        one_read_ms = teacher_bytes / (copy_gbps * 1e9) * 1e3

        def base(provider, pass_name, median_ms, minimum_bytes, **extra):
            gbps = minimum_bytes / (median_ms * 1e-3) / 1e9
            return {"machine": machine, "commit": commit, "dtype": dtype_name, "N": rows, "V": vocab, "k": k,
                    "provider": provider, "pass": pass_name, "median_ms": round(median_ms, 4),
                    "min_bytes": minimum_bytes, "gbps_min_bytes": round(gbps, 1),
                    "pct_copy_bandwidth": round(100 * gbps / copy_gbps, 1), "one_read_ms": round(one_read_ms, 4),
                    "ratio_to_one_read": round(median_ms / one_read_ms, 3), **extra}

        # compress_topk: reads the teacher once, writes k indices (int32) + k logprobs + 1 tail per row.
        compress_out = rows * (k * 8 + 4)
        ms = median_ms(lambda: kdfast.compress_topk(teacher, k, temperature=TEMPERATURE), device, repeats)
        records.append(base("kdfast", "compress", ms, teacher_bytes + compress_out, target="ratio <= 1.5"))

        def torch_topk():
            logprobs = torch.log_softmax(teacher.float() / TEMPERATURE, dim=-1)
            values, indices = logprobs.topk(k, dim=-1)
            return values, indices.int(), torch.log1p(-values.exp().sum(-1).clamp(max=1.0))

        try:
            ms = median_ms(torch_topk, device, repeats)
            records.append(base("torch.topk+log_softmax", "compress", ms, teacher_bytes + compress_out))
        except Exception as error:  # e.g. out of memory for the float32 temporary
            print(f"torch.topk baseline failed: {type(error).__name__}: {error}", flush=True)

        # sparse_kd_loss fwd+bwd: student read once, gradient written once, soft labels read once.
        soft_labels = kdfast.compress_topk(teacher, k, temperature=TEMPERATURE)
        leaf = student.detach().requires_grad_(True)

        def sparse_step():
            loss = functional.sparse_kd_loss(leaf, soft_labels, labels, temperature=TEMPERATURE, alpha=ALPHA)
            (gradient,) = torch.autograd.grad(loss, leaf)
            return gradient

        sparse_bytes = 2 * rows * vocab * size + rows * (k * 8 + 4) + rows * 8
        ms = median_ms(sparse_step, device, repeats)
        # kdfast's passes: the forward reads the student once, the backward reads it again and
        # writes the gradient (3 student-sized transfers per element against the minimum's 2).
        passes_gbps = (3 * rows * vocab * size + rows * (k * 8 + 4) * 2) / (ms * 1e-3) / 1e9
        records.append(base("kdfast", "sparse fwd+bwd", ms, sparse_bytes, target=">= 85% of copy bandwidth",
                            gbps_kdfast_passes=round(passes_gbps, 1),
                            pct_copy_kdfast_passes=round(100 * passes_gbps / copy_gbps, 1)))
        print(records[-1], flush=True)
        teacher = student = soft_labels = leaf = None  # free this shape's tensors before the next one
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    write_csv(records, outdir / "topk_gpu.csv", columns=sorted({key for record in records for key in record}))
    lines = [f"# kdfast top-k soft labels on {machine}", "",
             f"Copy bandwidth {copy_gbps:.1f} GB/s (read + write); one read of the teacher = its bytes at "
             f"that rate. T={TEMPERATURE}, alpha={ALPHA}.", "",
             "| dtype | N | V | k | provider | pass | ms | x one read | GB/s(min) | %copy(min) | %copy(kdfast) |",
             "|" + "---|" * 11]
    for r in records:
        passes = r.get("pct_copy_kdfast_passes")
        lines.append(f"| {r['dtype']} | {r['N']} | {r['V']} | {r['k']} | {r['provider']} | {r['pass']} | "
                     f"{r['median_ms']:.3f} | {r['ratio_to_one_read']:.2f} | {r['gbps_min_bytes']:.0f} | "
                     f"{r['pct_copy_bandwidth']:.1f} | {'-' if passes is None else f'{passes:.1f}'} |")
    lines += ["", "x one read: compress time / (teacher bytes at the copy bandwidth); target <= 1.5.",
              "%copy(min): sparse fwd+bwd GB/s on its minimum bytes (student read once, gradient written once); "
              "%copy(kdfast): on the bytes of its passes (student read twice, gradient written once); "
              "target >= 85%."]
    text = "\n".join(lines) + "\n"
    (outdir / "topk_gpu.md").write_text(text)
    print(text, flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a check of this script")
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds for all benchmark runs together")
    parser.add_argument("--topk-only", action="store_true", help="only the top-k section (topk_gpu.csv/.md)")
    parser.add_argument("--sections", default="dense,topk",
                        help="comma-separated: dense (the kd_loss groups), topk (the top-k section)")
    parser.add_argument("--groups", default="",
                        help="comma-separated group names to run, in their usual order (default: every group "
                             "of the sections)")
    options = parser.parse_args(argv)
    outdir = Path(options.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    if options.topk_only:
        return topk_section(options.device, outdir, options.quick)
    started = time.time()

    copy: dict = {}
    try:
        copy = measure_copy_bandwidth(options.device, options.quick)
    except Exception as error:  # keep going: the table is still useful without the yardstick
        copy = {"error": f"{type(error).__name__}: {error}"}
    (outdir / "copy_bandwidth.json").write_text(json.dumps(copy, indent=2))
    print(f"copy bandwidth: {copy}", flush=True)

    groups = []
    sections = set(options.sections.split(","))
    for group in benchmark_groups(options.device, options.quick):
        if ("topk" if group.get("kind") == "topk" else "dense") not in sections:
            continue
        if options.groups and group["name"] not in options.groups.split(","):
            continue
        remaining = options.deadline - (time.time() - started)
        if remaining < 15:
            groups.append({"group": group["name"], "status": "skipped (out of time)", "seconds": 0, "csv": None})
            continue
        result = run_group(group, options.device, outdir, min(group["cap"], remaining), options.quick)
        groups.append(result)
        print(f"{group['name']}: {result['status']} ({result['seconds']} s)", flush=True)

    # Multi-teacher loss (M = 4 fused vs the eager sum of M kl_div), when time is left.
    remaining = options.deadline - (time.time() - started)
    multi_log = outdir / "bench_multi_teacher.log"
    if remaining >= 15:
        command = [sys.executable, str(Path(__file__).resolve().parent / "bench_multi_teacher.py"), "--device",
                   options.device, "--out", str(outdir), "--repeats", "5"]
        if not options.quick:
            command += ["--rows", "4096", "--vocab", "32000", "--dtype", "bfloat16"]
        else:
            command += ["--rows", "64", "--vocab", "1000"]
        with open(multi_log, "w") as log:
            try:
                status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=min(60.0, remaining)).returncode
                print(f"multi_teacher: exit code {status}", flush=True)
            except subprocess.TimeoutExpired:
                print("multi_teacher: timed out", flush=True)
        print(multi_log.read_text()[-2000:], flush=True)
    else:
        print("multi_teacher: skipped (out of time)", flush=True)

    summary = summarise(read_rows(outdir), copy.get("gbps"))
    text = write_summary(summary, groups, copy, outdir)
    topk_table = outdir / "topk_gpu.md"
    if topk_table.exists():
        text += "\n" + topk_table.read_text()
        (outdir / "summary.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
