"""Data-free adversarial distillation on the 8×8 digits: a student that never sees an image.

Data: scikit-learn's bundled handwritten digits (`kdfast.demo.load_digits_split`: per seed a
stratified 539-image training split and 1,258 test images). Per seed the script trains a
small CNN teacher with BatchNorm on the training split (`kdfast.supervised.train_classifier`,
±1-pixel random shifts, dropout), then trains the same MLP student (`kdfast.demo.StudentMLP`,
the same initialisation for every variant) three ways:

- alone on the real training images (`KDLoss(alpha=1)`, plain cross-entropy, `--epochs`);
- distilled on the real training images (`KDLoss(temperature=T, alpha=α)`, `--epochs`);
- data-free: `build_method("data_free", ...)` driven by `kdfast.trainer.DataFreeDistiller`
  for `--steps` steps, each `--student-steps` student updates on generated images followed by
  one generator step (DFAD's L1 logit discrepancy by default, with the teacher's batch-norm
  statistics prior and a class-balance term as stabilisers). The student and the generator
  see only generated images; the test split is evaluated every `--eval-every` steps to draw
  the curve, which never feeds back into training.

It prints a Markdown table of test accuracy (mean ± sample std over the seeds), the ratio of
the data-free student's accuracy to the real-data distilled student's and the seconds each
data-free run took, writes `results.json` to `--out` and the accuracy-against-generator-steps
curve to `--plot` (matplotlib, imported only there). `--smoke` is a seconds-long
configuration whose numbers are not meaningful (it says so). Every random choice is seeded:
two runs with the same seeds and `--threads` print the same accuracies on the same machine.

Needs: scikit-learn (the digits) and matplotlib (the plot), the `examples` extra.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.demo import StudentMLP, load_digits_split, random_shift, train_student
from kdfast.losses import KDLoss
from kdfast.methods import build_method
from kdfast.methods.data_free import DISCREPANCIES
from kdfast.supervised import accuracy, train_classifier
from kdfast.trainer import DataFreeDistiller, seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import SMOKE_NOTE, markdown_table, require, require_at_least_one, write_results  # noqa: E402

DEFAULT_OUT = os.path.join("runs", "data_free_digits")


class BatchNormTeacher(nn.Module):
    """`kdfast.demo.TeacherCNN` with BatchNorm after each layer (its statistics are the
    generator's prior): `[N, 1, 8, 8] -> [N, 10]`."""

    def __init__(self, width: int = 16, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 16, 128), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(128, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def train_data_free(args, student: nn.Module, teacher: nn.Module, example: torch.Tensor, held_out, seed: int, *,
                    activation: str, lr: float):
    """Trains `student` data-free against `teacher` for `args.steps` steps (the options of
    `add_data_free_arguments`), evaluating on the tensors `held_out` every `args.eval_every`
    steps; returns (student, accuracy curve [(step, accuracy)], seconds)."""
    torch.manual_seed(seed + 2000)
    method = build_method("data_free", teacher=teacher, example_inputs=example, discrepancy=args.discrepancy,
                          temperature=args.temperature, alpha=0.0, latent_dim=args.latent_dim,
                          generator_width=args.generator_width, activation=activation, bn_weight=args.bn_weight,
                          balance_weight=args.balance_weight, generator_lr=args.generator_lr,
                          generator_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps))
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    distiller = DataFreeDistiller(student, teacher, method, optimizer, scheduler, batch_size=args.batch_size,
                                  student_steps=args.student_steps, seed=seed, eval_every=args.eval_every,
                                  progress=False)
    started = time.perf_counter()
    history = distiller.fit_data_free(args.steps, eval_loader=DataLoader(TensorDataset(*held_out), batch_size=2048))
    seconds = time.perf_counter() - started  # includes the curve's evaluations (a small share)
    method.remove()
    return student.eval(), [(entry["step"], entry["accuracy"]) for entry in history["eval"]], seconds


def data_free_student(args, teacher: nn.Module, example: torch.Tensor, test, seed: int):
    """The data-free run: returns (student, accuracy curve [(step, accuracy)], seconds)."""
    torch.manual_seed(seed + 1000)  # the same initial student as the real-data runs
    student = StudentMLP(args.hidden)
    return train_data_free(args, student, teacher, example, test, seed, activation="sigmoid", lr=args.lr)


def run_seed(args, seed: int) -> Dict[str, object]:
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    seed_everything(seed)
    teacher = BatchNormTeacher()
    train_classifier(teacher, x_train, y_train, epochs=args.teacher_epochs, seed=seed, lr=2e-3,
                     augment=random_shift)
    teacher.eval()
    train, test = (x_train, y_train), (x_test, y_test)
    alone, _ = train_student(teacher, train, test, KDLoss(alpha=1.0), args.epochs, seed, args.hidden, lr=args.lr)
    distilled, _ = train_student(teacher, train, test, KDLoss(temperature=args.temperature, alpha=args.alpha),
                                 args.epochs, seed, args.hidden, lr=args.lr)
    data_free, curve, seconds = data_free_student(args, teacher, x_train[:2], test, seed)
    return {"seed": seed, "teacher": accuracy(teacher, x_test, y_test),
            "student_alone": accuracy(alone, x_test, y_test), "distilled": accuracy(distilled, x_test, y_test),
            "data_free": accuracy(data_free, x_test, y_test), "data_free_seconds": seconds, "curve": curve,
            "teacher_parameters": parameter_count(teacher), "student_parameters": parameter_count(alone)}


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """"mean ± sample std" (the mean alone for one value)."""
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def format_table(args, results: List[Dict[str, object]]) -> str:
    first = results[0]
    rows = [["teacher (CNN with BatchNorm), real data", f"{first['teacher_parameters']:,}",
             mean_std([100 * r["teacher"] for r in results])],
            ["student alone, real data", f"{first['student_parameters']:,}",
             mean_std([100 * r["student_alone"] for r in results])],
            [f"student KD on real data (α={args.alpha:g}, T={args.temperature:g})", f"{first['student_parameters']:,}",
             mean_std([100 * r["distilled"] for r in results])],
            [f"student data-free ({args.discrepancy}, {args.steps} steps, no data)", f"{first['student_parameters']:,}",
             mean_std([100 * r["data_free"] for r in results])],
            ["data-free ÷ KD on real data", "", mean_std([r["data_free"] / r["distilled"] for r in results], 3)],
            ["seconds per data-free run", "", mean_std([r["data_free_seconds"] for r in results], 0)]]
    return markdown_table(["digits (train 539, test 1,258)", "parameters",
                           f"test accuracy (%), {len(results)} seed(s)"], rows)


def plot_curve(args, results: List[Dict[str, object]], path: str, task: str = "digits",
               split: str = "test") -> None:
    """Mean `split` accuracy of the data-free student against generator steps, with the others'
    levels (each result needs "curve", "teacher", "distilled" and "student_alone")."""
    matplotlib = require("matplotlib", "examples", ["matplotlib"], "the accuracy plot")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = [step for step, _ in results[0]["curve"]]
    mean = [100 * statistics.fmean(r["curve"][i][1] for r in results) for i in range(len(steps))]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    axis.plot(steps, mean, color="tab:green", marker=".", label="student, data-free")
    for key, label, color in (("teacher", "teacher", "tab:gray"), ("distilled", "student KD, real data", "tab:orange"),
                              ("student_alone", "student alone, real data", "tab:blue")):
        axis.axhline(100 * statistics.fmean(r[key] for r in results), color=color, linestyle="--", label=label)
    axis.set(xlabel="generator steps", ylabel=f"{split} accuracy (%)", ylim=(0, 100),
             title=f"data-free distillation on {task}, mean over {len(results)} seed(s)")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def add_data_free_arguments(parser: argparse.ArgumentParser, *, steps: int, eval_every: int, bn_weight: float,
                            inputs: str = "images", evaluation: str = "test") -> None:
    """The options every data-free example shares: seeds, the generator and the alternating steps."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds to run and average over (default: 0 1 2)")
    parser.add_argument("--steps", type=int, default=steps,
                        help="data-free steps, i.e. generator steps (default: %(default)s)")
    parser.add_argument("--student-steps", type=int, default=5,
                        help="student updates per data-free step (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help=f"generated {inputs} per update (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=eval_every,
                        help=f"steps between {evaluation} evaluations for the curve (default: %(default)s)")
    parser.add_argument("--discrepancy", choices=DISCREPANCIES, default="l1",
                        help="teacher–student discrepancy the generator raises and the student lowers "
                             "(default: %(default)s)")
    parser.add_argument("--bn-weight", type=float, default=bn_weight,
                        help="weight of the teacher's batch-norm statistics prior (default: %(default)g)")
    parser.add_argument("--balance-weight", type=float, default=1.0,
                        help="weight of the class-balance term of the generator (default: %(default)g)")
    parser.add_argument("--generator-lr", type=float, default=1e-2,
                        help="generator learning rate, Adam with cosine decay (default: %(default)g)")
    parser.add_argument("--latent-dim", type=int, default=64, help="generator noise width (default: %(default)s)")
    parser.add_argument("--generator-width", type=int, default=32,
                        help="generator channel width (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_free_arguments(parser, steps=2000, eval_every=100, bn_weight=50.0)
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="student learning rate, Adam with cosine decay, for every variant (default: %(default)g)")
    parser.add_argument("--epochs", type=int, default=60,
                        help="epochs of the real-data students (default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=60, help="teacher epochs (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=3.0,
                        help="KD temperature T of the real-data distillation and of the KL-type "
                             "discrepancies (default: %(default)g)")
    parser.add_argument("--alpha", type=float, default=0.7,
                        help="hard-label weight α of the real-data distillation (default: %(default)g)")
    parser.add_argument("--hidden", type=int, default=128, help="student hidden width (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; results repeat exactly for the same value (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for results.json (default: %(default)s)")
    parser.add_argument("--plot", default=os.path.join(DEFAULT_OUT, "accuracy_vs_generator_steps.png"),
                        help="PNG of the data-free accuracy curve (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long check: one seed, 10 steps, 2 epochs; its numbers are not meaningful")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.eval_every, args.epochs, args.teacher_epochs = [0], 10, 5, 2, 2
    require_at_least_one(args, ("steps", "student_steps", "batch_size", "eval_every", "latent_dim", "generator_width",
                                "epochs", "teacher_epochs", "hidden", "threads"))
    if not (args.temperature > 0 and 0 <= args.alpha <= 1 and args.lr > 0 and args.generator_lr > 0
            and args.bn_weight >= 0 and args.balance_weight >= 0):
        raise SystemExit("need --temperature, --lr, --generator-lr > 0, --alpha in [0, 1] and non-negative weights")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        print(SMOKE_NOTE, flush=True)
    results = []
    for seed in args.seeds:
        result = run_seed(args, seed)
        results.append(result)
        print(f"seed {seed}: teacher {100 * result['teacher']:.2f}%  alone {100 * result['student_alone']:.2f}%  "
              f"KD {100 * result['distilled']:.2f}%  data-free {100 * result['data_free']:.2f}% "
              f"({result['data_free_seconds']:.0f} s)", flush=True)
    note = f"{SMOKE_NOTE}\n" if args.smoke else ""
    print(f"\n{note}{format_table(args, results)}\n")
    plot_curve(args, results, args.plot)
    write_results(args, threads=torch.get_num_threads(), results=results)
    print(f"wrote {args.plot} and {os.path.join(args.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
