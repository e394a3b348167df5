"""Cross-tokenizer LM distillation: a teacher and a student with different BPE vocabularies.

The teacher and the student read the same text through two byte-level BPE tokenizers of
different sizes (default 32,768 and 8,192 tokens), both trained locally on the corpus of
`llm_distill.py` (the Python standard library's sources; every tenth file held out), so no
column of the teacher's logits corresponds to a column of the student's and `kd_loss` does not
apply. The training data are text pieces of `--piece-chars` characters (a seeded subset of
`--train-pieces`), each tokenized by both tokenizers, truncated to `--max-tokens` tokens. The
teacher (a `transformers.LlamaForCausalLM` over its vocabulary) is trained once with
cross-entropy; then for every seed the student (same initialisation per seed) is trained two
ways for the same steps and data order:
- alone: next-token cross-entropy on its own tokens;
- ULD KD: that cross-entropy plus `--uld-weight` × `kdfast.uld_loss` (Universal Logit
  Distillation: the L1 distance of the two sorted probability vectors) between the student's
  and the live teacher's predictions of the same byte span. The pieces are encoded with byte
  offsets and paired once, for the whole training set, by
  `kdfast.integrations.cross_tokenizer` (`encode_with_offsets`, `span_pairs`: the spans of
  `kdfast.alignment.align_byte_offsets`, no per-token Python loop); a pair of rows is the
  prediction of a closed span's first token on both sides, where both models have read the
  same bytes.
The table reports the student's validation cross-entropy (nats per student token; the same
tokenizer for both student rows, so they compare) and bits per byte, mean ± sample std over
seeds. A loss benchmark at the training shape compares `kdfast.uld_loss` (exact, and top-`k`)
with the same loss written in plain PyTorch with two full sorts: median forward+backward time
and peak extra memory. `--smoke` is a seconds-long CI configuration whose numbers are not
meaningful (it says so in its output).

Needs: Hugging Face `transformers` and `tokenizers` (the `examples` extra). Two runs with the
same seeds and `--threads` print the same cross-entropies on the same machine.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

import kdfast
from kdfast.benchmark import measure_peak_extra_mb, time_step
from kdfast.integrations.cross_tokenizer import cross_tokenizer_kd_loss, encode_with_offsets, span_pairs
from kdfast.trainer import seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import SMOKE_NOTE, markdown_table, require, require_at_least_one, significant, write_results  # noqa: E402
from llm_distill import (  # noqa: E402
    make_model,
    mean_std,
    parameter_count,
    stdlib_corpus,
    train,
    train_tokenizer,
)

# --------------------------------------------------------------------------------------
# Data: text pieces, both tokenizations, the span pairs
# --------------------------------------------------------------------------------------


def text_pieces(texts: Sequence[str], chars: int) -> List[str]:
    """Consecutive `chars`-character pieces of every text (a shorter last piece is dropped)."""
    return [text[start:start + chars] for text in texts for start in range(0, len(text) - chars + 1, chars)]


def masked_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token labels: position i is scored against token i+1; padding and the last are -100."""
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    mask = mask.bool()
    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    return labels.masked_fill(~next_mask, -100)


# --------------------------------------------------------------------------------------
# Loss benchmark: kdfast.uld_loss against plain PyTorch with two sorts
# --------------------------------------------------------------------------------------


def plain_uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """ULD as written with PyTorch ops: both softmaxes sorted in full, zero-padded, L1, mean."""
    student = F.softmax(student_logits.float(), dim=-1).sort(dim=-1, descending=True).values
    teacher = F.softmax(teacher_logits.float(), dim=-1).sort(dim=-1, descending=True).values
    width = max(student.shape[-1], teacher.shape[-1])
    student = F.pad(student, (0, width - student.shape[-1]))
    teacher = F.pad(teacher, (0, width - teacher.shape[-1]))
    return (student - teacher).abs().sum(-1).mean()


def benchmark_uld(rows: int, student_vocab: int, teacher_vocab: int, k: int) -> List[Dict[str, object]]:
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(rows, student_vocab, generator=generator)).requires_grad_(True)
    teacher = 3 * torch.randn(rows, teacher_vocab, generator=generator)
    cases = [("plain PyTorch (two sorts)", lambda: plain_uld(student, teacher)),
             ("kdfast uld_loss, exact", lambda: kdfast.uld_loss(student, teacher)),
             (f"kdfast uld_loss, top-{k}", lambda: kdfast.uld_loss(student, teacher, k=k))]
    results = []
    for name, loss_fn in cases:
        def step():
            (gradient,) = torch.autograd.grad(loss_fn(), student)
            return gradient

        milliseconds, _ = time_step(step, "cpu", warmup=1, max_repeats=5, min_repeats=3, budget_s=1.0)
        results.append({"loss": name, "ms": milliseconds, "peak_extra_mb": measure_peak_extra_mb(step, "cpu")})
    return results


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def run(args) -> Dict[str, object]:
    started = time.perf_counter()
    train_texts, validation_texts = stdlib_corpus(int(args.corpus_mb * 1e6))
    teacher_tokenizer = train_tokenizer(train_texts, args.teacher_vocab, args.out)
    student_tokenizer = train_tokenizer(train_texts, args.student_vocab, args.out)
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab_size(), student_tokenizer.get_vocab_size()
    pieces = text_pieces(train_texts, args.piece_chars)
    keep = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(0))[:args.train_pieces]
    pieces = [pieces[int(i)] for i in keep.sort().values]
    validation_pieces = text_pieces(validation_texts, args.piece_chars)[:args.max_validation_pieces]
    student_data = encode_with_offsets(student_tokenizer, pieces, args.max_tokens)
    teacher_data = encode_with_offsets(teacher_tokenizer, pieces, args.max_tokens)
    validation = encode_with_offsets(student_tokenizer, validation_pieces, args.max_tokens)
    align_started = time.perf_counter()
    pairs = span_pairs(student_data["offsets"], teacher_data["offsets"], student_data["attention_mask"],
                       teacher_data["attention_mask"])
    align_seconds = time.perf_counter() - align_started
    used_pairs = int((pairs[..., 0] >= 0).sum())
    print(f"tokenizers: teacher {teacher_vocab}, student {student_vocab} tokens; {len(pieces)} training pieces, "
          f"{int(student_data['attention_mask'].sum()):,} student / {int(teacher_data['attention_mask'].sum()):,} "
          f"teacher tokens, "
          f"{used_pairs:,} aligned span pairs (aligned in {align_seconds:.2f} s; "
          f"{time.perf_counter() - started:.1f} s so far)", flush=True)

    def cross_entropy_of(data):
        def loss(model, index):
            ids, mask = data["input_ids"][index], data["attention_mask"][index]
            logits = model(input_ids=ids, attention_mask=mask).logits
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), masked_labels(ids, mask).reshape(-1),
                                   ignore_index=-100)
        return loss

    seed_everything(0)
    teacher = make_model(teacher_vocab, args.teacher_hidden, args.teacher_layers, 0, args.max_tokens)
    teacher_seconds = train(teacher, teacher_data["input_ids"], args.teacher_steps, args.batch_size, args.lr, 0,
                            cross_entropy_of(teacher_data))
    teacher.requires_grad_(False)
    print(f"teacher: {parameter_count(teacher):,} parameters ({teacher_seconds:.1f} s)", flush=True)
    student_cross_entropy = cross_entropy_of(student_data)

    def uld_kd(model, index):
        ids, mask = student_data["input_ids"][index], student_data["attention_mask"][index]
        logits = model(input_ids=ids, attention_mask=mask).logits
        ce = F.cross_entropy(logits.reshape(-1, student_vocab), masked_labels(ids, mask).reshape(-1),
                             ignore_index=-100)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=teacher_data["input_ids"][index],
                                     attention_mask=teacher_data["attention_mask"][index]).logits
        return ce + args.uld_weight * cross_tokenizer_kd_loss(logits, teacher_logits, pairs[index], k=args.k or None)

    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for name, loss in (("alone", student_cross_entropy), ("uld", uld_kd)):
            student = make_model(student_vocab, args.student_hidden, args.student_layers, 1000 + seed,
                                 args.max_tokens)
            row[f"{name}_seconds"] = train(student, student_data["input_ids"], args.student_steps, args.batch_size,
                                           args.lr, seed, loss)
            row[name], row[f"{name}_bits_per_byte"] = validation_scores(student, validation, validation_pieces)
            row["student_parameters"] = parameter_count(student)
        rows.append(row)
        print(f"seed {seed}: validation CE alone {row['alone']:.3f}  ULD KD {row['uld']:.3f}", flush=True)
    rows_per_step = max(1, round(used_pairs / len(pieces) * args.batch_size))
    bench = benchmark_uld(rows_per_step, student_vocab, teacher_vocab, args.bench_k)
    return {"teacher_vocab": teacher_vocab, "student_vocab": student_vocab,
            "teacher_parameters": parameter_count(teacher), "teacher_seconds": teacher_seconds,
            "pieces": len(pieces), "span_pairs": used_pairs, "align_seconds": align_seconds,
            "bench_rows": rows_per_step, "seeds": rows, "benchmark": bench, "seconds": time.perf_counter() - started}


@torch.no_grad()
def validation_scores(model, data: Dict[str, torch.Tensor], pieces: Sequence[str],
                      batch_size: int = 16) -> Tuple[float, float]:
    """(nats per predicted student token, bits per byte of the predicted tokens' text)."""
    model.eval()
    total, count, nbytes = 0.0, 0, 0
    for start in range(0, len(data["input_ids"]), batch_size):
        ids, mask = data["input_ids"][start:start + batch_size], data["attention_mask"][start:start + batch_size]
        logits = model(input_ids=ids, attention_mask=mask).logits
        labels = masked_labels(ids, mask)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                 ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
        offsets = data["offsets"][start:start + batch_size]
        # bytes of the predicted tokens: from the end of the first token to the end of the last
        last = mask.sum(1) - 1
        ends = offsets[torch.arange(len(ids)), last.clamp_min(0), 1]
        nbytes += int((ends - offsets[:, 0, 1]).clamp_min(0).sum())
    return total / max(count, 1), total / max(nbytes, 1) / math.log(2)


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def format_tables(args, result: Dict[str, object]) -> str:
    seeds = result["seeds"]
    count = len(seeds)
    header = ["model", "parameters", f"validation CE (nats/student token), {count} seed(s)", "bits per byte",
              "train s/run"]
    lines = [["student alone (CE)", f"{seeds[0]['student_parameters']:,}",
              mean_std([r["alone"] for r in seeds]), mean_std([r["alone_bits_per_byte"] for r in seeds]),
              f"{statistics.fmean(r['alone_seconds'] for r in seeds):.0f}"],
             [f"student, CE + {args.uld_weight:g}·ULD ({f'top-{args.k}' if args.k else 'exact'})",
              f"{seeds[0]['student_parameters']:,}",
              mean_std([r["uld"] for r in seeds]), mean_std([r["uld_bits_per_byte"] for r in seeds]),
              f"{statistics.fmean(r['uld_seconds'] for r in seeds):.0f}"]]
    table = markdown_table(header, lines)
    differences = [r["alone"] - r["uld"] for r in seeds]
    summary = (f"ULD KD minus alone: {mean_std([-d for d in differences])} nats/token "
               f"(negative: the teacher helped).")
    bench_header = ["loss, forward+backward", "median ms", "peak extra MB"]
    bench_lines = [[r["loss"], significant(r["ms"]), "n/a" if r["peak_extra_mb"] is None else
                    significant(r["peak_extra_mb"])] for r in result["benchmark"]]
    bench = (f"\nLoss at the training shape: {result['bench_rows']} span rows, V_s = {result['student_vocab']}, "
             f"V_t = {result['teacher_vocab']} ({args.threads} thread(s)):\n\n"
             f"{markdown_table(bench_header, bench_lines)}")
    return f"{table}\n\n{summary}\n{bench}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-vocab", type=int, default=32768,
                        help="teacher BPE vocabulary (default: %(default)s)")
    parser.add_argument("--student-vocab", type=int, default=8192, help="student BPE vocabulary (default: %(default)s)")
    parser.add_argument("--corpus-mb", type=float, default=8.0,
                        help="MB of standard-library source to read (default: %(default)g)")
    parser.add_argument("--piece-chars", type=int, default=240,
                        help="characters per text piece (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=96,
                        help="tokens kept per piece on each side (default: %(default)s)")
    parser.add_argument("--train-pieces", type=int, default=2048,
                        help="training pieces kept, a seeded random subset (default: %(default)s)")
    parser.add_argument("--max-validation-pieces", type=int, default=256,
                        help="validation pieces scored (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="pieces per step (default: %(default)s)")
    parser.add_argument("--teacher-hidden", type=int, default=128, help="teacher hidden size (default: %(default)s)")
    parser.add_argument("--teacher-layers", type=int, default=2, help="teacher layers (default: %(default)s)")
    parser.add_argument("--student-hidden", type=int, default=64, help="student hidden size (default: %(default)s)")
    parser.add_argument("--student-layers", type=int, default=1, help="student layers (default: %(default)s)")
    parser.add_argument("--teacher-steps", type=int, default=300, help="teacher training steps (default: %(default)s)")
    parser.add_argument("--student-steps", type=int, default=150,
                        help="training steps of each student run (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="peak AdamW learning rate, warm-up then cosine decay (default: %(default)g)")
    parser.add_argument("--uld-weight", type=float, default=1.0,
                        help="weight of the ULD term added to the cross-entropy (default: %(default)g)")
    parser.add_argument("--k", type=int, default=256,
                        help="top-k form of the ULD loss in training (default: %(default)s; 0: the exact loss, "
                             "which sorts both full rows at every step)")
    parser.add_argument("--bench-k", type=int, default=256,
                        help="k of the top-k row in the loss benchmark (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="student seeds to run and average over (default: 0 1 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; losses repeat exactly for the same value (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join("runs", "llm_cross_tokenizer"),
                        help="output directory: tokenizer caches, results.json (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long CI configuration: 512/384-token vocabularies, 80 kB of source, a few "
                             "steps; its numbers are not meaningful")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.teacher_vocab, args.student_vocab, args.corpus_mb, args.max_tokens = 512, 384, 0.08, 32
        args.piece_chars, args.train_pieces, args.max_validation_pieces, args.batch_size = 96, 64, 8, 4
        args.teacher_hidden, args.student_hidden, args.teacher_steps, args.student_steps = 32, 32, 3, 2
        args.seeds, args.bench_k, args.k = [0], 16, 16
    require_at_least_one(args, ("teacher_vocab", "student_vocab", "piece_chars", "max_tokens", "train_pieces",
                                "max_validation_pieces", "batch_size", "teacher_hidden", "teacher_layers",
                                "student_hidden", "student_layers", "teacher_steps", "student_steps", "bench_k",
                                "threads"))
    if args.max_tokens < 2 or args.corpus_mb <= 0 or args.uld_weight < 0 or args.k < 0:
        raise SystemExit("need --max-tokens >= 2, --corpus-mb > 0, --uld-weight >= 0 and --k >= 0")
    torch.set_num_threads(args.threads)
    if args.smoke:
        print(SMOKE_NOTE, flush=True)
    for module in ("transformers", "tokenizers"):
        require(module, "examples", ["transformers", "tokenizers"], "llm_cross_tokenizer.py")
    os.makedirs(args.out, exist_ok=True)
    result = run(args)
    note = f"{SMOKE_NOTE}\n" if args.smoke else ""
    print(f"\n{result['seconds']:.0f} s on {args.threads} thread(s)\n{note}{format_tables(args, result)}")
    write_results(args, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
