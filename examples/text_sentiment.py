"""Text sentiment: distil a bidirectional-GRU teacher into a small convolutional student.

Offline default: no sentiment corpus ships with the packages this project depends on
(scikit-learn bundles no text set; its 20-newsgroups loader downloads, and NLTK's corpora
are separate downloads), so the script builds a synthetic review corpus deterministically
from a seeded grammar written for this example: short movie-review clauses ("the plot was
not very convincing") with hand-written positive and negative adjective lists, negation
("not", "never", "hardly") that flips a clause, and two-clause sentences where "but" makes
the second clause decide and "although" makes the first decide. It is not natural
language: it tests whether a student learns compositional rules (negation, contrast) from a
teacher, and has a known noise-free label. Training labels have `--label-noise` (default
15%) of their labels flipped, as annotators would; test labels are clean. With
`--dataset sst2` or `imdb` the script reads the released files under `--data-dir` (GLUE's
`SST-2/train.tsv` and `dev.tsv`; `aclImdb/{train,test}/{pos,neg}/*.txt`) when they are
there, else Hugging Face `datasets` when that package is installed and the data is
reachable or cached; otherwise it skips with a message.

Per seed: train the teacher with cross-entropy, then train the same student twice from the
same initialisation and data order through `kdfast.Distiller`: alone (`KDLoss(alpha=1)`)
and distilled with `--method` (default `kd`: `KDLoss(temperature=T, alpha=α)` on the
teacher's precomputed logits; any `kdfast.methods.available_methods()` name except
`attention`, as the GRU teacher exposes no feature maps, and `data_free`, whose generator
cannot produce token ids).
Prints a Markdown table of test accuracy (mean ± sample std over seeds), writes
`results.json` to `--out`; `--smoke` is a seconds-long CI configuration whose numbers are not
meaningful (it says so in its output).

Needs: nothing beyond kdfast and torch for the synthetic data; Hugging Face `datasets`
(not part of any kdfast extra) only for SST-2/IMDB without local files. Two runs with the
same seeds and `--threads` print the same numbers on the same machine.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from kdfast.losses import KDLoss
from kdfast.methods import available_methods, build_method
from kdfast.supervised import accuracy, predict_logits, train_classifier
from kdfast.trainer import Distiller, seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import SMOKE_NOTE, markdown_table, write_results  # noqa: E402

# --------------------------------------------------------------------------------------
# The synthetic review grammar
# --------------------------------------------------------------------------------------

SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the soundtrack", "the ending", "the script",
            "the cast", "the dialogue", "the camera work", "the pacing", "the story", "the lead actor",
            "the villain", "the sequel", "the final act", "the humour", "the set design"]
VERBS = ["was", "is", "felt", "seemed", "looked", "turned out"]
INTENSIFIERS = ["", "", "", "very", "really", "quite", "rather", "truly", "so", "utterly", "a bit"]
NEGATIONS = ["not", "never", "hardly"]
POSITIVE = ["good", "great", "brilliant", "moving", "charming", "gripping", "clever", "funny", "beautiful",
            "delightful", "superb", "convincing", "fresh", "tight", "memorable", "touching", "stylish", "solid",
            "inventive", "thrilling", "warm", "sharp", "elegant", "lovely"]
NEGATIVE = ["bad", "dull", "boring", "clumsy", "awful", "tedious", "bland", "silly", "messy", "weak", "flat",
            "forgettable", "lazy", "painful", "predictable", "shallow", "sloppy", "stale", "grating", "hollow",
            "tiresome", "cheap", "lifeless", "muddled"]
OPENERS = ["", "", "", "honestly", "overall", "in the end", "i think", "frankly", "to be fair"]


def _clause(rng: random.Random, polarity: int) -> str:
    """A clause whose sentiment is `polarity` (1 positive, 0 negative)."""
    negated = rng.random() < 0.4
    adjective_polarity = polarity ^ int(negated)
    adjective = rng.choice(POSITIVE if adjective_polarity else NEGATIVE)
    words = [rng.choice(SUBJECTS), rng.choice(VERBS)]
    if negated:
        words.append(rng.choice(NEGATIONS))
    intensifier = rng.choice(INTENSIFIERS)
    if intensifier:
        words.append(intensifier)
    words.append(adjective)
    return " ".join(words)


def make_review(rng: random.Random) -> Tuple[str, int]:
    """One sentence and its noise-free label (1 positive, 0 negative)."""
    label = rng.randrange(2)
    opener = rng.choice(OPENERS)
    form = rng.random()
    if form < 0.35:
        text = _clause(rng, label)
    elif form < 0.7:  # "A but B": B decides, A has the opposite sentiment
        text = f"{_clause(rng, 1 - label)} but {_clause(rng, label)}"
    elif form < 0.85:  # "A although B": A decides
        text = f"{_clause(rng, label)} although {_clause(rng, 1 - label)}"
    else:  # "A and B": both agree
        text = f"{_clause(rng, label)} and {_clause(rng, label)}"
    return (f"{opener} {text}" if opener else text), label


def synthetic_reviews(count: int, seed: int) -> Tuple[List[str], List[int]]:
    rng = random.Random(seed)
    pairs = [make_review(rng) for _ in range(count)]
    return [text for text, _ in pairs], [label for _, label in pairs]


class DatasetUnavailable(Exception):
    """The requested dataset cannot be loaded here."""


def _subset(texts, labels, size: int, seed: int):
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    order = order[:min(size, len(order))]
    return [texts[i] for i in order], [labels[i] for i in order]


def load_local_dataset(name: str, data_dir: str, train_size: int, test_size: int, seed: int):
    """SST-2 or IMDB from their released files under `data_dir`, or None when they are absent.

    SST-2: GLUE's `SST-2/train.tsv` and `SST-2/dev.tsv` (header `sentence<TAB>label`; dev is
    the test split, as GLUE's test labels are hidden). IMDB: `aclImdb/{train,test}/{pos,neg}/*.txt`.
    A seeded subset of `train_size` / `test_size` examples is taken from each split.
    """
    import csv
    import glob

    if name == "sst2":
        folder = os.path.join(data_dir, "SST-2")
        paths = [os.path.join(folder, f) for f in ("train.tsv", "dev.tsv")]
        if not all(os.path.exists(p) for p in paths):
            return None
        splits = []
        for path in paths:
            with open(path, encoding="utf-8", newline="") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
            if not rows or "sentence" not in rows[0] or "label" not in rows[0]:
                raise DatasetUnavailable(f"{path} lacks the header 'sentence<TAB>label'")
            splits.append(([r["sentence"] for r in rows], [int(r["label"]) for r in rows]))
    else:
        folder = os.path.join(data_dir, "aclImdb")
        if not os.path.isdir(os.path.join(folder, "train", "pos")):
            return None
        splits = []
        for split in ("train", "test"):
            texts, labels = [], []
            for label, polarity in ((1, "pos"), (0, "neg")):
                for path in sorted(glob.glob(os.path.join(folder, split, polarity, "*.txt"))):
                    with open(path, encoding="utf-8") as handle:
                        texts.append(handle.read().replace("<br />", " "))
                    labels.append(label)
            splits.append((texts, labels))
    (train_texts, train_labels), (test_texts, test_labels) = splits
    train_texts, train_labels = _subset(train_texts, train_labels, train_size, seed)
    test_texts, test_labels = _subset(test_texts, test_labels, test_size, seed + 1)
    return train_texts, train_labels, test_texts, test_labels


def load_hf_dataset(name: str, train_size: int, test_size: int, seed: int):
    try:
        import datasets
    except ImportError as error:
        raise DatasetUnavailable("the Hugging Face `datasets` package is not installed (pip install datasets) "
                                 "and no local files were found") from error
    try:
        if name == "sst2":
            data = datasets.load_dataset("glue", "sst2")
            train, test, field = data["train"], data["validation"], "sentence"
        else:
            data = datasets.load_dataset("imdb")
            train, test, field = data["train"], data["test"], "text"
    except Exception as error:  # offline, no cache, hub errors
        raise DatasetUnavailable(f"could not load {name}: {type(error).__name__}: {error}") from error
    train = train.shuffle(seed=seed).select(range(min(train_size, len(train))))
    test = test.shuffle(seed=seed).select(range(min(test_size, len(test))))
    return list(train[field]), list(train["label"]), list(test[field]), list(test["label"])


# --------------------------------------------------------------------------------------
# Tokens and models
# --------------------------------------------------------------------------------------


def tokenize(text: str) -> List[str]:
    return text.lower().replace(",", " ").replace(".", " ").split()


def build_vocabulary(texts: Sequence[str], min_count: int = 1) -> Dict[str, int]:
    """Word → id, with 0 = padding and 1 = unknown; ordered by frequency then spelling."""
    counts: Dict[str, int] = {}
    for text in texts:
        for word in tokenize(text):
            counts[word] = counts.get(word, 0) + 1
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return {word: index + 2 for index, word in enumerate(words)}


def encode(texts: Sequence[str], vocabulary: Dict[str, int], max_length: int) -> torch.Tensor:
    """int64 `[N, max_length]` token ids, right-padded with 0, truncated at `max_length`."""
    ids = torch.zeros(len(texts), max_length, dtype=torch.int64)
    for row, text in enumerate(texts):
        tokens = [vocabulary.get(word, 1) for word in tokenize(text)][:max_length]
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    return ids


class GRUTeacher(nn.Module):
    """Embedding → bidirectional GRU → linear on both final states: `[N, L]` int64 → `[N, 2]`."""

    def __init__(self, vocab_size: int, dim: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.gru = nn.GRU(dim, dim, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * dim, 2))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != 0).sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, hidden = self.gru(packed)
        return self.head(torch.cat([hidden[0], hidden[1]], dim=-1))


class ConvStudent(nn.Module):
    """Embedding → one width-3 convolution → max over time → linear: `[N, L]` int64 → `[N, 2]`."""

    def __init__(self, vocab_size: int, dim: int = 16, channels: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.conv = nn.Conv1d(dim, channels, 3, padding=1)
        self.pool = nn.Identity()  # names the pooled features for the feature-level methods
        self.head = nn.Linear(channels, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.conv(self.embedding(ids).transpose(1, 2)))
        features = features.masked_fill((ids == 0)[:, None, :], float("-inf")).amax(-1)
        return self.head(self.pool(torch.nan_to_num(features, neginf=0.0)))


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# --------------------------------------------------------------------------------------
# Training and the experiment
# --------------------------------------------------------------------------------------


def train_teacher(teacher: nn.Module, ids, labels, epochs: int, seed: int, batch_size: int = 64) -> nn.Module:
    seed_everything(seed)
    train_classifier(teacher, ids, labels, epochs=epochs, seed=seed, lr=3e-3, batch_size=batch_size)
    return teacher


def train_student(vocab_size: int, ids, labels, teacher: nn.Module, teacher_logits,
                  make_loss: Callable[[nn.Module], nn.Module], epochs: int, seed: int, batch_size: int = 64,
                  lr: float = 2e-2) -> nn.Module:
    """A fresh student (initialised from `seed + 1000`) trained with Adam and cosine decay.

    `make_loss(student)` returns the loss. The teacher's precomputed logits feed it, unless
    the loss reads teacher features (`needs_teacher_forward`): then the live teacher runs on
    every batch.
    """
    torch.manual_seed(seed + 1000)
    student = ConvStudent(vocab_size)
    loss = make_loss(student)
    live_teacher = getattr(loss, "needs_teacher_forward", False)
    tensors = (ids, labels) if live_teacher else (ids, labels, teacher_logits)
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


def method_loss(args, teacher: nn.Module, ids) -> Callable[[nn.Module], nn.Module]:
    """`make_loss` for `train_student`: the `--method` loss from the `kdfast.methods` registry.

    Feature methods compare the student's pooled convolution features (`"pool"`, `[N, 32]`)
    with the teacher's concatenated final GRU states (`"head.0"`, `[N, 128]`).
    """
    feature = args.method in ("fitnets", "similarity", "rkd", "attention")

    def make_loss(student: nn.Module) -> nn.Module:
        return build_method(args.method, temperature=args.temperature, alpha=args.alpha, weight=args.method_weight,
                            student=student, teacher=teacher, student_layer="pool" if feature else None,
                            teacher_layer="head.0" if feature else None, example_inputs=ids[:8], num_classes=2)
    return make_loss


def load_data(args, seed: int):
    if args.dataset == "synthetic":
        train_texts, train_labels = synthetic_reviews(args.train_size, seed)
        test_texts, test_labels = synthetic_reviews(args.test_size, 10_000 + seed)
        rng = random.Random(20_000 + seed)
        train_labels = [1 - y if rng.random() < args.label_noise else y for y in train_labels]
        return train_texts, train_labels, test_texts, test_labels
    local = load_local_dataset(args.dataset, args.data_dir, args.train_size, args.test_size, seed)
    if local is not None:
        return local
    return load_hf_dataset(args.dataset, args.train_size, args.test_size, seed)


def run_seed(args, seed: int) -> Dict[str, float]:
    train_texts, train_labels, test_texts, test_labels = load_data(args, seed)
    vocabulary = build_vocabulary(train_texts, min_count=1 if args.dataset == "synthetic" else 2)
    vocab_size = len(vocabulary) + 2
    x_train, x_test = encode(train_texts, vocabulary, args.max_length), encode(test_texts, vocabulary, args.max_length)
    y_train = torch.tensor(train_labels, dtype=torch.int64)
    y_test = torch.tensor(test_labels, dtype=torch.int64)
    torch.manual_seed(seed)
    teacher = train_teacher(GRUTeacher(vocab_size), x_train, y_train, args.teacher_epochs, seed)
    teacher_logits = predict_logits(teacher, x_train)
    alone = train_student(vocab_size, x_train, y_train, teacher, teacher_logits, lambda student: KDLoss(alpha=1.0),
                          args.epochs, seed, lr=args.lr)
    distilled = train_student(vocab_size, x_train, y_train, teacher, teacher_logits,
                              method_loss(args, teacher, x_train), args.epochs, seed, lr=args.lr)
    return {"seed": seed, "teacher": accuracy(teacher, x_test, y_test),
            "student_alone": accuracy(alone, x_test, y_test), "distilled": accuracy(distilled, x_test, y_test),
            "teacher_parameters": parameter_count(teacher), "student_parameters": parameter_count(alone)}


def mean_std(values: Sequence[float], signed: bool = False) -> str:
    """"mean ± sample std" with two decimals (the mean alone for one value); `signed` writes +/−."""
    mean = statistics.fmean(values)
    text = f"{mean:+.2f}".replace("-", "−") if signed else f"{mean:.2f}"
    return f"{text} ± {statistics.stdev(values):.2f}" if len(values) > 1 else text


def format_table(args, rows: List[Dict[str, float]]) -> str:
    """Markdown table of test accuracy (%) for teacher, student alone and distilled student."""
    first = rows[0]
    header = [f"{args.dataset} (train {args.train_size}, test {args.test_size})", "parameters",
              f"test accuracy (%), {len(rows)} seed(s)"]
    method = "" if args.method == "kd" else args.method + ", "
    table = [[label, f"{count:,}", mean_std([100 * r[key] for r in rows])] for label, key, count in (
        ("teacher (BiGRU)", "teacher", first["teacher_parameters"]),
        ("student alone (CNN)", "student_alone", first["student_parameters"]),
        (f"student distilled ({method}α={args.alpha:g}, T={args.temperature:g})", "distilled",
         first["student_parameters"]))]
    table.append(["distilled − alone (points)", "",
                  mean_std([100 * (r["distilled"] - r["student_alone"]) for r in rows], signed=True)])
    return markdown_table(header, table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("synthetic", "sst2", "imdb"), default="synthetic",
                        help="synthetic reviews (offline), or SST-2/IMDB from --data-dir or Hugging Face datasets "
                             "(default: %(default)s)")
    parser.add_argument("--data-dir", default="data",
                        help="folder with SST-2/{train,dev}.tsv (GLUE) or aclImdb/ (IMDB), read before trying "
                             "Hugging Face datasets (default: %(default)s)")
    parser.add_argument("--train-size", type=int, default=2000,
                        help="training examples (default: %(default)s)")
    parser.add_argument("--test-size", type=int, default=4000, help="test examples (default: %(default)s)")
    parser.add_argument("--label-noise", type=float, default=0.15,
                        help="fraction of flipped training labels, synthetic data only (default: %(default)g)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens kept per text (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds to run and average over (default: 0 1 2)")
    parser.add_argument("--epochs", type=int, default=20, help="student epochs (default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=15, help="teacher epochs (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-2,
                        help="student learning rate, Adam with cosine decay (default: %(default)g)")
    parser.add_argument("--temperature", type=float, default=2.0, help="KD temperature T (default: %(default)g)")
    parser.add_argument("--alpha", type=float, default=0.3, help="hard-label weight α (default: %(default)g)")
    parser.add_argument("--method", default="kd", choices=available_methods(), metavar="NAME",
                        help=f"distillation method from the kdfast.methods registry: "
                             f"{', '.join(available_methods())}; not attention: the GRU teacher exposes no "
                             "feature maps; not data_free: a generator cannot produce token ids "
                             "(default: %(default)s)")
    parser.add_argument("--method-weight", type=float, default=None,
                        help="weight β of the method's extra term (default: the registry's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; results repeat exactly for the same value "
                             "(default: %(default)s)")
    parser.add_argument("--out", default=os.path.join("runs", "text_sentiment"),
                        help="output directory for results.json (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long CI configuration: 256 synthetic reviews, one seed, 2 epochs; "
                             "its numbers are not meaningful")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.dataset, args.train_size, args.test_size, args.seeds = "synthetic", 256, 256, [0]
        args.epochs, args.teacher_epochs = 2, 1
    if not 0 <= args.label_noise < 0.5:
        raise SystemExit(f"--label-noise must be in [0, 0.5), got {args.label_noise}")
    if not (args.temperature > 0 and 0 <= args.alpha <= 1 and args.lr > 0):
        raise SystemExit(f"need --temperature > 0, --alpha in [0, 1] and --lr > 0, got "
                         f"{args.temperature}, {args.alpha}, {args.lr}")
    for name, value in (("--train-size", args.train_size), ("--test-size", args.test_size),
                        ("--epochs", args.epochs), ("--teacher-epochs", args.teacher_epochs),
                        ("--max-length", args.max_length), ("--threads", args.threads)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    if args.method == "attention":
        raise SystemExit("--method attention needs [N, C, *spatial] feature maps in both networks; this example's "
                         "GRU teacher has none (try fitnets, similarity or rkd for feature-level KD)")
    if args.method == "data_free":
        raise SystemExit("--method data_free generates continuous inputs, and this example's models read integer "
                         "token ids, which a generator cannot produce; see examples/data_free_digits.py and "
                         "examples/data_free_speech.py for data-free distillation")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        print(SMOKE_NOTE, flush=True)
    started = time.perf_counter()
    rows = []
    for seed in args.seeds:
        try:
            row = run_seed(args, seed)
        except DatasetUnavailable as reason:
            print(f"[{args.dataset}] skipped: {reason}")
            return 0
        rows.append(row)
        print(f"seed {seed}: teacher {100 * row['teacher']:.2f}%  alone {100 * row['student_alone']:.2f}%  "
              f"distilled {100 * row['distilled']:.2f}%", flush=True)
    seconds = time.perf_counter() - started
    note = f"{SMOKE_NOTE}\n" if args.smoke else ""
    print(f"\n{args.dataset}: {seconds:.1f} s on {args.threads} thread(s)\n{note}{format_table(args, rows)}")
    write_results(args, seconds=seconds, results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
