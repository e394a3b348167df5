"""Data-free adversarial distillation on spoken digits: a student that never hears a clip.

Data: the offline spoken-digit MFCCs of `speech_digits.py` (`examples/data/spoken_digits_mfcc.npz`,
espeak-ng speech, no download), split by speaker exactly as there: per seed a quarter of the
128 speakers are held out for test and `--train-speakers` of the rest train. Inputs are
standardised MFCCs `[N, 1, 13, 40]` (13 coefficients × 40 frames). Per seed the script trains
the speech example's CNN teacher (four conv layers with BatchNorm, 103,722 parameters) and
then the same small CNN student (5,130 parameters, the same initialisation for every variant)
three ways:

- alone on the real training clips (`KDLoss(alpha=1)`, plain cross-entropy, `--epochs`);
- distilled on the real training clips (`kd`: `KDLoss(temperature=T, alpha=α)`, `--epochs`),
  these two exactly as `speech_digits.py` trains them;
- data-free: `build_method("data_free", ...)` driven by `kdfast.trainer.DataFreeDistiller` for
  `--steps` steps, each `--student-steps` student updates on generated MFCC maps followed by
  one generator step. The generator (`kdfast.methods.Generator` for the shape `(1, 13, 40)`)
  produces standardised-MFCC-shaped inputs; its stabilisers are the teacher's batch-norm
  statistics prior and the class-balance term. The student and the generator see only
  generated inputs; the held-out split is evaluated every `--eval-every` steps to draw the
  curve, which never feeds back into training.

Hyper-parameters: `--validation F` holds out a fraction F of the *training* speakers as a
validation split (speaker-disjoint, drawn per seed), trains every model on the remaining
training speakers and reports validation accuracy; the test split is then neither loaded into
a tensor nor evaluated. The defaults of the data-free options were chosen that way (see
examples/README.md); the real-data options are `speech_digits.py`'s defaults.

It prints a Markdown table (mean ± sample std over the seeds), the ratio of the data-free
student's accuracy to the real-data distilled student's and the seconds each data-free run
took, writes `results.json` to `--out` and the accuracy-against-generator-steps curve to
`--plot` (matplotlib, imported only there). `--smoke` is a seconds-long configuration whose
numbers are not meaningful (it says so). Every random choice is seeded: two runs with the
same seeds and `--threads` print the same accuracies on the same machine.

Needs: numpy (the features) and matplotlib (the plot), the `examples` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from kdfast.supervised import accuracy, predict_logits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import SMOKE_NOTE, markdown_table, require_at_least_one, write_results  # noqa: E402
from data_free_digits import (  # noqa: E402
    add_data_free_arguments,
    mean_std,
    parameter_count,
    plot_curve,
    train_data_free,
)
from speech_digits import (  # noqa: E402
    DEFAULT_DATA,
    DatasetUnavailable,
    StudentCNN,
    TeacherCNN,
    load_npz,
    speaker_split,
    standardise,
    train_student,
    train_teacher,
)

DEFAULT_OUT = os.path.join("runs", "data_free_speech")


def validation_split(data: Dict[str, np.ndarray], train_index: np.ndarray, seed: int,
                     fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """Split the training clips by speaker: (fit, validation) index arrays.

    The training speakers are shuffled with `seed` and round(fraction × count) of them (at
    least one, at most all but one) form the validation split; no speaker is in both.
    """
    speakers = np.unique(data["speaker"][train_index])
    count = min(max(int(round(fraction * len(speakers))), 1), len(speakers) - 1)
    held_out = np.random.default_rng(seed + 10_000).permutation(speakers)[:count]
    in_validation = np.isin(data["speaker"][train_index], held_out)
    return train_index[~in_validation], train_index[in_validation]


def data_free_student(args, teacher, example: torch.Tensor, held_out, seed: int):
    """The data-free run: returns (student, accuracy curve [(step, accuracy)], seconds)."""
    torch.manual_seed(seed + 1000)  # the same initial student as the real-data runs
    student = StudentCNN(args.student_width)
    return train_data_free(args, student, teacher, example, held_out, seed, activation=args.activation,
                           lr=args.data_free_lr)


def run_seed(args, data: Dict[str, np.ndarray], seed: int) -> Dict[str, object]:
    train_index, held_out_index = speaker_split(data, seed, args.test_fraction, args.train_speakers)
    if args.validation > 0:  # the test split is left untouched
        train_index, held_out_index = validation_split(data, train_index, seed, args.validation)
    x_train, x_held_out = standardise(data["features"][train_index], data["features"][held_out_index])
    y_train = torch.from_numpy(data["labels"][train_index])
    y_held_out = torch.from_numpy(data["labels"][held_out_index])
    torch.manual_seed(seed)
    teacher = train_teacher(TeacherCNN(args.teacher_width), x_train, y_train, args.teacher_epochs, seed)
    teacher.eval()
    teacher_logits = predict_logits(teacher, x_train)
    alone = train_student(args, x_train, y_train, teacher, teacher_logits, None, seed)
    distilled = train_student(args, x_train, y_train, teacher, teacher_logits, "kd", seed)
    held_out = (x_held_out, y_held_out)
    data_free, curve, seconds = data_free_student(args, teacher, x_train[:2], held_out, seed)
    return {"seed": seed, "teacher": accuracy(teacher, *held_out), "student_alone": accuracy(alone, *held_out),
            "distilled": accuracy(distilled, *held_out), "data_free": accuracy(data_free, *held_out),
            "data_free_seconds": seconds, "curve": curve, "teacher_parameters": parameter_count(teacher),
            "student_parameters": parameter_count(alone), "train_size": len(train_index),
            "held_out_size": len(held_out_index),
            "train_speakers": int(len(np.unique(data["speaker"][train_index]))),
            "held_out_speakers": int(len(np.unique(data["speaker"][held_out_index])))}


def split_name(args) -> str:
    return "validation" if args.validation > 0 else "test"


def format_table(args, results: List[Dict[str, object]]) -> str:
    first = results[0]
    students = f"{first['student_parameters']:,}"
    rows = [["teacher (CNN with BatchNorm), real data", f"{first['teacher_parameters']:,}",
             mean_std([100 * r["teacher"] for r in results])],
            ["student alone (small CNN), real data", students, mean_std([100 * r["student_alone"] for r in results])],
            [f"student KD on real data (α={args.alpha:g}, T={args.temperature:g})", students,
             mean_std([100 * r["distilled"] for r in results])],
            [f"student data-free ({args.discrepancy}, {args.steps} steps, no data)", students,
             mean_std([100 * r["data_free"] for r in results])],
            ["data-free ÷ KD on real data", "", mean_std([r["data_free"] / r["distilled"] for r in results], 3)],
            ["seconds per data-free run", "", mean_std([r["data_free_seconds"] for r in results], 0)]]
    header = (f"spoken digits (train {first['train_size']} clips / {first['train_speakers']} speakers, "
              f"{split_name(args)} {first['held_out_size']} / {first['held_out_speakers']})")
    return markdown_table([header, "parameters", f"{split_name(args)} accuracy (%), {len(results)} seed(s)"], rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="MFCC feature file from make_spoken_digits.py (default: data/spoken_digits_mfcc.npz "
                             "beside this script)")
    add_data_free_arguments(parser, steps=300, eval_every=50, bn_weight=10.0, inputs="inputs",
                            evaluation="held-out")
    parser.add_argument("--validation", type=float, default=0.0,
                        help="hold out this fraction of the training speakers as a validation split and report "
                             "on it instead of the test split, for choosing hyper-parameters; 0 = report on the "
                             "test split (default: %(default)g)")
    parser.add_argument("--test-fraction", type=float, default=0.25,
                        help="fraction of speakers held out for test (default: %(default)g)")
    parser.add_argument("--train-speakers", type=int, default=32,
                        help="training speakers used from the rest, 0 = all (default: %(default)s)")
    parser.add_argument("--activation", choices=("none", "tanh"), default="none",
                        help="generator output activation; the inputs are standardised MFCCs, unbounded "
                             "(default: %(default)s)")
    parser.add_argument("--data-free-lr", type=float, default=1e-2,
                        help="data-free student learning rate, Adam with cosine decay (default: %(default)g)")
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="real-data students' learning rate, Adam with cosine decay (default: %(default)g)")
    parser.add_argument("--epochs", type=int, default=40,
                        help="epochs of the real-data students (default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs (default: %(default)s)")
    parser.add_argument("--teacher-width", type=int, default=32,
                        help="teacher's first conv width (default: %(default)s)")
    parser.add_argument("--student-width", type=int, default=16,
                        help="student's first conv width (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=4.0,
                        help="KD temperature T of the real-data distillation and of the KL-type "
                             "discrepancies (default: %(default)g)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="hard-label weight α of the real-data distillation (default: %(default)g)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; results repeat exactly for the same value (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for results.json (default: %(default)s)")
    parser.add_argument("--plot", default=os.path.join(DEFAULT_OUT, "accuracy_vs_generator_steps.png"),
                        help="PNG of the data-free accuracy curve (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long check: one seed, 16 training speakers, 6 steps, 1-2 epochs; "
                             "its numbers are not meaningful")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.seeds, args.train_speakers, args.steps, args.eval_every = [0], 16, 6, 3
        args.epochs, args.teacher_epochs, args.batch_size = 2, 1, 32
    require_at_least_one(args, ("steps", "student_steps", "batch_size", "eval_every", "latent_dim", "generator_width",
                                "epochs", "teacher_epochs", "teacher_width", "student_width", "threads"))
    if not (args.temperature > 0 and 0 <= args.alpha <= 1 and args.lr > 0 and args.data_free_lr > 0
            and args.generator_lr > 0 and args.bn_weight >= 0 and args.balance_weight >= 0
            and 0 < args.test_fraction < 1 and 0 <= args.validation < 1):
        raise SystemExit("need --temperature, --lr, --data-free-lr, --generator-lr > 0, --alpha in [0, 1], "
                         "non-negative weights, --test-fraction in (0, 1) and --validation in [0, 1)")
    args.method_weight = None  # read by speech_digits.train_student: the registry's default
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        print(SMOKE_NOTE, flush=True)
    try:
        data = load_npz(args.data)
    except DatasetUnavailable as reason:
        raise SystemExit(f"[data-free speech] {reason}") from None
    results = []
    for seed in args.seeds:
        result = run_seed(args, data, seed)
        results.append(result)
        print(f"seed {seed} ({split_name(args)}): teacher {100 * result['teacher']:.2f}%  "
              f"alone {100 * result['student_alone']:.2f}%  KD {100 * result['distilled']:.2f}%  "
              f"data-free {100 * result['data_free']:.2f}% ({result['data_free_seconds']:.0f} s)", flush=True)
    note = f"{SMOKE_NOTE}\n" if args.smoke else ""
    print(f"\n{note}{format_table(args, results)}\n")
    plot_curve(args, results, args.plot, task="spoken digits", split=split_name(args))
    write_results(args, threads=torch.get_num_threads(), results=results)
    print(f"wrote {args.plot} and {os.path.join(args.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
