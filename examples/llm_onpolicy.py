"""On-policy distillation (GKD) of a small Llama-style teacher into a smaller student, on CPU.

Builds on examples/llm_distill.py (same local corpus: the standard library's Python sources,
same byte-level BPE tokenizer cached in `--out`, same randomly initialised
`transformers.LlamaForCausalLM`s and training loop). Each window of `--seq-len` tokens is a
prompt (its first `--prompt-len` tokens) and a reference completion (the rest). The teacher
is trained once (seed 0) with cross-entropy; then for every seed the student (same
initialisation per seed) is trained three ways for the same steps and window order, always
with the loss on completion positions only:
- alone: next-token cross-entropy on the reference completions;
- off-policy KD: GKD's generalized JSD (β = `--beta`, TRL's convention) on the reference
  completions (`kdfast.onpolicy.OnPolicyDistiller` with lmbda = 0);
- on-policy KD: the same loss, but with probability `--lmbda` the batch is replaced by the
  student's own sampled completions of the prompts (`OnPolicyDistiller(lmbda=...)`).
The KD losses are computed from both models' last hidden states and lm_head weights
(`fused_linear_kd_loss`, no `[tokens, V]` logits). The table reports validation
cross-entropy over whole validation windows (nats/token) and perplexity, mean ± sample std
over seeds; the teacher's cross-entropy on the trained student's sampled completions of
`--sample-windows` validation prompts (how likely the teacher finds what the student writes,
the quantity on-policy training aims at); training seconds per run and how many batches the
student generated.
`--smoke` is a seconds-long CI configuration whose numbers are not meaningful (it says so).

Needs `transformers` and `tokenizers` (the `examples` extra). The same seeds and `--threads`
give the same numbers on the same machine; the timings vary.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Dict, Optional, Sequence

import torch
from torch.nn import functional as F

from kdfast.onpolicy import GenerationSettings, OnPolicyDistiller, generate
from kdfast.trainer import seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import SMOKE_NOTE, markdown_table, require, require_at_least_one, write_results  # noqa: E402
from llm_distill import (  # noqa: E402
    make_model,
    mean_std,
    parameter_count,
    stdlib_corpus,
    token_windows,
    train,
    train_tokenizer,
    validation_ce,
)


def prompt_batch(ids: torch.Tensor, prompt_len: int) -> Dict[str, torch.Tensor]:
    """Windows `[B, L]` as a batch: prompts (first `prompt_len` tokens), the whole window, labels on the rest."""
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return {"prompts": ids[:, :prompt_len], "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": labels}


@torch.no_grad()
def teacher_ce_of_samples(student, teacher, windows: torch.Tensor, prompt_len: int,
                          generation: GenerationSettings, seed: int = 0) -> float:
    """The teacher's mean cross-entropy (nats/token) on the student's sampled completions of the
    windows' prompts: how likely the teacher finds what the student writes (lower is closer)."""
    total, count = 0.0, 0
    for start in range(0, len(windows), 16):
        prompts = windows[start:start + 16, :prompt_len]
        sequences = generate(student, prompts, None, generation, seed + start)
        logits = teacher(input_ids=sequences).logits[:, prompt_len - 1:-1]
        targets = sequences[:, prompt_len:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                 reduction="sum").item()
        count += targets.numel()
    return total / count


def no_eos(model):
    """The corpus has no end-of-sequence token: completions always run to their full length."""
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    return model


def run(args) -> Dict[str, object]:
    started = time.perf_counter()
    train_texts, validation_texts = stdlib_corpus(int(args.corpus_mb * 1e6))
    tokenizer = train_tokenizer(train_texts, args.vocab_size, args.out)
    vocab_size = tokenizer.get_vocab_size()
    train_windows = token_windows(tokenizer, train_texts, args.seq_len)
    keep = torch.randperm(len(train_windows), generator=torch.Generator().manual_seed(0))[:args.train_windows]
    train_windows = train_windows[keep.sort().values]
    validation_windows = token_windows(tokenizer, validation_texts, args.seq_len)[:args.max_validation_windows]
    print(f"tokenizer: {vocab_size} tokens; {train_windows.numel():,} training and {validation_windows.numel():,} "
          f"validation tokens ({time.perf_counter() - started:.1f} s)", flush=True)

    seed_everything(0)
    teacher = no_eos(make_model(vocab_size, args.teacher_hidden, args.teacher_layers, 0, args.seq_len))

    def whole_window_ce(model, index):
        ids = train_windows[index]
        logits = model(input_ids=ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, vocab_size), ids[:, 1:].reshape(-1))

    teacher_seconds = train(teacher, train_windows, args.teacher_steps, args.batch_size, args.lr, 0, whole_window_ce)
    teacher.requires_grad_(False)
    teacher_ce = validation_ce(teacher, validation_windows)
    print(f"teacher: {parameter_count(teacher):,} parameters, validation CE {teacher_ce:.3f} "
          f"({teacher_seconds:.1f} s)", flush=True)

    generation = GenerationSettings(max_new_tokens=args.seq_len - args.prompt_len,
                                    temperature=args.generation_temperature)

    def completion_ce(model, index):
        batch = prompt_batch(train_windows[index], args.prompt_len)
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, vocab_size), batch["labels"][:, 1:].reshape(-1))

    def kd(distiller):
        def step_loss(model, index):
            loss, _, _ = distiller.step(model, teacher, prompt_batch(train_windows[index], args.prompt_len))
            return loss
        return step_loss

    rows = []
    for seed in args.seeds:
        row: Dict[str, object] = {"seed": seed}
        for name, lmbda in (("alone", None), ("off_policy", 0.0), ("on_policy", args.lmbda)):
            student = no_eos(make_model(vocab_size, args.student_hidden, args.student_layers, 1000 + seed,
                                        args.seq_len))
            distiller = None if lmbda is None else OnPolicyDistiller(
                lmbda=lmbda, beta=args.beta, generation=generation, fused=True, seed=seed)
            loss = completion_ce if distiller is None else kd(distiller)
            seconds = train(student, train_windows, args.student_steps, args.batch_size, args.lr, seed, loss)
            row[name] = validation_ce(student, validation_windows)
            row[f"{name}_sample_ce"] = teacher_ce_of_samples(student, teacher, validation_windows[:args.sample_windows],
                                                             args.prompt_len, generation)
            row[f"{name}_seconds"] = seconds
            row[f"{name}_generated"] = 0 if distiller is None else distiller.counts["student"]
            row["student_parameters"] = parameter_count(student)
        rows.append(row)
        print(f"seed {seed}: validation CE alone {row['alone']:.3f}  off-policy KD {row['off_policy']:.3f}  "
              f"on-policy KD {row['on_policy']:.3f} ({row['on_policy_generated']} generated batches); teacher CE of "
              f"samples {row['alone_sample_ce']:.3f} / {row['off_policy_sample_ce']:.3f} / "
              f"{row['on_policy_sample_ce']:.3f}", flush=True)
    return {"vocab_size": vocab_size, "teacher_ce": teacher_ce, "teacher_parameters": parameter_count(teacher),
            "teacher_seconds": teacher_seconds, "tokens": train_windows.numel(),
            "validation_tokens": validation_windows.numel(), "seeds": rows,
            "seconds": time.perf_counter() - started}


def format_table(args, result: Dict[str, object]) -> str:
    rows = result["seeds"]
    table = [[f"teacher ({args.teacher_layers}×{args.teacher_hidden}, seed 0)", f"{result['teacher_parameters']:,}",
              f"{result['teacher_ce']:.3f}", f"{math.exp(result['teacher_ce']):.1f}", "–",
              f"{result['teacher_seconds']:.1f}", "–"]]
    for label, key in (("student alone (CE on completions)", "alone"),
                       (f"student, off-policy KD (GKD β={args.beta:g})", "off_policy"),
                       (f"student, on-policy KD (GKD β={args.beta:g}, λ={args.lmbda:g})", "on_policy")):
        values = [r[key] for r in rows]
        table.append([label, f"{rows[0]['student_parameters']:,}", mean_std(values),
                      mean_std([math.exp(v) for v in values], 1), mean_std([r[key + "_sample_ce"] for r in rows]),
                      f"{statistics.fmean(r[key + '_seconds'] for r in rows):.1f}",
                      f"{statistics.fmean(r[key + '_generated'] for r in rows):.1f}"])
    header = [f"model (V = {result['vocab_size']:,})", "parameters",
              f"validation CE (nats/token), {len(rows)} seed(s)", "perplexity", "teacher CE of student samples",
              "train s/run",
              f"generated batches of {args.student_steps}"]
    return markdown_table(header, table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: %(default)s)")
    parser.add_argument("--corpus-mb", type=float, default=2.0,
                        help="MB of standard-library source to read (default: %(default)g)")
    parser.add_argument("--seq-len", type=int, default=48, help="tokens per window (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=16,
                        help="prompt tokens at the start of each window (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step (default: %(default)s)")
    parser.add_argument("--train-windows", type=int, default=1024,
                        help="training windows kept, a seeded random subset (default: %(default)s)")
    parser.add_argument("--max-validation-windows", type=int, default=128,
                        help="validation windows scored (default: %(default)s)")
    parser.add_argument("--sample-windows", type=int, default=64,
                        help="validation prompts the trained students complete for the teacher to score "
                             "(default: %(default)s)")
    parser.add_argument("--teacher-hidden", type=int, default=128, help="teacher hidden size (default: %(default)s)")
    parser.add_argument("--teacher-layers", type=int, default=2, help="teacher layers (default: %(default)s)")
    parser.add_argument("--student-hidden", type=int, default=64, help="student hidden size (default: %(default)s)")
    parser.add_argument("--student-layers", type=int, default=1, help="student layers (default: %(default)s)")
    parser.add_argument("--teacher-steps", type=int, default=500, help="teacher training steps (default: %(default)s)")
    parser.add_argument("--student-steps", type=int, default=300,
                        help="training steps of each student run (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="peak AdamW learning rate, warm-up then cosine decay (default: %(default)g)")
    parser.add_argument("--beta", type=float, default=0.5,
                        help="generalized JSD weight: 0 forward KL, 1 reverse KL (default: %(default)g)")
    parser.add_argument("--lmbda", type=float, default=0.5,
                        help="probability that an on-policy batch is sampled by the student (default: %(default)g)")
    parser.add_argument("--generation-temperature", type=float, default=1.0,
                        help="sampling temperature of the student's completions (default: %(default)g)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="student seeds to run and average over (default: 0 1 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; losses repeat exactly for the same value (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join("runs", "llm_onpolicy"),
                        help="output directory: tokenizer cache and results.json (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long CI configuration: 512-token vocabulary, 80 kB of source, a few steps; "
                             "its numbers are not meaningful")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.vocab_size, args.corpus_mb, args.seq_len, args.prompt_len, args.batch_size = 512, 0.08, 16, 6, 4
        args.max_validation_windows, args.teacher_hidden, args.student_hidden = 16, 32, 32
        args.teacher_steps, args.student_steps, args.seeds, args.train_windows = 3, 4, [0], 64
        args.sample_windows = 8
    require_at_least_one(args, ("vocab_size", "seq_len", "prompt_len", "batch_size", "teacher_hidden", "teacher_layers",
                                "student_hidden", "student_layers", "teacher_steps", "student_steps", "threads",
                                "max_validation_windows", "train_windows", "sample_windows"))
    if args.prompt_len >= args.seq_len:
        raise SystemExit(f"--prompt-len ({args.prompt_len}) must be below --seq-len ({args.seq_len})")
    if not (0 <= args.beta <= 1 and 0 <= args.lmbda <= 1 and args.generation_temperature >= 0 and args.corpus_mb > 0):
        raise SystemExit("need --beta and --lmbda in [0, 1], --generation-temperature >= 0 and --corpus-mb > 0")
    for module in ("transformers", "tokenizers"):
        require(module, "examples", ["transformers", "tokenizers"], "llm_onpolicy.py")
    torch.set_num_threads(args.threads)
    if args.smoke:
        print(SMOKE_NOTE, flush=True)
    os.makedirs(args.out, exist_ok=True)
    result = run(args)
    note = f"{SMOKE_NOTE}\n" if args.smoke else ""
    print(f"\n{result['seconds']:.0f} s on {args.threads} thread(s)\n{note}{format_table(args, result)}")
    write_results(args, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
