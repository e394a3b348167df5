"""Fused linear KD (`fused_linear_kd_loss`) against materialising the logits, side by side.

Prints a table and appends rows to benches/results/fused_linear_<device>.csv (`--out DIR`
changes the folder, `--no-csv` skips writing). One training step = forward + backward of
the loss w.r.t. the student's hidden states and lm_head weight; parameter gradients are
set to None before each step (optimizer.zero_grad()'s default). Providers:
- `kdfast-fused`: `kdfast.functional.fused_linear_kd_loss` (chunked; the teacher's logits too
  when the teacher is given as hidden states + weight).
- `eager`: `F.linear` for the student (and the teacher, under no_grad), then
  `kdfast.functional.kd_loss` on the whole [N, V] logits.
- `eager-torch`: the same with the loss written in torch.nn.functional (kdfast.benchmark.eager_kd_loss).
- `liger-fused-jsd`, `liger-chunked-jsd` (CUDA, when liger_kernel imports; divergence jsd):
  `liger_kernel.transformers.LigerFusedLinearJSD` and `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`.
Columns: median ms per step; peak memory one step holds beyond what existed before it
(`kdfast.benchmark.measure_peak_extra_mb`), and the same minus the gradients the step must
produce (grad_hidden, grad_weight: "above parameter gradients"); TFLOP/s for the
2·N·V·(3·H + H_t) flops of a step (student forward, grad_hidden, grad_weight, teacher forward;
H_t = 0 for a logits teacher); on CUDA the ratio to the measured bf16/fp16 matmul throughput.
Presets: `--preset cpu` (N=1024, V=32000, H=512, fp32, logits teacher, the CPU target) and
`--preset llm` (N=8192, V=128256, H=2048, H_t=4096, bf16, hidden-state teacher, the GPU target).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from kdfast import benchmark, functional

PRESETS = {
    "cpu": dict(rows=1024, vocab=32000, hidden=512, teacher_hidden=0, dtype="float32", device="cpu"),
    "llm": dict(rows=8192, vocab=128256, hidden=2048, teacher_hidden=4096, dtype="bfloat16", device="cuda"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CSV_COLUMNS = ["date", "machine", "commit", "threads", "shape", "provider", "ms", "repeats", "peak_extra_mb",
               "above_gradients_mb", "tflops", "matmul_fraction", "loss", "loss_rel_diff"]


class Unavailable(Exception):
    pass


def make_inputs(args, device, dtype):
    generator = torch.Generator(device="cpu").manual_seed(0)
    n, v, h, ht = args.rows, args.vocab, args.hidden, args.teacher_hidden

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    hidden = randn(n, h).requires_grad_()
    weight = randn(v, h, scale=h ** -0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=generator).to(device)
    if ht:
        teacher = (randn(n, ht), randn(v, ht, scale=ht ** -0.5))
    else:
        teacher = randn(n, v, scale=2.0)
    return hidden, weight, teacher, labels


def loss_options(args):
    return dict(divergence=args.divergence, temperature=args.temperature, alpha=args.alpha,
                t2_scale=not args.liger_convention)


def teacher_logits(teacher):
    if isinstance(teacher, tuple):
        with torch.no_grad():
            return F.linear(*teacher)
    return teacher


def provider(name, args):
    options = loss_options(args)
    if name == "kdfast-fused":
        def step(hidden, weight, teacher, labels):
            return functional.fused_linear_kd_loss(hidden, weight, teacher, labels, chunk_size=args.chunk_size,
                                                   **options)
        return step
    if name == "eager":
        def step(hidden, weight, teacher, labels):
            return functional.kd_loss(F.linear(hidden, weight), teacher_logits(teacher), labels, **options)
        return step
    if name == "eager-torch":
        def step(hidden, weight, teacher, labels):
            return benchmark.eager_kd_loss(F.linear(hidden, weight), teacher_logits(teacher), labels, **options)
        return step
    if name.startswith("liger"):
        return liger_provider(name, args)
    raise ValueError(f"unknown provider {name!r}")


def liger_provider(name, args):
    if args.device != "cuda":
        raise Unavailable("Liger-Kernel runs on CUDA only")
    if args.divergence != "jsd" or args.alpha != 0 or not args.teacher_hidden:
        raise Unavailable("the Liger comparison needs --divergence jsd --alpha 0 and a hidden-state teacher")
    try:
        if name == "liger-fused-jsd":
            from liger_kernel.transformers import LigerFusedLinearJSD

            module = LigerFusedLinearJSD(jsd_beta=args.beta, temperature=args.temperature)

            def step(hidden, weight, teacher, labels):
                return module(hidden, weight, teacher[0], teacher[1], None)  # shift_labels: none ignored
            return step
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        parameters = inspect.signature(LigerFusedLinearJSDLoss.__init__).parameters
        kwargs = dict(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=args.beta, temperature=args.temperature)
        module = LigerFusedLinearJSDLoss(**{k: v for k, v in kwargs.items() if k in parameters})

        def step(hidden, weight, teacher, labels):
            return module(hidden, weight, teacher[0], teacher[1], labels)
        return step
    except Exception as error:  # ImportError, or Triton failing to initialise
        raise Unavailable(f"liger_kernel not usable ({type(error).__name__}: {error})") from None


def matmul_tflops(args, device, dtype):
    """Measured throughput of one [N, H] x [H, V] matmul in the benchmark's dtype."""
    a = torch.randn(args.rows, args.hidden, device=device, dtype=dtype)
    b = torch.randn(args.hidden, args.vocab, device=device, dtype=dtype)
    ms, _ = benchmark.time_step(lambda: a @ b, args.device, budget_s=1.0)
    return 2 * args.rows * args.hidden * args.vocab / (ms * 1e-3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default=None)
    parser.add_argument("--rows", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--teacher-hidden", type=int, help="0 = the teacher is given as logits")
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--divergence", default=None, help="default: forward_kl (cpu preset), jsd (llm preset)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.0)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--providers", default="kdfast-fused,eager,eager-torch,liger-fused-jsd,liger-chunked-jsd")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.divergence is None:
        args.divergence = "jsd" if args.preset == "llm" else "forward_kl"
    # Liger's JSD has no T² factor: match it so the losses are the same number
    args.liger_convention = args.divergence == "jsd" and args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.device == "cpu":
        benchmark.malloc_for_timing()
    inputs = make_inputs(args, device, dtype)
    hidden, weight = inputs[0], inputs[1]
    gradient_mb = (hidden.numel() + weight.numel()) * hidden.element_size() / 1e6
    flops = 2 * args.rows * args.vocab * (3 * args.hidden + args.teacher_hidden)
    peak_matmul = matmul_tflops(args, device, dtype) if args.device == "cuda" else None
    rows, reference_loss = [], None
    for name in [p for p in args.providers.split(",") if p]:
        try:
            loss_fn = provider(name, args)
        except Unavailable as error:
            print(f"{name}: skipped ({error})")
            continue

        def step():
            hidden.grad = weight.grad = None
            loss = loss_fn(*inputs)
            loss.backward()
            return loss.detach()

        try:
            loss = step()
            ms, repeats = benchmark.time_step(step, args.device, budget_s=3.0)
            hidden.grad = weight.grad = None
            peak = benchmark.measure_peak_extra_mb(step, args.device)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            print(f"{name}: failed ({type(error).__name__}: {str(error)[:200]})")
            continue
        reference_loss = float(loss) if reference_loss is None else reference_loss
        tflops = flops / (ms * 1e-3) / 1e12
        rows.append(dict(provider=name, ms=ms, repeats=repeats, peak_extra_mb=peak,
                         above_gradients_mb=None if peak is None else peak - gradient_mb, tflops=tflops,
                         matmul_fraction=None if peak_matmul is None else tflops / peak_matmul,
                         loss=float(loss), loss_rel_diff=abs(float(loss) - reference_loss) / abs(reference_loss)))
    fused = next((r for r in rows if r["provider"] == "kdfast-fused"), None)
    shape = (f"N={args.rows} V={args.vocab} H={args.hidden} H_t={args.teacher_hidden} {args.dtype} "
             f"{args.divergence} chunk={args.chunk_size or 'default'}")
    print(f"\nfused linear KD, {benchmark.machine_name(args.device)}, {torch.get_num_threads()} threads, {shape}")
    if peak_matmul:
        print(f"measured {args.dtype} matmul throughput: {peak_matmul:.1f} TFLOP/s")
    print(f"{'provider':<20}{'ms':>10}{'x fused':>9}{'peak MB':>10}{'above grads MB':>16}{'TFLOP/s':>9}"
          f"{'rel diff':>10}")
    for r in rows:
        ratio = r["ms"] / fused["ms"] if fused else float("nan")
        peak = "n/a" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
        above = "n/a" if r["above_gradients_mb"] is None else f"{r['above_gradients_mb']:.0f}"
        print(f"{r['provider']:<20}{r['ms']:>10.2f}{ratio:>9.2f}{peak:>10}{above:>16}{r['tflops']:>9.2f}"
              f"{r['loss_rel_diff']:>10.1e}")
    if args.no_csv or not rows:
        return
    common = dict(machine=benchmark.machine_name(args.device), commit=benchmark.git_commit(),
                  threads=torch.get_num_threads(), shape=shape)
    records = [dict(r, date=datetime.datetime.now().isoformat(timespec="seconds"), **common) for r in rows]
    path = benchmark.append_csv(records, Path(args.out) / f"fused_linear_{args.device}.csv", columns=CSV_COLUMNS)
    print(f"rows appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
