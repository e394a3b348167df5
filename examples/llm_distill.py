"""Causal-LM distillation: a small Llama-style teacher into a smaller student, dense and top-k.

Everything is built locally and offline: the corpus is the Python standard library's own
sources (`sysconfig.get_paths()["stdlib"]`, `*.py` files in sorted order, every tenth file
held out for validation, capped at `--corpus-mb`; training uses a seeded random subset of
`--train-windows` windows), the tokenizer is a byte-level BPE with
`--vocab-size` tokens (default 32,768; fewer, with a note, when the corpus runs out of
merges) trained on the training files with Hugging Face
`tokenizers` and cached in `--out`, and both models are randomly initialised
`transformers.LlamaForCausalLM`s trained here. The teacher is trained once (seed 0) with
cross-entropy; then for every seed the student (same initialisation per seed) is trained
three ways for the same steps and data order:
- alone: next-token cross-entropy;
- dense KD: the live teacher's full logits through
  `kdfast.integrations.huggingface.causal_lm_kd_loss` (`kdfast.functional.kd_loss`);
- top-k KD (offline): the teacher's top-`k` soft labels written once to a
  `kdfast.SoftLabelStore` with `kdfast.compress_topk`, read back through
  `SoftLabelWindowDataset`, with `kdfast.functional.sparse_kd_loss` (tail bucket).
The table reports validation cross-entropy (nats/token) and perplexity, mean ± sample std
over seeds. A loss benchmark at the training shape compares kdfast's dense and top-k losses
with the same loss written in eager PyTorch (`kdfast.benchmark.eager_kd_loss`): median
forward+backward time and peak extra memory, plus the bytes per token the teacher signal
occupies. `--smoke` is a seconds-long CI configuration (small vocabulary and corpus) whose
numbers are not meaningful (it says so in its output).

Needs: Hugging Face `transformers` and `tokenizers` (both in the `examples` extra; a missing
one stops the script with the `pip` line to run). Two runs with the same seeds and
`--threads` print the same cross-entropies on the same machine; the timings vary.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import math
import os
import statistics
import sys
import sysconfig
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from kdfast import compress_topk, functional
from kdfast.benchmark import eager_kd_loss, measure_peak_extra_mb, time_step
from kdfast.integrations.huggingface import causal_lm_kd_loss, require_transformers
from kdfast.store import SoftLabelStore, SoftLabelWindowDataset
from kdfast.trainer import seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import SMOKE_NOTE, markdown_table, require, require_at_least_one, significant, write_results  # noqa: E402

# --------------------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------------------


def stdlib_corpus(max_chars: int) -> Tuple[List[str], List[str]]:
    """(training texts, validation texts) from the standard library's `*.py` files.

    Files are read in sorted path order as UTF-8 (undecodable files skipped) until
    `max_chars` characters are collected; file number i goes to validation when i % 10 == 9.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    if not paths:
        raise RuntimeError(f"no Python sources found under {root!r}")
    train, validation, total = [], [], 0
    for number, path in enumerate(paths):
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (UnicodeDecodeError, OSError):
            continue
        (validation if number % 10 == 9 else train).append(text)
        total += len(text)
        if total >= max_chars:
            break
    return train, validation


def train_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: str):
    """Byte-level BPE with `vocab_size` tokens, cached by corpus hash and size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
    path = os.path.join(cache_dir, f"tokenizer-{vocab_size}-{digest.hexdigest()[:12]}.json")
    if os.path.exists(path):
        return Tokenizer.from_file(path)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(path)
    return tokenizer


def token_windows(tokenizer, texts: Sequence[str], length: int) -> torch.Tensor:
    """int64 `[N, length]`: the texts' tokens concatenated and cut into whole windows."""
    ids: List[int] = []
    for encoding in tokenizer.encode_batch(list(texts)):
        ids.extend(encoding.ids)
    count = len(ids) // length
    if count == 0:
        raise RuntimeError(f"the corpus gave {len(ids)} tokens, fewer than one window of {length}")
    return torch.tensor(ids[:count * length], dtype=torch.int64).view(count, length)


# --------------------------------------------------------------------------------------
# Models and training
# --------------------------------------------------------------------------------------


def make_model(vocab_size: int, hidden: int, layers: int, seed: int, max_length: int):
    transformers = require_transformers()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=max_length, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def parameter_count(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits: position i is scored against token i+1; the last is -100."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def train(model, windows: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int,
          step_loss: Callable[[object, torch.Tensor], torch.Tensor]) -> float:
    """AdamW with linear warm-up and cosine decay over shuffled windows; returns seconds taken.

    `step_loss(model, window_index)` returns the loss of one batch of window indices.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(windows), generator=generator)
    position = 0
    model.train()
    started = time.perf_counter()
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(windows), generator=generator), 0
        index = order[position:position + batch_size]
        position += batch_size
        loss = step_loss(model, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    model.eval()
    return time.perf_counter() - started


@torch.no_grad()
def validation_ce(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy in nats per predicted token."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size]
        logits = model(input_ids=ids).logits[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


def write_store(teacher, windows: torch.Tensor, directory: str, k: int, temperature: float) -> SoftLabelStore:
    """Top-k soft labels of the teacher for every window, in window order, with token ids."""
    vocab_size = teacher.config.vocab_size
    with SoftLabelStore.create(directory, vocab_size=vocab_size, k=k, temperature=temperature,
                               with_token_ids=True, overwrite=True, durable=False,
                               teacher="llm_distill teacher", tokenizer="stdlib byte-level BPE") as writer:
        with torch.no_grad():
            for start in range(0, len(windows), 16):
                ids = windows[start:start + 16]
                logits = teacher(input_ids=ids).logits
                labels = compress_topk(logits.reshape(-1, vocab_size), k, temperature=temperature)
                writer.append(labels, token_ids=ids.reshape(-1))
        writer.close(complete=True)
    return SoftLabelStore(directory)


# --------------------------------------------------------------------------------------
# Loss benchmark: kdfast vs eager at the training shape
# --------------------------------------------------------------------------------------


def benchmark_losses(rows: int, vocab_size: int, k: int, temperature: float, alpha: float) -> List[Dict[str, object]]:
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(rows, vocab_size, generator=generator)).requires_grad_(True)
    teacher = 3 * torch.randn(rows, vocab_size, generator=generator)
    labels = torch.randint(0, vocab_size, (rows,), generator=generator)
    soft = compress_topk(teacher, k, temperature=temperature)
    options = dict(temperature=temperature, alpha=alpha)
    cases = [
        ("eager PyTorch, dense", lambda: eager_kd_loss(student, teacher, labels, **options), 4 * vocab_size),
        ("kdfast kd_loss, dense", lambda: functional.kd_loss(student, teacher, labels, **options), 4 * vocab_size),
        (f"kdfast sparse_kd_loss, top-{k}", lambda: functional.sparse_kd_loss(student, soft, labels, alpha=alpha),
         None),
    ]
    results = []
    for name, loss_fn, teacher_bytes in cases:
        def step():
            (gradient,) = torch.autograd.grad(loss_fn(), student)
            return gradient

        milliseconds, _ = time_step(step, "cpu", warmup=1, max_repeats=5, min_repeats=3, budget_s=1.0)
        peak = measure_peak_extra_mb(step, "cpu")
        if teacher_bytes is None:
            teacher_bytes = (soft.indices.element_size() + soft.logprobs.element_size()) * k + 4
        results.append({"loss": name, "ms": milliseconds, "peak_extra_mb": peak,
                        "teacher_bytes_per_token": teacher_bytes})
    return results


def benchmark_lm_head(rows: int, vocab_size: int, hidden: int, teacher_hidden: int, temperature: float,
                      alpha: float) -> List[Dict[str, object]]:
    """lm_head + loss, forward+backward w.r.t. the student's hidden states and lm_head weight:
    materialised logits (eager loss, kdfast kd_loss) against kdfast.functional.fused_linear_kd_loss
    with the teacher given as its hidden states and lm_head weight (its logits never built)."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(rows, hidden, generator=generator).requires_grad_(True)
    w = (torch.randn(vocab_size, hidden, generator=generator) / hidden ** 0.5).requires_grad_(True)
    th = torch.randn(rows, teacher_hidden, generator=generator)
    tw = torch.randn(vocab_size, teacher_hidden, generator=generator) / teacher_hidden ** 0.5
    labels = torch.randint(0, vocab_size, (rows,), generator=generator)
    options = dict(temperature=temperature, alpha=alpha)

    def materialised(loss_fn):
        def loss():
            with torch.no_grad():
                teacher = F.linear(th, tw)
            return loss_fn(F.linear(h, w), teacher, labels, **options)
        return loss

    cases = [
        ("lm_head + eager PyTorch loss", materialised(eager_kd_loss)),
        ("lm_head + kdfast kd_loss", materialised(functional.kd_loss)),
        ("kdfast fused_linear_kd_loss (teacher hidden states)",
         lambda: functional.fused_linear_kd_loss(h, w, (th, tw), labels, **options)),
    ]
    results = []
    for name, loss_fn in cases:
        def step():
            return torch.autograd.grad(loss_fn(), (h, w))

        milliseconds, _ = time_step(step, "cpu", warmup=1, max_repeats=5, min_repeats=3, budget_s=1.0)
        peak = measure_peak_extra_mb(step, "cpu")
        results.append({"loss": name, "ms": milliseconds, "peak_extra_mb": peak})
    return results


# --------------------------------------------------------------------------------------
# Experiment
# --------------------------------------------------------------------------------------


def run(args) -> Dict[str, object]:
    started = time.perf_counter()
    train_texts, validation_texts = stdlib_corpus(int(args.corpus_mb * 1e6))
    tokenizer = train_tokenizer(train_texts, args.vocab_size, args.out)
    vocab_size = tokenizer.get_vocab_size()
    if vocab_size < args.vocab_size:
        print(f"note: the corpus supports only {vocab_size} BPE tokens (asked for {args.vocab_size}); "
              "raise --corpus-mb for more", flush=True)
    train_windows = token_windows(tokenizer, train_texts, args.seq_len)
    # a fixed random subset of windows: the training runs and the soft-label store use only these
    keep = torch.randperm(len(train_windows), generator=torch.Generator().manual_seed(0))[:args.train_windows]
    train_windows = train_windows[keep.sort().values]
    validation_windows = token_windows(tokenizer, validation_texts, args.seq_len)[:args.max_validation_windows]
    print(f"tokenizer: {vocab_size} tokens; {train_windows.numel():,} training and {validation_windows.numel():,} "
          f"validation tokens ({time.perf_counter() - started:.1f} s)", flush=True)

    seed_everything(0)
    teacher = make_model(vocab_size, args.teacher_hidden, args.teacher_layers, 0, args.seq_len)

    def cross_entropy(model, index):
        ids = train_windows[index]
        logits = model(input_ids=ids).logits
        return F.cross_entropy(logits.reshape(-1, vocab_size), next_token_labels(ids).reshape(-1), ignore_index=-100)

    teacher_seconds = train(teacher, train_windows, args.teacher_steps, args.batch_size, args.lr, 0, cross_entropy)
    teacher.requires_grad_(False)
    teacher_ce = validation_ce(teacher, validation_windows)
    print(f"teacher: {parameter_count(teacher):,} parameters, validation CE {teacher_ce:.3f} "
          f"({teacher_seconds:.1f} s)", flush=True)

    store = write_store(teacher, train_windows, os.path.join(args.out, "soft_labels"), args.k, args.temperature)
    dataset = SoftLabelWindowDataset(store, args.seq_len)
    assert len(dataset) == len(train_windows)

    def dense_kd(model, index):
        ids = train_windows[index]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits
        return causal_lm_kd_loss(model(input_ids=ids).logits, teacher_logits, ids,
                                 temperature=args.temperature, alpha=args.alpha)

    def topk_kd(model, index):
        batch = torch.utils.data.default_collate([dataset[int(i)] for i in index])
        ids = batch["input_ids"]
        return functional.sparse_kd_loss(model(input_ids=ids).logits, dataset.to_soft_labels(batch),
                                         next_token_labels(ids), alpha=args.alpha)

    bench_started = time.perf_counter()
    bench = benchmark_losses(args.batch_size * args.seq_len, vocab_size, args.k, args.temperature, args.alpha)
    lm_head_bench = benchmark_lm_head(args.batch_size * args.seq_len, vocab_size, args.student_hidden,
                                      args.teacher_hidden, args.temperature, args.alpha)
    print(f"loss benchmarks: {len(bench) + len(lm_head_bench)} cases measured "
          f"({time.perf_counter() - bench_started:.1f} s; tables at the end)", flush=True)

    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for name, loss in (("alone", cross_entropy), ("dense", dense_kd), ("topk", topk_kd)):
            student = make_model(vocab_size, args.student_hidden, args.student_layers, 1000 + seed, args.seq_len)
            seconds = train(student, train_windows, args.student_steps, args.batch_size, args.lr, seed, loss)
            row[name] = validation_ce(student, validation_windows)
            row[f"{name}_seconds"] = seconds
            row["student_parameters"] = parameter_count(student)
        rows.append(row)
        print(f"seed {seed}: validation CE alone {row['alone']:.3f}  dense KD {row['dense']:.3f}  "
              f"top-{args.k} KD {row['topk']:.3f}", flush=True)
    return {"vocab_size": vocab_size, "teacher_ce": teacher_ce, "teacher_parameters": parameter_count(teacher),
            "teacher_seconds": teacher_seconds, "store_bytes": store.nbytes, "tokens": train_windows.numel(),
            "validation_tokens": validation_windows.numel(), "seeds": rows, "benchmark": bench,
            "lm_head_benchmark": lm_head_bench,
            "seconds": time.perf_counter() - started}


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def format_tables(args, result: Dict[str, object]) -> str:
    """The validation table (cross-entropy, perplexity, training time) and the benchmark tables."""
    rows = result["seeds"]
    table = [[f"teacher ({args.teacher_layers}×{args.teacher_hidden}, seed 0)", f"{result['teacher_parameters']:,}",
              f"{result['teacher_ce']:.3f}", f"{math.exp(result['teacher_ce']):.1f}",
              f"{result['teacher_seconds']:.1f}"]]
    for label, key in (("student alone (CE)", "alone"),
                       (f"student, dense KD (α={args.alpha:g}, T={args.temperature:g})", "dense"),
                       (f"student, top-{args.k} KD from the store", "topk")):
        values = [r[key] for r in rows]
        table.append([label, f"{rows[0]['student_parameters']:,}", mean_std(values),
                      mean_std([math.exp(v) for v in values], 1),
                      f"{statistics.fmean(r[key + '_seconds'] for r in rows):.1f}"])
    header = [f"model (V = {result['vocab_size']:,})", "parameters",
              f"validation CE (nats/token), {len(rows)} seed(s)", "perplexity", "train s/run"]
    return "\n\n".join([markdown_table(header, table),
                         format_benchmarks(args, args.batch_size * args.seq_len, result["vocab_size"],
                                           result["benchmark"], result.get("lm_head_benchmark", []))])


def _megabytes(value: Optional[float]) -> str:
    return "n/a" if value is None else significant(value)


def format_benchmarks(args, rows: int, vocab_size: int, losses, lm_head) -> str:
    """The loss benchmark tables: median milliseconds and peak extra megabytes, three significant digits."""
    tables = [markdown_table(
        [f"loss, forward+backward on [{rows}, {vocab_size}]", "median ms", "peak extra MB", "teacher bytes/token"],
        [[entry["loss"], significant(entry["ms"]), _megabytes(entry["peak_extra_mb"]),
          f"{entry['teacher_bytes_per_token']:,}"] for entry in losses])]
    if lm_head:
        tables.append(markdown_table(
            [f"lm_head + loss, forward+backward, [{rows}, {args.student_hidden}] × [{args.student_hidden}, "
             f"{vocab_size}], teacher H = {args.teacher_hidden}", "median ms", "peak extra MB"],
            [[entry["loss"], significant(entry["ms"]), _megabytes(entry["peak_extra_mb"])] for entry in lm_head]))
    return "\n\n".join(tables)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=32768, help="BPE vocabulary size (default: %(default)s)")
    parser.add_argument("--corpus-mb", type=float, default=8.0,
                        help="MB of standard-library source to read (default: %(default)g)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per training window (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step (default: %(default)s)")
    parser.add_argument("--train-windows", type=int, default=1024,
                        help="training windows kept, a seeded random subset; the store covers exactly these "
                             "(default: %(default)s)")
    parser.add_argument("--max-validation-windows", type=int, default=256,
                        help="validation windows scored (default: %(default)s)")
    parser.add_argument("--teacher-hidden", type=int, default=128, help="teacher hidden size (default: %(default)s)")
    parser.add_argument("--teacher-layers", type=int, default=2, help="teacher layers (default: %(default)s)")
    parser.add_argument("--student-hidden", type=int, default=64, help="student hidden size (default: %(default)s)")
    parser.add_argument("--student-layers", type=int, default=1, help="student layers (default: %(default)s)")
    parser.add_argument("--teacher-steps", type=int, default=300, help="teacher training steps (default: %(default)s)")
    parser.add_argument("--student-steps", type=int, default=150,
                        help="training steps of each student run (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3,
                        help="peak AdamW learning rate, warm-up then cosine decay (default: %(default)g)")
    parser.add_argument("--temperature", type=float, default=1.0, help="KD temperature T (default: %(default)g)")
    parser.add_argument("--alpha", type=float, default=0.5, help="hard-label weight α (default: %(default)g)")
    parser.add_argument("--k", type=int, default=32,
                        help="soft labels kept per token in the store (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="student seeds to run and average over (default: 0 1 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; losses repeat exactly for the same value (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join("runs", "llm_distill"),
                        help="output directory: tokenizer cache, soft-label store, results.json (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long CI configuration: 512-token vocabulary, 80 kB of source, a few steps; "
                             "its numbers are not meaningful")
    parser.add_argument("--benchmark-only", action="store_true",
                        help="only the loss benchmarks at the training shape (no corpus, no training)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.vocab_size, args.corpus_mb, args.seq_len, args.batch_size = 512, 0.08, 32, 4
        args.max_validation_windows, args.teacher_hidden, args.student_hidden = 16, 32, 32
        args.teacher_steps, args.student_steps, args.seeds, args.k = 3, 2, [0], 8
    require_at_least_one(args, ("vocab_size", "seq_len", "batch_size", "teacher_hidden", "teacher_layers",
                                "student_hidden", "student_layers", "teacher_steps", "student_steps", "k", "threads",
                                "max_validation_windows", "train_windows"))
    if args.seq_len < 2 or not (args.temperature > 0 and 0 <= args.alpha <= 1 and args.corpus_mb > 0):
        raise SystemExit("need --seq-len >= 2, --temperature > 0, --alpha in [0, 1] and --corpus-mb > 0")
    if args.k > args.vocab_size:
        raise SystemExit(f"--k ({args.k}) must not exceed --vocab-size ({args.vocab_size})")
    torch.set_num_threads(args.threads)
    if args.smoke:
        print(SMOKE_NOTE, flush=True)
    if args.benchmark_only:
        rows = args.batch_size * args.seq_len
        print(format_benchmarks(args, rows, args.vocab_size,
                                benchmark_losses(rows, args.vocab_size, args.k, args.temperature, args.alpha),
                                benchmark_lm_head(rows, args.vocab_size, args.student_hidden, args.teacher_hidden,
                                                  args.temperature, args.alpha)))
        return 0
    for module in ("transformers", "tokenizers"):
        require(module, "examples", ["transformers", "tokenizers"], "llm_distill.py")
    os.makedirs(args.out, exist_ok=True)
    result = run(args)
    note = f"{SMOKE_NOTE}\n" if args.smoke else ""
    print(f"\n{result['seconds']:.0f} s on {args.threads} thread(s)\n{note}{format_tables(args, result)}")
    write_results(args, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
