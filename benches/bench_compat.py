"""The `kdfast.compat` drop-ins against the losses they replace, side by side on the CPU.

One step = forward + backward of the loss with respect to the student's inputs (logits,
log-probabilities, or hidden states and lm_head weight for the fused linear loss; for the
chunked torchtune loss a list of separate chunk tensors, as torchtune's chunked output
projection makes them); median of
`--repeat` steps after one warm-up step, in milliseconds, for each (peer loss, rows, V). The
peer side is the peer's own code where it runs on a CPU-only torch: torchtune 0.6.1's
`kd_losses.py` (loaded from its file: the torchtune package import needs a torchao it pins),
TRL's `GKDTrainer.generalized_jsd_loss` (compiled from its installed source: its module
imports `datasets`) and torchdistill's `KDLoss`. Liger-Kernel runs only through Triton on
GPUs, so its side is the eager PyTorch computation of its conventions (what its tests compare
against: `torch.nn.KLDivLoss`; log-space JSD via `F.kl_div`; F.linear + that JSD); a peer that is
not installed is replaced by the same kind of eager equivalent and marked so. `agree` is the
relative difference of the two losses. `--threads N` sets torch's CPU thread count; the header
line names the CPU, the thread count and the load average. Prints a table and writes
benches/results/compat_cpu.csv (`--out DIR` changes the folder, `--no-csv` skips writing;
`--only TEXT` runs the losses whose name contains TEXT and replaces just their rows).
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime
import importlib.util
import math
import os
import pathlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from kdfast.compat import liger, torchdistill, torchtune, trl

SHAPES = [(1024, 32000), (4096, 32000), (1024, 128256)]


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    return pathlib.Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def load_torchtune():
    root = _package_dir("torchtune")
    if root is None:
        return None
    spec = importlib.util.spec_from_file_location("bench_torchtune_kd", root / "modules" / "loss" / "kd_losses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_trl():
    root = _package_dir("trl")
    path = root / "experimental" / "gkd" / "gkd_trainer.py" if root else None
    if path is None or not path.exists():
        return None
    node = next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)
                and n.name == "generalized_jsd_loss")
    node.decorator_list = []
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    return namespace["generalized_jsd_loss"]


def load_torchdistill():
    try:
        from torchdistill.losses.mid_level import KDLoss
    except Exception:
        return None
    return KDLoss


def eager_jsd(log_q, log_p, labels, beta):
    """Liger's generalised JSD in eager PyTorch (log-space, `F.kl_div`), mean over kept rows."""
    if beta == 0:
        rows = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif beta == 1:
        rows = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        rows = (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True)
                + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True)).sum(-1)
    keep = labels != -100
    return (rows * keep).sum() / keep.sum()


def eager_fused_linear_jsd(h, w, th, tw, labels, beta, temperature):
    log_q = torch.log_softmax(F.linear(h, w).float() / temperature, -1)
    with torch.no_grad():
        log_p = torch.log_softmax(F.linear(th, tw).float() / temperature, -1)
    return eager_jsd(log_q, log_p, labels, beta)


def cpu_name():
    """The CPU's model name (from /proc/cpuinfo on Linux), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def step_ms(fn, inputs, repeat):
    times = []
    for i in range(repeat + 1):
        leaves = [x.detach().requires_grad_(True) if x.is_floating_point() and wants else x
                  for x, wants in inputs]
        start = time.perf_counter()
        loss = fn(*leaves)
        loss.backward()
        elapsed = (time.perf_counter() - start) * 1e3
        if i:
            times.append(elapsed)
        value = float(loss.detach())
        del loss, leaves
    return statistics.median(times), value


def cases(rows, vocab):
    """(peer, loss, peer callable, peer kind, drop-in callable, inputs) for one shape."""
    g = torch.Generator().manual_seed(0)
    s = 2 * torch.randn(rows, vocab, generator=g)
    t = 2 * torch.randn(rows, vocab, generator=g)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::8] = -100
    logits_in = [(s, True), (t, False), (labels, False)]
    tt, gjsd, td = load_torchtune(), load_trl(), load_torchdistill()
    out = []
    if tt is not None:
        for name in ("ForwardKLLoss", "ReverseKLLoss", "SymmetricKLLoss"):
            out.append(("torchtune 0.6.1", name, getattr(tt, name)(), "peer", getattr(torchtune, name)(), logits_in))
        # torchtune's chunked output projection gives each chunk's logits by its own matmul, so the
        # chunks are separate tensors (not views of one [B, T, V] tensor, whose split backward
        # would add a full copy of the gradient to both sides)
        chunks = 8
        peer_chunked = tt.ForwardKLWithChunkedOutputLoss(chunks)
        ours_chunked = torchtune.ForwardKLWithChunkedOutputLoss(chunks)
        chunked_in = ([(c.contiguous(), True) for c in s[None].chunk(chunks, 1)]
                      + [(c.contiguous(), False) for c in t[None].chunk(chunks, 1)] + [(labels[None], False)])

        def chunked(loss):
            return lambda *a: loss(list(a[:chunks]), list(a[chunks:2 * chunks]), a[-1])

        out.append(("torchtune 0.6.1", "ForwardKLWithChunkedOutputLoss", chunked(peer_chunked), "peer",
                    chunked(ours_chunked), chunked_in))
    if gjsd is not None:
        out.append(("TRL 1.16.0", "generalized_jsd_loss", lambda a, b, c: gjsd(a, b, c, 0.5, 2.0), "peer",
                    lambda a, b, c: trl.generalized_jsd_loss(a, b, c, 0.5, 2.0), logits_in))
    if td is not None:
        peer_kd = td("s", "o", "t", "o", 4.0, 0.5)
        ours_kd = torchdistill.KDLoss(temperature=4.0, alpha=0.5)
        targets = labels.clamp_min(0)
        out.append(("torchdistill 1.1.5", "KDLoss", lambda a, b: peer_kd({"s": {"o": a}}, {"t": {"o": b}}, targets),
                    "peer", lambda a, b: ours_kd(a, b, targets), [(s, True), (t, False)]))
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    out.append(("Liger-Kernel 0.8.5", "LigerJSD", lambda a, b, c: eager_jsd(a, b, c, 0.5), "eager equivalent",
                liger.LigerJSD(0.5), [(log_q, True), (log_p, False), (labels, False)]))
    kl_ref = torch.nn.KLDivLoss(reduction="batchmean")
    out.append(("Liger-Kernel 0.8.5", "LigerKLDIVLoss", kl_ref, "eager equivalent",
                liger.LigerKLDIVLoss(reduction="batchmean"), [(log_q, True), (log_p.exp(), False)]))
    if vocab <= 32000:
        hidden = 512
        h, w = torch.randn(rows, hidden, generator=g), torch.randn(vocab, hidden, generator=g) / 8
        th, tw = torch.randn(rows, hidden, generator=g), torch.randn(vocab, hidden, generator=g) / 8
        out.append(("Liger-Kernel 0.8.5", f"LigerFusedLinearJSD (H={hidden})",
                    lambda a, b, c, d, e: eager_fused_linear_jsd(a, b, c, d, e, 0.5, 2.0), "eager equivalent",
                    liger.LigerFusedLinearJSD(0.5, temperature=2.0),
                    [(h, True), (w, True), (th, False), (tw, False), (labels, False)]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--shapes", default=",".join(f"{r}x{v}" for r, v in SHAPES),
                        help="comma-separated ROWSxV (default: %(default)s)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--only", default="",
                        help="run only losses whose name contains this text; their rows replace those in the CSV")
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in item.split("x")) for item in args.shapes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, load average {load:.2f} at start")
    header = f"{'peer':<27} {'loss':<34} {'rows':>5} {'V':>7} {'peer ms':>9} {'kdfast ms':>9} {'speed-up':>8} agree"
    print(header)
    results = []
    for rows, vocab in shapes:
        for peer, name, peer_fn, kind, ours_fn, inputs in cases(rows, vocab):
            if args.only not in name:
                continue
            peer_ms, peer_value = step_ms(peer_fn, inputs, args.repeat)
            ours_ms, ours_value = step_ms(ours_fn, inputs, args.repeat)
            agree = abs(ours_value - peer_value) / max(abs(peer_value), 1e-30)
            label = peer if kind == "peer" else f"{peer} (eager)"
            print(f"{label:<27} {name:<34} {rows:>5} {vocab:>7} {peer_ms:>9.1f} {ours_ms:>9.1f} "
                  f"{peer_ms / ours_ms:>7.1f}x {agree:.1e}", flush=True)
            results.append(dict(peer=peer, loss=name, peer_side=kind, rows=rows, vocab=vocab, dtype="float32",
                                threads=torch.get_num_threads(), peer_ms=round(peer_ms, 2),
                                kdfast_ms=round(ours_ms, 2), speedup=round(peer_ms / ours_ms, 2),
                                rel_diff=f"{agree:.2e}", load_avg_start=round(load, 2)))
    print(f"# load average {os.getloadavg()[0]:.2f} at end")
    if not args.no_csv:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "compat_cpu.csv"
        if args.only and path.exists():
            with open(path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if args.only not in row["loss"]]
            results = kept + [{key: str(value) for key, value in row.items()} for row in results]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)

if __name__ == "__main__":
    main()
