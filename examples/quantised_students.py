"""Distillation into quantised and pruned students: does the teacher recover what compression loses?

For each task and seed the script trains a float teacher and a float student distilled from it
(`KDLoss(T, α)`), then compresses copies of that student several ways and measures test accuracy,
serialised size (bytes of `torch.save(state_dict)`), non-zero weights and CPU latency of one
forward pass (median over repeats):
- PTQ: post-training quantisation (`kdfast.compression.quantise_ptq`), no training;
- QAT without KD: fine-tuned under fake quantisation (`prepare_qat`) with cross-entropy
  (`KDLoss(alpha=1)`), then converted (`convert_qat`);
- QAT with KD: the same fine-tuning with `KDLoss(T, α)` against the teacher's logits;
- QAT with self-KD: `distil_into_quantised`, the float student teaching its quantised copy
  (pure KL at T = 1, labels unused);
- 50% unstructured magnitude pruning (gradual schedule over the first half of the recovery
  epochs, `PruningSchedule`) and 2:4 pruning (one shot at the first step), each recovered with
  cross-entropy or with KD; one-shot pruning without recovery is shown for reference.
A control fine-tunes the float student with KD for as long, without compression.
Every fine-tuning run starts from the same float student with the same data order, optimizer
(Adam, cosine decay) and number of epochs; they differ only in the loss.

Tasks: "digits" (scikit-learn's 8×8 digits, the CNN teacher and MLP student of `kdfast demo`)
and "speech" (the spoken-digit MFCCs of examples/speech_digits.py with its CNN teacher and an
all-Linear time-delay student, since torchao quantises Linear layers only). The quantisation
schemes are `--schemes` (default a8w4 and a8w2: int8 dynamic per-token activations with int4, then
int2 symmetric weights, the second to see QAT where post-training quantisation loses a lot), with
`--group-size` input features per weight scale (default 0: one scale per output channel).
"llm" (opt-in, `--tasks llm`): the tiny Llama models and standard-library corpus of
examples/llm_distill.py at a smaller size; the KD student is quantised to int4 weights only
(`--llm-scheme w4`, groups of 32; the lm_head, tied to the embedding, stays float) after
training (PTQ) or with QAT fine-tuning with or without dense KD, in a plain training loop, and
the table reports validation cross-entropy instead of accuracy.

Needs torchao (`pip install -c constraints.txt torchao`), scikit-learn (digits), and
transformers and tokenizers for the llm task. Every
random choice is seeded: two runs with the same seeds and `--threads` print the same accuracies
(latencies are measurements and vary). `--smoke` is a seconds-long check whose numbers are
not meaningful, and says so. Prints Markdown tables (mean ± sample std over seeds) and writes
`results.json` to `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from kdfast.compression import (
    SCHEMES,
    PruningSchedule,
    QuantScheme,
    apply_masks,
    convert_qat,
    distil_into_quantised,
    finish_pruning,
    latency_ms,
    load_torchao,
    model_bytes,
    nonzero_parameters,
    prepare_pruning,
    prepare_qat,
    quantise_ptq,
)
from kdfast.demo import StudentMLP, load_digits_split
from kdfast.demo import train_teacher as train_digits_teacher
from kdfast.integrations.huggingface import causal_lm_kd_loss
from kdfast.losses import KDLoss
from kdfast.supervised import accuracy, predict_logits
from kdfast.trainer import Distiller, seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llm_distill  # noqa: E402
from _shared import SMOKE_NOTE, markdown_table, require, require_at_least_one  # noqa: E402
from speech_digits import DEFAULT_DATA, TeacherCNN, load_npz, speaker_split, standardise  # noqa: E402
from speech_digits import train_teacher as train_speech_teacher  # noqa: E402

FLOAT_ROWS = [("teacher", "teacher (float CNN)"), ("float", "float student (KD)"),
              ("float_tuned", "float student + KD fine-tuning (control)")]
QUANT_ROWS = [("ptq", "PTQ"), ("qat_ce", "QAT without KD"), ("qat_kd", "QAT + KD"),
              ("qat_self", "QAT + self-KD (float student teaches)")]
PRUNE_ROWS = [("p50_oneshot", "50% pruned, no recovery"), ("p50_ce", "50% pruned + CE"),
              ("p50_kd", "50% pruned + KD"), ("p24_oneshot", "2:4 pruned, no recovery"),
              ("p24_ce", "2:4 pruned + CE"), ("p24_kd", "2:4 pruned + KD")]
TEACHER_EPOCHS = {"digits": 60, "speech": 30}  # those of `kdfast demo` and examples/speech_digits.py


class TimeDelayStudent(nn.Module):
    """All-Linear student on MFCCs `[N, 1, 13, frames] -> [N, 10]`: windows of `context` frames
    (stride 2) through two Linear+ReLU layers, max over time, a Linear classifier."""

    def __init__(self, coefficients: int = 13, context: int = 8, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.context = context
        self.frames = nn.Sequential(nn.Linear(coefficients * context, hidden), nn.ReLU(),
                                    nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, mfccs: torch.Tensor) -> torch.Tensor:
        windows = mfccs.squeeze(1).unfold(2, self.context, 2)  # [N, C, windows, context]
        windows = windows.permute(0, 2, 1, 3).flatten(2)  # [N, windows, C·context]
        return self.head(self.frames(windows).amax(dim=1))


def load_task(task: str, seed: int, args):
    """(x_train, y_train, x_test, y_test, trained teacher in eval mode, student factory) for one seed."""
    if task == "digits":
        x_train, y_train, x_test, y_test = load_digits_split(seed)
        teacher, _ = train_digits_teacher(x_train, y_train, args.teacher_epochs or TEACHER_EPOCHS[task], seed)
        return x_train, y_train, x_test, y_test, teacher.eval(), lambda: StudentMLP(args.hidden)
    data = load_npz(args.speech_data)
    train_index, test_index = speaker_split(data, seed, 0.25, 32 if not args.smoke else 16)
    x_train, x_test = standardise(data["features"][train_index], data["features"][test_index])
    y_train, y_test = torch.from_numpy(data["labels"][train_index]), torch.from_numpy(data["labels"][test_index])
    torch.manual_seed(seed)
    teacher = train_speech_teacher(TeacherCNN(32), x_train, y_train, args.teacher_epochs or TEACHER_EPOCHS[task], seed)
    return x_train, y_train, x_test, y_test, teacher.eval(), lambda: TimeDelayStudent(hidden=args.hidden)


def fit(student: nn.Module, tensors, loss, epochs: int, lr: float, seed: int, callbacks=()) -> nn.Module:
    """Adam(lr) with cosine decay for `epochs` over (inputs, labels, teacher_logits), batch 64."""
    loader = DataLoader(TensorDataset(*tensors), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    Distiller(student, None, loss, optimizer, scheduler, seed=seed, progress=False,
              callbacks=callbacks).fit(loader, epochs=epochs)
    return student.eval()


def measure(model: nn.Module, x_test, y_test, batch: torch.Tensor, nonzero: Optional[int] = None,
            repeats: int = 30):
    """Accuracy, bytes, latency and non-zero weights (`nonzero`, given for quantised models)."""
    return {"accuracy": accuracy(model, x_test, y_test), "bytes": model_bytes(model),
            "latency_ms": latency_ms(model, batch, repeats=repeats),
            "nonzero": nonzero if nonzero is not None else nonzero_parameters(model)}


def run_seed(task: str, seed: int, args, schemes: Sequence[QuantScheme]) -> Dict[str, Dict[str, float]]:
    """Every row of the task's table for one seed: {row key: {accuracy, bytes, latency_ms, nonzero}};
    the quantised rows are keyed "<row>@<scheme name>"."""
    x_train, y_train, x_test, y_test, teacher, make_student = load_task(task, seed, args)
    logits = predict_logits(teacher, x_train)
    train = (x_train, y_train, logits)
    batch = x_test[: args.latency_batch]
    kd = lambda: KDLoss(temperature=args.temperature, alpha=args.alpha)  # noqa: E731

    def scored(model: nn.Module, nonzero: Optional[int] = None):
        return measure(model, x_test, y_test, batch, nonzero, args.latency_repeats)

    torch.manual_seed(seed + 1000)
    base = fit(make_student(), train, kd(), args.student_epochs, args.lr, seed)
    results = {"teacher": scored(teacher), "float": scored(base)}
    weights = results["float"]["nonzero"]
    control = fit(copy.deepcopy(base).train(), train, kd(), args.tune_epochs, args.tune_lr, seed)
    results["float_tuned"] = scored(control)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    for scheme in schemes:
        results[f"ptq@{scheme.name}"] = scored(quantise_ptq(copy.deepcopy(base), scheme), weights)
        for key, loss in (("qat_ce", KDLoss(alpha=1.0)), ("qat_kd", kd())):
            student = copy.deepcopy(base).train()
            prepare_qat(student, scheme)
            fit(student, train, loss, args.tune_epochs, args.tune_lr, seed)
            results[f"{key}@{scheme.name}"] = scored(convert_qat(student, scheme), weights)
        converted, _ = distil_into_quantised(base, loader, scheme, epochs=args.tune_epochs, lr=args.tune_lr,
                                             seed=seed)
        results[f"qat_self@{scheme.name}"] = scored(converted, weights)
    steps = args.tune_epochs * len(loader)
    for prefix, pattern in (("p50", "unstructured"), ("p24", "2:4")):
        oneshot = copy.deepcopy(base)
        prepare_pruning(oneshot, pattern)
        apply_masks(oneshot, pattern, 0.5)
        results[f"{prefix}_oneshot"] = scored(finish_pruning(oneshot))
        for key, loss in ((f"{prefix}_ce", KDLoss(alpha=1.0)), (f"{prefix}_kd", kd())):
            student = copy.deepcopy(base).train()
            prepare_pruning(student, pattern)
            schedule = PruningSchedule(student, 0.5, pattern, start_step=1, end_step=max(1, steps // 2),
                                       frequency=max(1, steps // 20))
            fit(student, train, loss, args.tune_epochs, args.tune_lr, seed, callbacks=[schedule])
            results[key] = scored(finish_pruning(student))
    return results


def next_token_ce(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on int64 windows `[B, L]`."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), llm_distill.next_token_labels(ids).reshape(-1))


def run_llm_seed(seed: int, args, corpus, scheme: QuantScheme) -> Dict[str, Dict[str, float]]:
    """The LLM rows for one student seed: validation CE (nats/token), bytes and latency of one batch.

    `corpus` is (teacher, train windows, validation windows). The student is trained with dense KD
    (α, T = 1), then quantised with `scheme` (weight-only int4 by default) after training (PTQ) or
    fine-tuned under fake quantisation with cross-entropy or with KD (QAT), in a plain loop.
    The lm_head, tied to the embedding, stays in float.
    """
    teacher, windows, validation = corpus
    batch = validation[: args.llm_batch]

    def cross_entropy(model, index):
        return next_token_ce(model, windows[index])

    def dense_kd(model, index):
        ids = windows[index]
        with torch.no_grad():
            target = teacher(input_ids=ids).logits
        return causal_lm_kd_loss(model(input_ids=ids).logits, target, ids, temperature=1.0, alpha=args.alpha)

    def record(model, nonzero: int) -> Dict[str, float]:
        return {"accuracy": llm_distill.validation_ce(model, validation), "bytes": model_bytes(model),
                "latency_ms": latency_ms(model, batch, repeats=max(1, args.latency_repeats // 3)),
                "nonzero": nonzero}

    base = llm_distill.make_model(teacher.config.vocab_size, 64, 1, 1000 + seed, args.llm_seq_len)
    llm_distill.train(base, windows, args.llm_steps, args.llm_batch, 3e-3, seed, dense_kd)
    weights = nonzero_parameters(base)
    results = {"teacher": record(teacher, nonzero_parameters(teacher)), "float": record(base, weights)}
    control = copy.deepcopy(base)
    llm_distill.train(control, windows, args.llm_tune_steps, args.llm_batch, args.llm_tune_lr, seed, dense_kd)
    results["float_tuned"] = record(control, weights)
    skip = ["lm_head"]
    results[f"ptq@{scheme.name}"] = record(quantise_ptq(copy.deepcopy(base), scheme, strict=False, skip=skip), weights)
    for key, loss in (("qat_ce", cross_entropy), ("qat_kd", dense_kd)):
        student = copy.deepcopy(base)
        prepare_qat(student, scheme, strict=False, skip=skip)
        llm_distill.train(student, windows, args.llm_tune_steps, args.llm_batch, args.llm_tune_lr, seed, loss)
        results[f"{key}@{scheme.name}"] = record(convert_qat(student, scheme), weights)
    return results


def llm_corpus(args):
    """(teacher trained with cross-entropy, training windows, validation windows) for the LLM task."""
    texts, held_out = llm_distill.stdlib_corpus(int(args.llm_corpus_mb * 1e6))
    tokenizer = llm_distill.train_tokenizer(texts, args.llm_vocab, args.out)
    windows = llm_distill.token_windows(tokenizer, texts, args.llm_seq_len)
    keep = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[:1024]
    windows = windows[keep.sort().values]
    validation = llm_distill.token_windows(tokenizer, held_out, args.llm_seq_len)[:128]
    seed_everything(0)
    teacher = llm_distill.make_model(tokenizer.get_vocab_size(), 128, 2, 0, args.llm_seq_len)

    llm_distill.train(teacher, windows, args.llm_teacher_steps, args.llm_batch, 3e-3, 0,
                      lambda model, index: next_token_ce(model, windows[index]))
    return teacher.requires_grad_(False).eval(), windows, validation


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [scale * value for value in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {spread:.{digits}f}"


def gap_closed(runs: List[Dict[str, Dict[str, float]]], key: str, scheme: str, sign: float = 1.0) -> Optional[float]:
    """Share of the float−PTQ gap that row `key` closes, on the seed means: (m[key] − m[ptq]) / (m[float] − m[ptq])
    with the metric m multiplied by `sign` (+1: higher is better, −1: lower is better); None when PTQ lost nothing."""
    mean = {name: sign * statistics.fmean(run[name]["accuracy"] for run in runs)
            for name in ("float", f"ptq@{scheme}", f"{key}@{scheme}")}
    gap = mean["float"] - mean[f"ptq@{scheme}"]
    return (mean[f"{key}@{scheme}"] - mean[f"ptq@{scheme}"]) / gap if gap > 0 else None


def format_table(task: str, runs: List[Dict[str, Dict[str, float]]], schemes: Sequence[QuantScheme]) -> str:
    """The task's Markdown table (mean ± sample std over seeds) and one line per scheme on the gap closed."""
    llm = task == "llm"
    quant_rows = QUANT_ROWS[:3] if llm else QUANT_ROWS
    labels = [(key, label) for key, label in FLOAT_ROWS]
    if llm:
        labels[0] = ("teacher", "teacher (2 layers × 128, float)")
    for scheme in schemes:
        labels += [(f"{key}@{scheme.name}", f"{label}, {scheme.name}") for key, label in quant_rows]
    rows = []
    for key, label in labels + ([] if llm else PRUNE_ROWS):
        cells = [run[key] for run in runs]
        metric = [c["accuracy"] for c in cells]
        rows.append([label, mean_std(metric, 1.0, 3) if llm else mean_std(metric, 100.0),
                     f"{statistics.fmean(c['bytes'] for c in cells):,.0f}", f"{cells[0]['nonzero']:,}",
                     mean_std([c["latency_ms"] for c in cells], 1.0, 3)])
    metric_name = "validation CE (nats/token)" if llm else "test accuracy (%)"
    table = markdown_table([f"{task} ({len(runs)} seed{'s' * (len(runs) > 1)})", metric_name, "bytes",
                            "non-zero params", "latency (ms/batch)"], rows)
    notes = []
    for scheme in schemes:
        parts = []
        for key, label in quant_rows[1:]:
            closed = gap_closed(runs, key, scheme.name, -1.0 if llm else 1.0)
            parts.append(f"{label} " + ("-" if closed is None else f"{100 * closed:.0f}%"))
        ptq = statistics.fmean(run[f"ptq@{scheme.name}"]["accuracy"] for run in runs)
        full = statistics.fmean(run["float"]["accuracy"] for run in runs)
        gap = f"{ptq - full:+.4f} nats/token" if llm else f"{100 * (ptq - full):+.2f} points"
        notes.append(f"{scheme.name}: PTQ changes the float student's mean by {gap}; share of that gap closed: "
                     + ", ".join(parts))
    return table + "\n\n" + "\n".join(notes)


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and its logical core count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            models = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        name = models[0] if models else name
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical cores"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "speech"], choices=["digits", "speech", "llm"],
                        help="which experiments to run; llm (the tiny Llama of llm_distill.py, int4 weight-only, "
                             "needs transformers and tokenizers) is opt-in (default: digits speech)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds to run and average over (default: 0 1 2)")
    parser.add_argument("--schemes", nargs="+", default=["a8w4", "a8w2"], choices=sorted(SCHEMES),
                        help="quantisation schemes: a8w2/a8w4/a8w8 = int8 dynamic activations with int2/int4/int8 "
                             "weights, w4/w8 = weight-only (default: a8w4 a8w2)")
    parser.add_argument("--group-size", type=int, default=0,
                        help="digits and speech: input features per weight scale, 0 = one scale per output "
                             "channel; the llm task uses its scheme's own (default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="teacher epochs (default: 60 for digits as in kdfast demo, 30 for speech)")
    parser.add_argument("--hidden", type=int, default=32,
                        help="student width: MLP hidden units (digits), time-delay layer units (speech) "
                             "(default: %(default)s)")
    parser.add_argument("--student-epochs", type=int, default=40,
                        help="epochs of the float student (default: %(default)s)")
    parser.add_argument("--tune-epochs", type=int, default=10,
                        help="epochs of every QAT or pruning fine-tuning run (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="float student's Adam learning rate (default: %(default)g)")
    parser.add_argument("--tune-lr", type=float, default=1e-3,
                        help="Adam learning rate of the fine-tuning runs (default: %(default)g)")
    parser.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (default: %(default)g)")
    parser.add_argument("--alpha", type=float, default=0.5, help="hard-label weight α in KD (default: %(default)g)")
    parser.add_argument("--latency-batch", type=int, default=256,
                        help="test rows per forward pass when timing (default: %(default)s)")
    parser.add_argument("--latency-repeats", type=int, default=30,
                        help="timed forward passes per model, after 5 warm-up passes; the llm task times a third "
                             "as many (default: %(default)s)")
    parser.add_argument("--speech-data", default=DEFAULT_DATA,
                        help="MFCC file of examples/make_spoken_digits.py (default: data/spoken_digits_mfcc.npz)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; accuracies repeat exactly for the same value "
                             "(default: %(default)s)")
    parser.add_argument("--out", default=os.path.join("runs", "quantised_students"),
                        help="output directory for results.json (default: %(default)s)")
    parser.add_argument("--llm-scheme", default="w4", choices=sorted(SCHEMES),
                        help="quantisation scheme of the llm task (default: %(default)s, int4 weight-only)")
    parser.add_argument("--llm-vocab", type=int, default=4096, help="llm task: BPE vocabulary (default: %(default)s)")
    parser.add_argument("--llm-corpus-mb", type=float, default=2.0,
                        help="llm task: MB of standard-library source (default: %(default)g)")
    parser.add_argument("--llm-seq-len", type=int, default=64,
                        help="llm task: tokens per window (default: %(default)s)")
    parser.add_argument("--llm-batch", type=int, default=8,
                        help="llm task: windows per step and per timed batch (default: %(default)s)")
    parser.add_argument("--llm-teacher-steps", type=int, default=300,
                        help="llm task: teacher steps (default: %(default)s)")
    parser.add_argument("--llm-steps", type=int, default=150,
                        help="llm task: steps of the float student, dense KD (default: %(default)s)")
    parser.add_argument("--llm-tune-steps", type=int, default=60,
                        help="llm task: steps of each fine-tuning run (default: %(default)s)")
    parser.add_argument("--llm-tune-lr", type=float, default=1e-3,
                        help="llm task: peak AdamW learning rate of the fine-tuning runs (default: %(default)g)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long check: one seed, 1-2 epochs per model; its numbers are not meaningful")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        load_torchao()
    except ImportError as error:
        raise SystemExit(str(error)) from None
    if args.smoke:
        args.seeds, args.teacher_epochs, args.student_epochs, args.tune_epochs = [0], 1, 2, 1
        args.latency_repeats = 3
        args.llm_vocab, args.llm_corpus_mb, args.llm_teacher_steps, args.llm_steps, args.llm_tune_steps = \
            300, 0.08, 3, 3, 2
        print(SMOKE_NOTE, flush=True)
    require_at_least_one(args, ("student_epochs", "hidden", "llm_vocab", "llm_seq_len", "llm_batch",
                                "llm_teacher_steps", "llm_steps", "llm_tune_steps", "tune_epochs", "threads",
                                "latency_batch", "latency_repeats"))
    if args.teacher_epochs is not None and args.teacher_epochs < 1:
        raise SystemExit(f"--teacher-epochs must be >= 1, got {args.teacher_epochs}")
    if not (args.temperature > 0 and 0 <= args.alpha <= 1 and args.lr > 0 and args.tune_lr > 0 and args.llm_tune_lr > 0
            and args.group_size >= 0):
        raise SystemExit("need --temperature > 0, --alpha in [0, 1], learning rates > 0 and --group-size >= 0")
    if "llm" in args.tasks:
        require("transformers", "examples", ["transformers", "tokenizers"], "the llm task")
        require("tokenizers", "examples", ["transformers", "tokenizers"], "the llm task")
    schemes = [QuantScheme(SCHEMES[name].weights, SCHEMES[name].activations, args.group_size or None)
               for name in args.schemes]
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    cpu = cpu_name()
    output: Dict[str, object] = {"arguments": vars(args), "schemes": [scheme.name for scheme in schemes],
                                 "cpu": cpu, "tasks": {}}
    tables = []
    for task in args.tasks:
        started = time.perf_counter()
        runs = []
        task_schemes = schemes
        if task == "llm":
            task_schemes = [SCHEMES[args.llm_scheme]]
            corpus = llm_corpus(args)
        for seed in args.seeds:
            runs.append(run_llm_seed(seed, args, corpus, task_schemes[0]) if task == "llm"
                        else run_seed(task, seed, args, schemes))
            summary = "  ".join(f"{key} {value['accuracy']:.4f}" for key, value in runs[-1].items())
            print(f"[{task}] seed {seed}: {summary}", flush=True)
        seconds = time.perf_counter() - started
        output["tasks"][task] = {"seconds": seconds, "runs": runs}  # type: ignore[index]
        note = f"{SMOKE_NOTE}\n" if args.smoke else ""
        tables.append(f"{task}: {seconds:.0f} s on {args.threads} thread(s), {cpu}\n\n{note}"
                      f"{format_table(task, runs, task_schemes)}")
    print("\n" + "\n\n".join(tables))
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(output, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
