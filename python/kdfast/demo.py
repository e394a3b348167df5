"""`kdfast demo`: distil a CNN teacher into a small student on scikit-learn's digits.

The data is `sklearn.datasets.load_digits` (1,797 greyscale 8×8 images of handwritten
digits, bundled with scikit-learn, no download). For each seed the demo splits the data
(stratified: 30% = 539 labelled training images, 70% = 1,258 test images, so that one test
error moves accuracy by only 0.08 points), trains a convolutional teacher on the training
images with hard labels, random ±1-pixel shifts and dropout, then trains the same small
multilayer-perceptron student twice from the same initialisation, with the same optimizer,
schedule and data order, through `kdfast.Distiller`: once alone (`KDLoss(alpha=1)`, which is
plain cross-entropy) and once distilled from the live teacher (`KDLoss(temperature=T,
alpha=α)`). The student never sees shifted images; what it learns beyond the labels comes
from the teacher's soft labels on the same 539 images. The demo prints a table of test
accuracy (mean ± sample std over the seeds), writes `results.json` and `loss_curves.png`
(matplotlib, Agg backend) to the output directory, and returns 0.

Requires scikit-learn and matplotlib (the `examples` extra; a missing one is reported with
the `pip` line that fits how kdfast was installed). The full run (3 seeds) takes well under
two minutes on two CPU cores; `--quick` runs a reduced configuration in seconds whose
numbers are not meaningful, and says so. Every random choice (split, initialisation,
dropout, shifts, batch order) is seeded, so two runs with the same seeds and `--threads`
print the same numbers on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from kdfast.contract.install import install_hint
from kdfast.losses import KDLoss
from kdfast.supervised import accuracy, train_classifier
from kdfast.trainer import Distiller, seed_everything

DEFAULT_OUT = os.path.join("runs", "demo")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_TEMPERATURE = 3.0
DEFAULT_ALPHA = 0.7
QUICK_NOTE = "QUICK RUN (--quick): a seconds-long check that the demo works; its numbers are not meaningful."
INSTALL_HINT = install_hint("examples", ["scikit-learn", "matplotlib"])


# --------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------


def load_digits_split(seed: int, test_fraction: float = 0.7):
    """Stratified split of the digits data.

    Returns (x_train, y_train, x_test, y_test): float32 images `[N, 1, 8, 8]` scaled to
    [0, 1] and int64 labels `[N]` in 0..9.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"the digits data needs scikit-learn: {INSTALL_HINT}") from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_index, test_index = train_test_split(
        list(range(len(labels))), test_size=test_fraction, random_state=seed, stratify=digits.target)
    train_index, test_index = torch.tensor(train_index), torch.tensor(test_index)
    return images[train_index], labels[train_index], images[test_index], labels[test_index]


class TeacherCNN(nn.Module):
    """Two 3×3 convolutions, max-pooling and a two-layer head: `[N, 1, 8, 8] -> [N, 10]`."""

    def __init__(self, width: int = 16, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 16, 128), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(128, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class StudentMLP(nn.Module):
    """A one-hidden-layer perceptron without regularisation: `[N, 1, 8, 8] -> [N, 10]`."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _loader(images, labels, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle, generator=generator)


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image `[N, 1, H, W]` by an independent random offset in
    [-max_shift, max_shift]² pixels, filling with zeros (the digits' background)."""
    count, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    offset_y = torch.randint(0, 2 * max_shift + 1, (count,), generator=generator)
    offset_x = torch.randint(0, 2 * max_shift + 1, (count,), generator=generator)
    rows = (offset_y[:, None] + torch.arange(height)[None, :])[:, :, None]
    cols = (offset_x[:, None] + torch.arange(width)[None, :])[:, None, :]
    return padded[torch.arange(count)[:, None, None], 0, rows, cols].unsqueeze(1)


def train_teacher(images, labels, epochs: int, seed: int, batch_size: int = 64):
    """Supervised training of `TeacherCNN` with random shifts, AdamW and cosine decay.

    Returns (teacher in eval mode, list of mean training cross-entropy per epoch).
    """
    seed_everything(seed)
    teacher = TeacherCNN()
    curve = train_classifier(teacher, images, labels, epochs=epochs, seed=seed, lr=2e-3, batch_size=batch_size,
                             augment=random_shift)
    return teacher, curve


def train_student(teacher, train, test, loss: KDLoss, epochs: int, seed: int, hidden: int,
                  batch_size: int = 64, lr: float = 1e-2):
    """Train a fresh `StudentMLP` (initialised from `seed + 1000`) against `teacher` with `loss`.

    Returns (student, history) where history is `Distiller.history`.
    """
    torch.manual_seed(seed + 1000)  # the same initial student for every loss at this seed
    student = StudentMLP(hidden)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    train_loader = _loader(*train, batch_size=batch_size, shuffle=True, seed=seed)
    steps = epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    distiller = Distiller(student, teacher, loss, optimizer, scheduler, seed=seed, progress=False)
    history = distiller.fit(train_loader, epochs=epochs, eval_loader=_loader(*test, 512, False, seed))
    return student, history


def run_seed(seed: int, epochs: int, teacher_epochs: int, temperature: float, alpha: float,
             hidden: int) -> Dict[str, object]:
    """One seed of the experiment: teacher, student alone and distilled student."""
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    teacher, teacher_curve = train_teacher(x_train, y_train, teacher_epochs, seed)
    alone, alone_history = train_student(teacher, (x_train, y_train), (x_test, y_test),
                                         KDLoss(temperature=temperature, alpha=1.0), epochs, seed, hidden)
    distilled, distilled_history = train_student(teacher, (x_train, y_train), (x_test, y_test),
                                                 KDLoss(temperature=temperature, alpha=alpha), epochs, seed, hidden)
    return {
        "seed": seed,
        "teacher": accuracy(teacher, x_test, y_test),
        "student_alone": accuracy(alone, x_test, y_test),
        "distilled": accuracy(distilled, x_test, y_test),
        "agreement_alone": alone_history["eval"][-1]["agreement"],
        "agreement_distilled": distilled_history["eval"][-1]["agreement"],
        "curves": {
            "teacher_train_ce": teacher_curve,
            "alone_train_loss": [entry["loss"] for entry in alone_history["epoch"]],
            "distilled_train_loss": [entry["loss"] for entry in distilled_history["epoch"]],
            "alone_test_ce": [entry["ce"] for entry in alone_history["eval"]],
            "distilled_test_ce": [entry["ce"] for entry in distilled_history["eval"]],
            "alone_test_accuracy": [entry["accuracy"] for entry in alone_history["eval"]],
            "distilled_test_accuracy": [entry["accuracy"] for entry in distilled_history["eval"]],
        },
        "teacher_parameters": parameter_count(teacher),
        "student_parameters": parameter_count(alone),
    }


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def format_table(results: List[Dict[str, object]]) -> str:
    """Markdown table of test accuracy in percent: mean ± sample std over the seeds (mean alone for one seed)."""
    rows = [("teacher (CNN)", "teacher", results[0]["teacher_parameters"]),
            ("student alone", "student_alone", results[0]["student_parameters"]),
            ("student distilled", "distilled", results[0]["student_parameters"])]
    seeds = ", ".join(str(result["seed"]) for result in results)
    lines = [f"| model | parameters | test accuracy (%), seeds {seeds} |", "|---|---:|---:|"]
    for label, key, parameters in rows:
        mean, std = _mean_std([100.0 * float(result[key]) for result in results])
        spread = f" ± {std:.2f}" if len(results) > 1 else ""
        lines.append(f"| {label} | {parameters:,} | {mean:.2f}{spread} |")
    return "\n".join(lines)


def plot_curves(results: List[Dict[str, object]], path: str) -> None:
    """Loss and accuracy curves (mean over seeds) as a PNG."""
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"the loss-curve plot needs matplotlib: {INSTALL_HINT}") from error

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    def mean_curve(key: str) -> List[float]:
        curves = [result["curves"][key] for result in results]
        return [statistics.fmean(values) for values in zip(*curves)]

    figure, (train_axis, test_axis, accuracy_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    teacher_curve = mean_curve("teacher_train_ce")
    train_axis.plot(range(1, len(teacher_curve) + 1), teacher_curve, label="teacher (cross-entropy)", color="tab:gray")
    alone = mean_curve("alone_train_loss")
    train_axis.plot(range(1, len(alone) + 1), alone, label="student alone (cross-entropy)", color="tab:blue")
    distilled = mean_curve("distilled_train_loss")
    train_axis.plot(range(1, len(distilled) + 1), distilled, label="distilled (KD objective)", color="tab:orange")
    train_axis.set(title="training loss", xlabel="epoch", yscale="log")
    for key, label, color in (("alone_test_ce", "student alone", "tab:blue"),
                              ("distilled_test_ce", "distilled", "tab:orange")):
        curve = mean_curve(key)
        test_axis.plot(range(1, len(curve) + 1), curve, label=label, color=color)
    test_axis.set(title="test cross-entropy", xlabel="epoch")
    for key, label, color in (("alone_test_accuracy", "student alone", "tab:blue"),
                              ("distilled_test_accuracy", "distilled", "tab:orange")):
        curve = [100 * value for value in mean_curve(key)]
        accuracy_axis.plot(range(1, len(curve) + 1), curve, label=label, color=color)
    teacher_accuracy = 100 * statistics.fmean(float(result["teacher"]) for result in results)
    accuracy_axis.axhline(teacher_accuracy, color="tab:gray", linestyle="--", label="teacher")
    accuracy_axis.set(title="test accuracy (%)", xlabel="epoch")
    for axis in (train_axis, test_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"kdfast demo: digits, mean over {len(results)} seed(s)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """Adds the demo's options to `parser` (a new one when None) and returns it."""
    parser = parser or argparse.ArgumentParser(prog="kdfast demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs of the teacher and of each student (default 60; 8 with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds to average over (default 0 1 2; 0 with --quick)")
    parser.add_argument("--seed", type=int, default=None, help="a single seed (shorthand for --seeds N)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help=f"KD temperature T (default {DEFAULT_TEMPERATURE:g})")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"weight of the hard-label cross-entropy in the distilled loss "
                             f"(default {DEFAULT_ALPHA:g})")
    parser.add_argument("--hidden", type=int, default=128, help="student hidden width (default 128)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the models are too small to gain from more)")
    parser.add_argument("--quick", action="store_true",
                        help="reduced size for CI: one seed, 8 epochs; its numbers are not meaningful")
    return parser


def main(argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None) -> int:
    """Run the demo with command-line `argv` (or parsed `args`); returns 0 on success.

    Raises SystemExit with a message on invalid options.
    """
    if args is None:
        args = build_parser().parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        raise SystemExit("kdfast demo: give --seed or --seeds, not both")
    seeds = [args.seed] if args.seed is not None else list(args.seeds or ((0,) if args.quick else DEFAULT_SEEDS))
    if any(seed < 0 for seed in seeds):
        raise SystemExit(f"kdfast demo: seeds must be non-negative, got {seeds}")
    epochs = args.epochs if args.epochs is not None else (8 if args.quick else 60)
    if epochs < 1:
        raise SystemExit(f"kdfast demo: --epochs must be >= 1, got {epochs}")
    if not args.temperature > 0 or not math.isfinite(args.temperature):
        raise SystemExit(f"kdfast demo: --temperature must be > 0, got {args.temperature}")
    if not 0.0 <= args.alpha <= 1.0:
        raise SystemExit(f"kdfast demo: --alpha must be in [0, 1], got {args.alpha}")
    if args.hidden < 1:
        raise SystemExit(f"kdfast demo: --hidden must be >= 1, got {args.hidden}")
    if args.threads < 1:
        raise SystemExit(f"kdfast demo: --threads must be >= 1, got {args.threads}")
    teacher_epochs = epochs
    os.makedirs(args.out, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, seeds, epochs, teacher_epochs)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, seeds: List[int], epochs: int, teacher_epochs: int) -> int:
    started = time.perf_counter()
    if args.quick:
        print(QUICK_NOTE, flush=True)
    results = []
    for seed in seeds:
        result = run_seed(seed, epochs, teacher_epochs, args.temperature, args.alpha, args.hidden)
        results.append(result)
        print(f"seed {seed}: teacher {100 * result['teacher']:.2f}%  student alone "
              f"{100 * result['student_alone']:.2f}%  distilled {100 * result['distilled']:.2f}%", flush=True)
    elapsed = time.perf_counter() - started

    table = format_table(results)
    gains = [100.0 * (float(r["distilled"]) - float(r["student_alone"])) for r in results]
    gain_mean, gain_std = _mean_std(gains)
    print()
    print(f"digits (8×8), {epochs} epochs, T={args.temperature:g}, alpha={args.alpha:g}, "
          f"{len(seeds)} seed(s), {elapsed:.1f} s on {torch.get_num_threads()} thread(s)")
    if args.quick:
        print(QUICK_NOTE)
    print(table)
    spread = f" ± {gain_std:.2f}" if len(gains) > 1 else ""
    print(f"distillation gain over student alone: {gain_mean:+.2f}{spread} points")

    png_path = os.path.join(args.out, "loss_curves.png")
    plot_curves(results, png_path)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"epochs": epochs, "teacher_epochs": teacher_epochs, "temperature": args.temperature,
                   "alpha": args.alpha, "hidden": args.hidden, "seconds": elapsed, "results": results},
                  handle, indent=1)
    print(f"wrote {png_path} and {os.path.join(args.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
