"""On-policy distillation (GKD) with a hidden-state teacher: fused loss against materialised logits.

Prints two tables and appends their rows to benches/results/onpolicy_<device>.csv (`--out DIR`
changes the folder, `--no-csv` skips writing).

1. `loss`: the generalized JSD (β = 0.5, T = 1, TRL's convention: no T², mean over kept rows)
   forward + backward w.r.t. the student's hidden states and lm_head weight, on N rows,
   vocabulary V, student width H, teacher width H_t, float32; every 8th row unlabelled.
   - `kdfast-fused`: `fused_linear_kd_loss(hidden, weight, (teacher_hidden, teacher_weight))`:
     neither model's [N, V] logits exist;
   - `kdfast-logits`: both lm_heads as `F.linear`, then `kdfast.functional.kd_loss`;
   - `eager-torch`: both lm_heads, then the loss in plain PyTorch as TRL writes it
     (log_softmax, logsumexp mixture, `F.kl_div`), float32.
2. `step`: one on-policy training step with two small randomly initialised
   `transformers.LlamaForCausalLM`s: the student samples `--new-tokens` tokens after
   `--batch` prompts of `--prompt-len` tokens (Hugging Face `generate`, same seed for every
   provider, so the same tokens), then the loss above on the completions and its backward
   pass through the student. Providers as in 1, with the models' logits for the last two.
   `generate_ms` is the sampling part of the step.

Columns: median ms (`kdfast.benchmark.time_step`), peak memory one call holds beyond what
existed before it (peak resident set on the CPU, `kdfast.benchmark.measure_peak_extra_mb`),
the loss and its relative difference to the first provider's. Report times as ratios with the
CPU, the thread count and the load average stated (all three are printed and written).
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from kdfast import benchmark, functional
from kdfast.onpolicy import GenerationSettings, OnPolicyDistiller, generate, hidden_and_head

CSV_COLUMNS = ["date", "machine", "commit", "threads", "load", "table", "shape", "provider", "ms", "generate_ms",
               "repeats", "peak_extra_mb", "loss", "loss_rel_diff"]
BETA = 0.5


def eager_gjsd(student_logits, teacher_logits, labels, beta=BETA):
    """TRL's generalized JSD in plain PyTorch (float32), mean over rows whose label is not -100."""
    log_q = F.log_softmax(student_logits.float(), -1)
    log_p = F.log_softmax(teacher_logits.float(), -1)
    b = torch.tensor(beta)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(-b), log_p + torch.log(b)]), 0)
    rows = (beta * F.kl_div(log_m, log_p, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True)).sum(-1)
    keep = labels != -100
    return rows[keep].sum() / keep.sum().clamp_min(1)


def loss_providers():
    options = dict(divergence="jsd", beta=BETA, t2_scale=False)

    def fused(h, w, th, tw, labels):
        return functional.fused_linear_kd_loss(h, w, (th, tw), labels, **options)

    def logits(h, w, th, tw, labels):
        with torch.no_grad():
            teacher = F.linear(th, tw)
        return functional.kd_loss(F.linear(h, w), teacher, labels, **options)

    def eager(h, w, th, tw, labels):
        with torch.no_grad():
            teacher = F.linear(th, tw)
        return eager_gjsd(F.linear(h, w), teacher, labels)

    return {"kdfast-fused": fused, "kdfast-logits": logits, "eager-torch": eager}


def measure(step, repeats_budget):
    loss = step()
    ms, repeats = benchmark.time_step(step, "cpu", warmup=1, max_repeats=10, min_repeats=3, budget_s=repeats_budget)
    peak = benchmark.measure_peak_extra_mb(step, "cpu")
    return float(loss), ms, repeats, peak


def loss_table(args):
    g = torch.Generator().manual_seed(0)
    n, v, h, ht = args.rows, args.vocab, args.hidden, args.teacher_hidden
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).requires_grad_()
    teacher_hidden, teacher_weight = torch.randn(n, ht, generator=g), torch.randn(v, ht, generator=g) * ht ** -0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::8] = -100
    rows = []
    for name, fn in loss_providers().items():
        def step():
            hidden.grad = weight.grad = None
            loss = fn(hidden, weight, teacher_hidden, teacher_weight, labels)
            loss.backward()
            return loss.detach()

        loss, ms, repeats, peak = measure(step, args.budget)
        rows.append(dict(provider=name, ms=ms, repeats=repeats, peak_extra_mb=peak, loss=loss, generate_ms=None))
    return f"N={n} V={v} H={h} H_t={ht} float32 gjsd beta={BETA}", rows


def llama(vocab, hidden, layers, seed, length):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                                      num_key_value_heads=max(1, hidden // 32), max_position_embeddings=length)
    return transformers.LlamaForCausalLM(config)


def step_table(args):
    length = args.prompt_len + args.new_tokens
    student = llama(args.vocab, args.hidden, args.layers, 1, length)
    teacher = llama(args.vocab, args.teacher_hidden, args.layers, 2, length).requires_grad_(False)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    batch = {"prompts": prompts, "prompt_attention_mask": torch.ones_like(prompts)}
    settings = GenerationSettings(max_new_tokens=args.new_tokens, temperature=1.0)
    sample_ms, _ = benchmark.time_step(lambda: generate(student, prompts, None, settings, 0), "cpu", warmup=1,
                                       max_repeats=5, min_repeats=3, budget_s=args.budget)
    rows = []
    for name, fn in loss_providers().items():
        def step():
            distiller = OnPolicyDistiller(lmbda=1.0, beta=BETA, generation=settings, seed=0)
            prepared, _ = distiller.prepare(student, teacher, batch)
            inputs = {"input_ids": prepared["input_ids"], "attention_mask": prepared["attention_mask"]}
            labels = prepared["labels"][:, 1:]
            student.zero_grad(set_to_none=True)
            h, w, _, _, _ = hidden_and_head(student, inputs)
            with torch.no_grad():
                th, tw, _, _, _ = hidden_and_head(teacher, inputs)
            if name == "kdfast-fused":
                loss = fn(h[:, :-1], w, th[:, :-1], tw, labels)
            else:  # the models' own logits, as a plain training loop gets them
                s = student(**inputs).logits[:, :-1]
                with torch.no_grad():
                    t = teacher(**inputs).logits[:, :-1]
                loss = (functional.kd_loss(s, t, labels, divergence="jsd", beta=BETA, t2_scale=False)
                        if name == "kdfast-logits" else eager_gjsd(s, t, labels))
            loss.backward()
            return loss.detach()

        loss, ms, repeats, peak = measure(step, args.budget)
        rows.append(dict(provider=name, ms=ms, repeats=repeats, peak_extra_mb=peak, loss=loss, generate_ms=sample_ms))
    shape = (f"B={args.batch} prompt={args.prompt_len} new={args.new_tokens} V={args.vocab} H={args.hidden} "
             f"H_t={args.teacher_hidden} layers={args.layers} float32")
    return shape, rows


def print_table(title, shape, rows):
    first = rows[0]
    print(f"\n{title}: {shape}")
    print(f"{'provider':<15}{'ms':>10}{'x fused':>9}{'generate ms':>13}{'peak MB':>10}{'loss':>12}{'rel diff':>10}")
    for r in rows:
        r["loss_rel_diff"] = abs(r["loss"] - first["loss"]) / abs(first["loss"])
        peak = "n/a" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
        gen = "" if r["generate_ms"] is None else f"{r['generate_ms']:.0f}"
        print(f"{r['provider']:<15}{r['ms']:>10.1f}{r['ms'] / first['ms']:>9.2f}{gen:>13}{peak:>10}"
              f"{r['loss']:>12.6f}{r['loss_rel_diff']:>10.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="loss table: rows N")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary V (both tables)")
    parser.add_argument("--hidden", type=int, default=256, help="student width H")
    parser.add_argument("--teacher-hidden", type=int, default=512, help="teacher width H_t")
    parser.add_argument("--layers", type=int, default=2, help="step table: layers of both models")
    parser.add_argument("--batch", type=int, default=4, help="step table: prompts per batch")
    parser.add_argument("--prompt-len", type=int, default=64, help="step table: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="step table: sampled tokens per prompt")
    parser.add_argument("--tables", default="loss,step", help="which tables: loss, step or both")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed calls per measurement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    benchmark.malloc_for_timing()
    machine, load = benchmark.machine_name("cpu"), benchmark.load_average()
    print(f"on-policy KD, {machine}, {torch.get_num_threads()} threads, load average {load:.2f} at start")
    records = []
    for table in [t for t in args.tables.split(",") if t]:
        shape, rows = (loss_table if table == "loss" else step_table)(args)
        print_table(table, shape, rows)
        records += [dict(r, table=table, shape=shape) for r in rows]
    if args.no_csv or not records:
        return
    common = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine,
                  commit=benchmark.git_commit(), threads=torch.get_num_threads(), load=f"{load:.2f}")
    path = benchmark.append_csv([dict(r, **common) for r in records], Path(args.out) / "onpolicy_cpu.csv",
                                columns=CSV_COLUMNS)
    print(f"rows appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
