"""Image classification: distil a CNN teacher into a small MLP student, with an α/T search.

Datasets: scikit-learn's bundled handwritten digits (8×8, 1,797 images, always available
offline) and, when their released files already sit under `--data-dir`, MNIST (the four IDX
files, plain or .gz, also in torchvision's `MNIST/raw/` layout) and CIFAR-10 (the
`cifar-10-batches-py` pickles), read with numpy (no torchvision needed; never downloaded; a
dataset that is unavailable is skipped with a message and the script still exits 0). Per
dataset and seed the script trains the teacher on the labelled training split (hard labels,
±1-pixel random shifts, dropout), then trains the same student twice from the same
initialisation and data order through `kdfast.Distiller`: alone (`KDLoss(alpha=1)`, plain
cross-entropy) and distilled with `--method` (default `kd`: `KDLoss(temperature=T, alpha=α)`
on the teacher's precomputed logits; any name of `kdfast.methods.available_methods()` except
`attention`, which needs feature maps the MLP student does not have; the feature methods
compare the student's hidden layer with the teacher's last hidden layer and run the teacher
live). With `--tune` it first picks α and T by k-fold cross-validation on the first seed's
training split (`kdfast.tuning`), never touching the test split. It prints a Markdown table
of test accuracy (mean ± sample std over seeds)
and writes `results.json` to `--out`. `--smoke` is a seconds-long configuration for CI whose
numbers are not meaningful (it says so in its output).

Needs: scikit-learn (the digits data; the `examples` extra). Two runs with the same seeds
and `--threads` print the same numbers on the same machine.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.demo import TeacherCNN, load_digits_split, random_shift
from kdfast.losses import KDLoss
from kdfast.methods import available_methods, build_method
from kdfast.supervised import accuracy, predict_logits, train_classifier
from kdfast.trainer import Distiller, seed_everything
from kdfast.tuning import distillation_objective, grid_candidates, search_kd_hyperparameters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import SMOKE_NOTE, markdown_table, write_results  # noqa: E402

DATASETS = ("digits", "mnist", "cifar10")
EVAL_BATCH = 1024  # rows per evaluation batch


class DatasetUnavailable(Exception):
    """The dataset cannot be loaded here (package missing or files absent)."""


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def _read_idx(path: str):
    """An IDX file (MNIST's format: big-endian header, then uint8 data), plain or .gz."""
    import gzip

    import numpy

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise DatasetUnavailable(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(magic & 0xFF)]
    offset = 4 + 4 * len(dims)
    count = int(numpy.prod(dims))
    if len(data) - offset != count:
        raise DatasetUnavailable(f"{path} is truncated: {len(data) - offset} bytes of data for shape {dims}")
    return numpy.frombuffer(data, dtype=numpy.uint8, offset=offset).reshape(dims)


def _find(directory: str, stem: str) -> Optional[str]:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    return None


def load_mnist_files(data_dir: str):
    """MNIST from the IDX files under `data_dir` (or its `MNIST/raw/`, torchvision's layout)."""
    for directory in (data_dir, os.path.join(data_dir, "MNIST", "raw")):
        paths = [_find(directory, stem) for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                      "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
        if all(paths):
            images_train, labels_train, images_test, labels_test = (_read_idx(p) for p in paths)
            return ((images_train[:, None], labels_train), (images_test[:, None], labels_test))
    raise DatasetUnavailable(f"no MNIST IDX files under {data_dir!r} (train-images-idx3-ubyte[.gz], ...)")


def load_cifar10_files(data_dir: str):
    """CIFAR-10 from the python pickles under `data_dir/cifar-10-batches-py` (its release layout)."""
    import pickle

    import numpy

    directory = os.path.join(data_dir, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not all(os.path.exists(os.path.join(directory, name)) for name in names):
        raise DatasetUnavailable(f"no CIFAR-10 batches under {directory!r} (data_batch_1..5, test_batch)")
    parts = []
    for name in names:
        with open(os.path.join(directory, name), "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        images = numpy.asarray(batch[b"data"], dtype=numpy.uint8).reshape(-1, 3, 32, 32)
        parts.append((images, numpy.asarray(batch[b"labels"], dtype=numpy.int64)))
    train = (numpy.concatenate([p[0] for p in parts[:5]]), numpy.concatenate([p[1] for p in parts[:5]]))
    return train, parts[5]


def load_image_files(name: str, data_dir: str, train_subset: int, seed: int):
    """MNIST or CIFAR-10 from their released files in `data_dir` (never downloaded), read with
    numpy: float32 `[N, C, H, W]` in [0, 1] and int64 labels; a seeded subset of the training split."""
    (x_train, y_train), (x_test, y_test) = (load_mnist_files if name == "mnist" else load_cifar10_files)(data_dir)

    def tensors(images, labels):
        return (torch.as_tensor(images.astype("float32") / 255.0).contiguous(),
                torch.as_tensor(labels.astype("int64")))

    x_train, y_train = tensors(x_train, y_train)
    x_test, y_test = tensors(x_test, y_test)
    if 0 < train_subset < len(y_train):
        index = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))[:train_subset]
        x_train, y_train = x_train[index], y_train[index]
    return x_train, y_train, x_test, y_test


def load_split(name: str, seed: int, data_dir: str, train_subset: int):
    """Returns (x_train, y_train, x_test, y_test); raises DatasetUnavailable."""
    if name == "digits":
        return load_digits_split(seed)
    return load_image_files(name, data_dir, train_subset, seed)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


class ConvTeacher(nn.Module):
    """Three conv blocks with global average pooling: `[N, C, H, W] -> [N, classes]` (any H, W ≥ 4)."""

    def __init__(self, channels: int, classes: int = 10, width: int = 32, dropout: float = 0.3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * width, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def make_teacher(name: str, image_shape: Sequence[int]) -> nn.Module:
    return TeacherCNN() if name == "digits" else ConvTeacher(image_shape[0])


def feature_layers(name: str, method: str) -> Tuple[Optional[str], Optional[str]]:
    """(student, teacher) module names whose outputs the feature-level methods compare.

    Both are the vector the classifier reads: the student MLP's hidden activation
    (`"2"`, `[N, hidden]`) and the teacher's last hidden layer (`[N, 128]`: `TeacherCNN`'s
    `"head.3"`, `ConvTeacher`'s pooled `"net.12"`). None for the logit-level methods.
    """
    if method not in ("fitnets", "similarity", "rkd", "attention"):
        return None, None
    return "2", ("head.3" if name == "digits" else "net.12")


def make_student(image_shape: Sequence[int], hidden: int) -> nn.Module:
    """A one-hidden-layer MLP on the flattened image: `[N, C, H, W] -> [N, 10]`."""
    features = math.prod(image_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def train_teacher(make: Callable[[], nn.Module], images, labels, epochs: int, seed: int,
                  batch_size: int = 64) -> nn.Module:
    """Builds the teacher with `make()` after seeding every generator with `seed` (so its
    initialisation repeats), then trains it with cross-entropy, ±1-pixel random shifts,
    AdamW(2e-3) and cosine decay; returns it in eval mode."""
    seed_everything(seed)
    teacher = make()
    train_classifier(teacher, images, labels, epochs=epochs, seed=seed, lr=2e-3, batch_size=batch_size,
                     augment=random_shift)
    return teacher


def train_student(image_shape, hidden: int, images, labels, teacher: nn.Module, teacher_logits,
                  make_loss: Callable[[nn.Module], nn.Module], epochs: int, seed: int, batch_size: int = 64,
                  lr: float = 1e-2) -> nn.Module:
    """A fresh student (initialised from `seed + 1000`) trained with Adam and cosine decay.

    `make_loss(student)` returns the loss. The teacher's precomputed logits feed it, unless
    the loss reads teacher features (`needs_teacher_forward`, the feature methods of
    `kdfast.methods.build_method`): then the live teacher runs on every batch.
    """
    torch.manual_seed(seed + 1000)
    student = make_student(image_shape, hidden)
    loss = make_loss(student)
    live_teacher = getattr(loss, "needs_teacher_forward", False)
    tensors = (images, labels) if live_teacher else (images, labels, teacher_logits)
    loader = DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    extra = loss.trainable_parameters() if hasattr(loss, "trainable_parameters") else []
    optimizer = torch.optim.Adam(list(student.parameters()) + extra, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    Distiller(student, teacher if live_teacher else None, loss, optimizer, scheduler, seed=seed,
              progress=False).fit(loader, epochs=epochs)
    if hasattr(loss, "remove"):
        loss.remove()  # the feature hooks
    return student.eval()


def method_loss(args, name: str, teacher: nn.Module, images, temperature: float, alpha: float):
    """`make_loss` for `train_student`: the `--method` loss from the `kdfast.methods` registry."""
    student_layer, teacher_layer = feature_layers(name, args.method)

    def make_loss(student: nn.Module) -> nn.Module:
        return build_method(args.method, temperature=temperature, alpha=alpha, weight=args.method_weight,
                            student=student, teacher=teacher, student_layer=student_layer,
                            teacher_layer=teacher_layer, example_inputs=images[:8], num_classes=10)
    return make_loss


# --------------------------------------------------------------------------------------
# Experiment
# --------------------------------------------------------------------------------------


def tune(name: str, args, x_train, y_train, teacher_logits) -> Tuple[Dict[str, float], str]:
    """k-fold CV search over α × T on the training split; returns (best params, table)."""
    image_shape = tuple(x_train.shape[1:])
    objective = distillation_objective(lambda: make_student(image_shape, args.hidden), x_train, y_train,
                                       teacher_logits=teacher_logits, epochs=args.tune_epochs, lr=args.lr,
                                       seed=args.seeds[0])
    candidates = grid_candidates(args.tune_alphas, args.tune_temperatures)
    result = search_kd_hyperparameters(objective, len(y_train), candidates=candidates, folds=args.folds,
                                       labels=y_train, seed=args.seeds[0], metric="val accuracy", verbose=False)
    return dict(result.best.params), result.table()


def run_dataset(name: str, args) -> Optional[Dict[str, object]]:
    started = time.perf_counter()
    temperature, alpha = args.temperature, args.alpha
    tuning_table = None
    per_seed = []
    for index, seed in enumerate(args.seeds):
        x_train, y_train, x_test, y_test = load_split(name, seed, args.data_dir, args.train_subset)
        image_shape = tuple(x_train.shape[1:])
        teacher = train_teacher(lambda: make_teacher(name, image_shape), x_train, y_train, args.teacher_epochs, seed)
        teacher_logits = predict_logits(teacher, x_train, EVAL_BATCH)
        if args.tune and index == 0:
            best, tuning_table = tune(name, args, x_train, y_train, teacher_logits)
            temperature, alpha = best["temperature"], best["alpha"]
            print(f"[{name}] {args.folds}-fold CV on the training split chose alpha={alpha:g}, T={temperature:g}")
            print(f"{SMOKE_NOTE}\n{tuning_table}" if args.smoke else tuning_table, flush=True)
        alone = train_student(image_shape, args.hidden, x_train, y_train, teacher, teacher_logits,
                              lambda student: KDLoss(alpha=1.0), args.epochs, seed, lr=args.lr)
        distilled = train_student(image_shape, args.hidden, x_train, y_train, teacher, teacher_logits,
                                  method_loss(args, name, teacher, x_train, temperature, alpha), args.epochs,
                                  seed, lr=args.lr)
        row = {"seed": seed, "teacher": accuracy(teacher, x_test, y_test, EVAL_BATCH),
               "student_alone": accuracy(alone, x_test, y_test, EVAL_BATCH),
               "distilled": accuracy(distilled, x_test, y_test, EVAL_BATCH),
               "teacher_parameters": parameter_count(teacher), "student_parameters": parameter_count(alone),
               "train_size": len(y_train), "test_size": len(y_test)}
        per_seed.append(row)
        print(f"[{name}] seed {seed}: teacher {100 * row['teacher']:.2f}%  alone {100 * row['student_alone']:.2f}%  "
              f"distilled {100 * row['distilled']:.2f}%", flush=True)
    return {"dataset": name, "method": args.method, "temperature": temperature, "alpha": alpha,
            "tuning_table": tuning_table,
            "seconds": time.perf_counter() - started, "seeds": per_seed}


def mean_std(values: Sequence[float], signed: bool = False) -> str:
    """"mean ± sample std" with two decimals (the mean alone for one value); `signed` writes +/−."""
    mean = statistics.fmean(values)
    text = f"{mean:+.2f}".replace("-", "−") if signed else f"{mean:.2f}"
    return f"{text} ± {statistics.stdev(values):.2f}" if len(values) > 1 else text


def method_label(method: str) -> str:
    return "" if method == "kd" else f"{method}, "


def format_table(result: Dict[str, object]) -> str:
    """Markdown table of test accuracy (%) for teacher, student alone and distilled student."""
    seeds = result["seeds"]
    first = seeds[0]
    header = [f"{result['dataset']} (train {first['train_size']}, test {first['test_size']})", "parameters",
              f"test accuracy (%), {len(seeds)} seed(s)"]
    rows = []
    for label, key, count in (("teacher (CNN)", "teacher", first["teacher_parameters"]),
                              ("student alone", "student_alone", first["student_parameters"]),
                              (f"student distilled ({method_label(result['method'])}α={result['alpha']:g}, "
                               f"T={result['temperature']:g})",
                               "distilled", first["student_parameters"])):
        rows.append([label, f"{count:,}", mean_std([100 * s[key] for s in seeds])])
    gains = [100 * (s["distilled"] - s["student_alone"]) for s in seeds]
    rows.append(["distilled − alone (points)", "", mean_std(gains, signed=True)])
    return markdown_table(header, rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), metavar="NAME",
                        help=f"datasets to run, from {', '.join(DATASETS)}; unavailable ones are skipped "
                             "(default: all)")
    parser.add_argument("--data-dir", default="data",
                        help="folder with MNIST IDX files or cifar-10-batches-py/, never downloaded "
                             "(default: %(default)s)")
    parser.add_argument("--train-subset", type=int, default=5000,
                        help="training images used from MNIST/CIFAR-10, 0 = all (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds to run and average over (default: 0 1 2)")
    parser.add_argument("--epochs", type=int, default=60, help="student epochs (default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=60, help="teacher epochs (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=128, help="student hidden width (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-2, help="student learning rate, Adam (default: %(default)g)")
    parser.add_argument("--temperature", type=float, default=3.0,
                        help="KD temperature T when not tuning (default: %(default)g)")
    parser.add_argument("--alpha", type=float, default=0.7,
                        help="hard-label weight α when not tuning (default: %(default)g)")
    parser.add_argument("--method", default="kd", choices=available_methods(), metavar="NAME",
                        help=f"distillation method from the kdfast.methods registry: "
                             f"{', '.join(available_methods())}; attention needs feature maps in both networks, "
                             "which the MLP student lacks (default: %(default)s)")
    parser.add_argument("--method-weight", type=float, default=None,
                        help="weight β of the method's extra term (default: the registry's)")
    parser.add_argument("--tune", action="store_true",
                        help="choose α and T by k-fold CV first (searched with forward-KL KD, then used by --method)")
    parser.add_argument("--folds", type=int, default=3, help="folds of the α/T search (default: %(default)s)")
    parser.add_argument("--tune-epochs", type=int, default=30,
                        help="student epochs per fold in the search (default: %(default)s)")
    parser.add_argument("--tune-alphas", type=float, nargs="+", default=[0.3, 0.7],
                        help="α values searched by --tune (default: 0.3 0.7)")
    parser.add_argument("--tune-temperatures", type=float, nargs="+", default=[1.0, 3.0, 6.0],
                        help="T values searched by --tune (default: 1 3 6)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; results repeat exactly for the same value "
                             "(default: %(default)s)")
    parser.add_argument("--out", default=os.path.join("runs", "image_digits"),
                        help="output directory for results.json (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long CI configuration: digits, one seed, 2 epochs, a 2×1 grid with 2 folds; "
                             "its numbers are not meaningful")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.datasets, args.seeds, args.epochs, args.teacher_epochs = ["digits"], [0], 2, 2
        args.tune, args.folds, args.tune_epochs = True, 2, 1
        args.tune_alphas, args.tune_temperatures = [0.5, 0.9], [2.0]
    for name, value in (("--epochs", args.epochs), ("--teacher-epochs", args.teacher_epochs),
                        ("--hidden", args.hidden), ("--threads", args.threads)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    if not (args.temperature > 0 and 0 <= args.alpha <= 1):
        raise SystemExit(f"need --temperature > 0 and --alpha in [0, 1], got {args.temperature}, {args.alpha}")
    if args.method == "attention":
        raise SystemExit("--method attention needs [N, C, H, W] feature maps in both networks; this example's "
                         "student is an MLP (try fitnets, similarity or rkd for feature-level KD)")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        print(SMOKE_NOTE, flush=True)
    results = []
    for name in args.datasets:
        try:
            result = run_dataset(name, args)
        except DatasetUnavailable as reason:
            print(f"[{name}] skipped: {reason}")
            continue
        results.append(result)
        note = f"{SMOKE_NOTE}\n" if args.smoke else ""
        print(f"\n{name}: {result['seconds']:.1f} s on {args.threads} thread(s)\n{note}{format_table(result)}\n",
              flush=True)
    write_results(args, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
