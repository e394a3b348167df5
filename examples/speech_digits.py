"""Spoken-digit classification: distil a CNN teacher into a much smaller CNN student on MFCCs.

Offline default data: `examples/data/spoken_digits_mfcc.npz`, shipped with the repository
and built by `examples/make_spoken_digits.py` from speech synthesised with Debian's
`espeak-ng` (8 English accents × 16 voice variants = 128 synthetic speakers saying "zero" …
"nine" twice each at random speed and pitch, with random leading silence and white or brown
noise at 0–20 dB SNR; 2,560 clips). It holds MFCC features only, so running this example
needs neither espeak-ng nor audio files. Test speakers are held out: per seed, a quarter of
the speakers (stratified by voice variant) form the test split and only `--train-speakers`
of the rest are used for training, so the model must generalise to voices it never heard.

With `--speech-commands DIR` the script reads Google Speech Commands-style folders instead
(`DIR/zero/*.wav` … `DIR/nine/*.wav`, 8/16/32-bit PCM) with Python's `wave` module and the same
numpy MFCC code (no torchaudio); the speaker is the file-name prefix before `_nohash_`
(the whole stem otherwise), and held-out speakers form the test split.

MFCCs (`mfcc`): pre-emphasis 0.97, 25 ms Hamming frames every 20 ms, power spectrum, 26
mel filters over 20–8000 Hz, natural log, orthonormal DCT-II keeping 13 coefficients, then
a fixed 40-frame window (0.8 s) on the loudest stretch (a shorter clip is padded on both
sides with its own per-coefficient minimum, i.e. silence). Teacher: a 4-layer CNN (103,722
parameters); student: a 2-layer CNN (5,130 parameters). Per seed: train the teacher with
cross-entropy (random time shifts of up to ±3 frames), then train the same student twice
from the same initialisation and data order through `kdfast.Distiller`: alone
(`KDLoss(alpha=1)`, plain cross-entropy) and distilled with `--method` (default `kd`:
`KDLoss(temperature=T, alpha=α)` on the teacher's precomputed logits; see
`kdfast.methods.available_methods()`), and once more per name given to `--compare`. Prints
a Markdown table of test accuracy (mean ± sample std over seeds), writes `results.json` to
`--out`; `--smoke` is a seconds-long CI configuration whose numbers are not meaningful (it
says so in its output).

Needs: numpy (a dependency of kdfast) and nothing else: no audio library, no espeak-ng. Two
runs with the same seeds and `--threads` print the same numbers on the same machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
import wave
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.losses import KDLoss
from kdfast.methods import available_methods, build_method
from kdfast.supervised import accuracy, predict_logits, train_classifier
from kdfast.trainer import Distiller, seed_everything

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import SMOKE_NOTE, markdown_table, write_results  # noqa: E402

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "spoken_digits_mfcc.npz")
MFCC_CONFIG = {"pre_emphasis": 0.97, "frame_seconds": 0.025, "hop_seconds": 0.020, "mel_filters": 26,
               "low_hz": 20.0, "high_hz": 8000.0, "n_mfcc": 13, "frames": 40}

# Feature layers used by the feature-level methods: (student module, teacher module) names
# from `named_modules()`. "features" are the last convolutional maps (both [N, C, 3, 10]),
# "embedding" the pooled vectors the classifiers read.
FEATURE_LAYERS = {"fitnets": ("features", "features"), "attention": ("features", "features"),
                  "similarity": ("embedding", "embedding"), "rkd": ("embedding", "embedding")}


class DatasetUnavailable(Exception):
    """The dataset cannot be loaded here (file or folder absent)."""


# --------------------------------------------------------------------------------------
# Audio and MFCCs (numpy only)
# --------------------------------------------------------------------------------------


def read_wav(source) -> Tuple[np.ndarray, int]:
    """Read a PCM WAV (path or binary file object) with `wave`: float64 mono `[samples]` in [-1, 1], rate.

    8-, 16- and 32-bit integer PCM are supported; several channels are averaged.
    """
    with wave.open(source, "rb") as handle:
        channels, width, rate = handle.getnchannels(), handle.getsampwidth(), handle.getframerate()
        raw = handle.readframes(handle.getnframes())
    if width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(raw, dtype=dtype).astype(np.float64) / float(np.iinfo(dtype).max + 1)
    else:
        raise ValueError(f"unsupported WAV sample width {width} bytes (need 8-, 16- or 32-bit PCM)")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples, rate


def hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(filters: int, fft_size: int, sample_rate: int, low_hz: float, high_hz: float) -> np.ndarray:
    """Triangular filters equally spaced on the mel scale: float64 `[filters, fft_size // 2 + 1]`."""
    high_hz = min(high_hz, sample_rate / 2)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(low_hz), hz_to_mel(high_hz), filters + 2))
    bin_hz = np.arange(fft_size // 2 + 1) * sample_rate / fft_size
    left, centre, right = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bin_hz - left) / (centre - left)
    falling = (right - bin_hz) / (right - centre)
    return np.clip(np.minimum(rising, falling), 0.0, None)


def dct_matrix(count: int, size: int) -> np.ndarray:
    """Orthonormal DCT-II rows 0..count-1: `[count, size]`, so `dct_matrix(n, n)` is orthogonal."""
    k = np.arange(count)[:, None]
    n = np.arange(size)[None, :]
    matrix = np.cos(np.pi * k * (2 * n + 1) / (2 * size)) * np.sqrt(2.0 / size)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def mfcc(samples: np.ndarray, sample_rate: int, config: Optional[Dict[str, float]] = None) -> np.ndarray:
    """MFCCs of one clip: float32 `[n_mfcc, frames]` (coefficient-major, time along the last axis).

    Steps: pre-emphasis y[n] = x[n] − a·x[n−1]; Hamming-windowed frames of `frame_seconds`
    every `hop_seconds` (the clip is zero-padded to at least one frame); power spectrum
    |FFT|² / n_fft with n_fft the next power of two ≥ the frame length; `mel_filters`
    triangular mel filters over [low_hz, min(high_hz, rate/2)]; log(energy + 1e-10);
    orthonormal DCT-II keeping `n_mfcc` coefficients. Finally a fixed window of `frames`
    frames is taken: the stretch of that length with the most frame energy, or, for a
    shorter clip, the whole clip padded on both sides with its per-coefficient minimum (the
    quietest frame's values), so the word sits in the window whatever the leading silence.
    """
    config = dict(MFCC_CONFIG, **(config or {}))
    samples = np.asarray(samples, dtype=np.float64)
    emphasised = np.append(samples[:1], samples[1:] - config["pre_emphasis"] * samples[:-1])
    frame_length = int(round(config["frame_seconds"] * sample_rate))
    hop = int(round(config["hop_seconds"] * sample_rate))
    if len(emphasised) < frame_length:
        emphasised = np.pad(emphasised, (0, frame_length - len(emphasised)))
    count = 1 + (len(emphasised) - frame_length) // hop
    index = np.arange(frame_length)[None, :] + hop * np.arange(count)[:, None]
    frames = emphasised[index] * np.hamming(frame_length)
    fft_size = 1 << (frame_length - 1).bit_length()
    power = np.abs(np.fft.rfft(frames, n=fft_size, axis=1)) ** 2 / fft_size
    bank = mel_filterbank(int(config["mel_filters"]), fft_size, sample_rate, config["low_hz"], config["high_hz"])
    log_energy = np.log(power @ bank.T + 1e-10)                             # [count, filters]
    coefficients = log_energy @ dct_matrix(int(config["n_mfcc"]), bank.shape[0]).T  # [count, n_mfcc]
    width = int(config["frames"])
    frame_energy = power.sum(axis=1)
    if count > width:
        window_energy = np.convolve(frame_energy, np.ones(width), mode="valid")
        start = int(np.argmax(window_energy))
        coefficients = coefficients[start:start + width]
    elif count < width:
        before = (width - count) // 2
        floor = coefficients.min(axis=0, keepdims=True)  # pad with the clip's quietest values
        coefficients = np.concatenate([np.repeat(floor, before, 0), coefficients,
                                       np.repeat(floor, width - count - before, 0)])
    return coefficients.T.astype(np.float32)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def load_npz(path: str) -> Dict[str, np.ndarray]:
    """The shipped feature set: features float32 `[N, n_mfcc, frames]`, labels int64 `[N]`,
    speaker int64 `[N]`, speakers and variants (names per speaker)."""
    if not os.path.exists(path):
        raise DatasetUnavailable(f"no feature file at {path!r}; build it with examples/make_spoken_digits.py")
    with np.load(path) as data:
        return {"features": data["features"].astype(np.float32), "labels": data["labels"].astype(np.int64),
                "speaker": data["speaker"].astype(np.int64), "speakers": data["speakers"],
                "variants": data["variants"]}


def load_speech_commands(directory: str, max_per_digit: int = 0) -> Dict[str, np.ndarray]:
    """Google Speech Commands-style folders `directory/<digit word>/*.wav`, as `load_npz` returns.

    The speaker of `abcd1234_nohash_0.wav` is `abcd1234` (the file stem when there is no
    `_nohash_`). `max_per_digit > 0` keeps the first that many files (sorted) per digit.
    """
    features, labels, speaker_names = [], [], []
    for digit, word in enumerate(DIGITS):
        paths = sorted(glob.glob(os.path.join(directory, word, "*.wav")))
        if max_per_digit > 0:
            paths = paths[:max_per_digit]
        for path in paths:
            samples, rate = read_wav(path)
            features.append(mfcc(samples, rate))
            labels.append(digit)
            stem = os.path.splitext(os.path.basename(path))[0]
            speaker_names.append(stem.split("_nohash_")[0])
    if not features or len(set(labels)) < 2:
        raise DatasetUnavailable(f"no wav files under {directory!r}/<zero..nine>/ (found {len(features)})")
    speakers = sorted(set(speaker_names))
    lookup = {name: index for index, name in enumerate(speakers)}
    return {"features": np.stack(features), "labels": np.asarray(labels, dtype=np.int64),
            "speaker": np.asarray([lookup[name] for name in speaker_names], dtype=np.int64),
            "speakers": np.asarray(speakers), "variants": np.asarray(["-"] * len(speakers))}


def speaker_split(data: Dict[str, np.ndarray], seed: int, test_fraction: float,
                  train_speakers: int) -> Tuple[np.ndarray, np.ndarray]:
    """Index arrays (train, test) with disjoint speakers.

    Speakers are shuffled with `seed` within each voice variant and every variant sends
    round(test_fraction × its speakers) of them to the test split, so each variant is heard
    in training and in test but by different speakers; `train_speakers > 0` then keeps only
    that many of the remaining speakers for training (again spread over the variants).
    """
    rng = np.random.default_rng(seed)
    variants = data["variants"]
    test_speakers, train_pool = [], []
    for variant in sorted(set(variants.tolist())):
        members = rng.permutation(np.flatnonzero(variants == variant))
        cut = int(round(test_fraction * len(members)))
        if len(members) > 1:
            cut = min(max(cut, 1), len(members) - 1)
        test_speakers += members[:cut].tolist()
        train_pool.append(members[cut:].tolist())
    # Interleave the variants so that a prefix of the pool covers them evenly.
    ordered = [pool[i] for i in range(max(map(len, train_pool))) for pool in train_pool if i < len(pool)]
    chosen = ordered[:train_speakers] if train_speakers > 0 else ordered
    train = np.flatnonzero(np.isin(data["speaker"], chosen))
    test = np.flatnonzero(np.isin(data["speaker"], test_speakers))
    if len(train) == 0 or len(test) == 0:
        raise DatasetUnavailable(f"the speaker split left {len(train)} training and {len(test)} test clips")
    return train, test


# --------------------------------------------------------------------------------------
# Models: both read [N, 1, n_mfcc, frames] and expose "features" (last conv maps) and
# "embedding" (pooled vector) as named submodules for the feature-level methods.
# --------------------------------------------------------------------------------------


class TeacherCNN(nn.Module):
    """Four 3×3 conv layers with batch norm, two 2×2 max-pools, global average pooling, dropout."""

    def __init__(self, width: int = 32, classes: int = 10, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU())
        self.embedding = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, classes))

    def forward(self, mfccs: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(self.features(mfccs)))


class StudentCNN(nn.Module):
    """Two narrow 3×3 conv layers, each followed by a 2×2 max-pool, global average pooling, linear."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.embedding = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, mfccs: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(self.features(mfccs)))


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def random_time_shift(batch: torch.Tensor, generator: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Roll each `[1, n_mfcc, frames]` example by a random −max_shift..max_shift frames."""
    shifts = torch.randint(-max_shift, max_shift + 1, (len(batch),), generator=generator).tolist()
    return torch.stack([torch.roll(example, shift, dims=-1) for example, shift in zip(batch, shifts)])


def train_teacher(teacher: nn.Module, inputs, labels, epochs: int, seed: int, batch_size: int = 64) -> nn.Module:
    """Cross-entropy with random time shifts, AdamW(3e-3) and cosine decay; returns it in eval mode."""
    seed_everything(seed)
    train_classifier(teacher, inputs, labels, epochs=epochs, seed=seed, lr=3e-3, batch_size=batch_size,
                     augment=random_time_shift)
    return teacher


def train_student(args, inputs, labels, teacher: nn.Module, teacher_logits, method: Optional[str],
                  seed: int, batch_size: int = 64) -> nn.Module:
    """A fresh student (initialised from `seed + 1000`) trained with Adam and cosine decay.

    `method=None` trains it alone (`KDLoss(alpha=1)`: cross-entropy only); otherwise the loss
    is `kdfast.methods.build_method(method, ...)`, fed with the teacher's precomputed logits,
    or with the live teacher when the method reads teacher features.
    """
    torch.manual_seed(seed + 1000)
    student = StudentCNN(args.student_width)
    if method is None:
        loss = KDLoss(alpha=1.0)
    else:
        student_layer, teacher_layer = FEATURE_LAYERS.get(method, (None, None))
        loss = build_method(method, temperature=args.temperature, alpha=args.alpha, weight=args.method_weight,
                            student=student, teacher=teacher, student_layer=student_layer,
                            teacher_layer=teacher_layer, example_inputs=inputs[:8], num_classes=10)
    live_teacher = getattr(loss, "needs_teacher_forward", False)
    tensors = (inputs, labels) if live_teacher else (inputs, labels, teacher_logits)
    loader = DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    extra = loss.trainable_parameters() if hasattr(loss, "trainable_parameters") else []
    optimizer = torch.optim.Adam(list(student.parameters()) + extra, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(loader))
    Distiller(student, teacher if live_teacher else None, loss, optimizer, scheduler, seed=seed,
              progress=False).fit(loader, epochs=args.epochs)
    if hasattr(loss, "remove"):
        loss.remove()
    return student.eval()


# --------------------------------------------------------------------------------------
# Experiment
# --------------------------------------------------------------------------------------


def load_data(args) -> Dict[str, np.ndarray]:
    if args.speech_commands:
        return load_speech_commands(args.speech_commands, args.max_per_digit)
    return load_npz(args.data)


def standardise(train: np.ndarray, *others: np.ndarray) -> List[torch.Tensor]:
    """Per-coefficient mean/std from the training split; returns float32 `[N, 1, n_mfcc, frames]` tensors."""
    mean = train.mean(axis=(0, 2), keepdims=True)
    std = train.std(axis=(0, 2), keepdims=True) + 1e-6
    return [torch.from_numpy(((array - mean) / std).astype(np.float32)).unsqueeze(1) for array in (train, *others)]


def run_seed(args, data: Dict[str, np.ndarray], seed: int) -> Dict[str, float]:
    train_index, test_index = speaker_split(data, seed, args.test_fraction, args.train_speakers)
    x_train, x_test = standardise(data["features"][train_index], data["features"][test_index])
    y_train = torch.from_numpy(data["labels"][train_index])
    y_test = torch.from_numpy(data["labels"][test_index])
    torch.manual_seed(seed)
    teacher = train_teacher(TeacherCNN(args.teacher_width), x_train, y_train, args.teacher_epochs, seed)
    teacher_logits = predict_logits(teacher, x_train)
    alone = train_student(args, x_train, y_train, teacher, teacher_logits, None, seed)
    distilled = train_student(args, x_train, y_train, teacher, teacher_logits, args.method, seed)
    compared = {method: accuracy(train_student(args, x_train, y_train, teacher, teacher_logits, method, seed),
                                 x_test, y_test) for method in args.compare}
    return {"seed": seed, "teacher": accuracy(teacher, x_test, y_test),
            "student_alone": accuracy(alone, x_test, y_test), "distilled": accuracy(distilled, x_test, y_test),
            "compared": compared,
            "teacher_parameters": parameter_count(teacher), "student_parameters": parameter_count(alone),
            "train_size": len(train_index), "test_size": len(test_index),
            "train_speakers": int(len(np.unique(data["speaker"][train_index]))),
            "test_speakers": int(len(np.unique(data["speaker"][test_index])))}


def mean_std(values: Sequence[float], signed: bool = False) -> str:
    """"mean ± sample std" with two decimals (the mean alone for one value); `signed` writes +/−."""
    mean = statistics.fmean(values)
    text = f"{mean:+.2f}".replace("-", "−") if signed else f"{mean:.2f}"
    return f"{text} ± {statistics.stdev(values):.2f}" if len(values) > 1 else text


def format_table(args, rows: List[Dict[str, float]]) -> str:
    """Markdown table of test accuracy (%) for teacher, student alone and distilled student
    (and, with `--compare`, a second table with one row per compared method)."""
    first = rows[0]
    name = "speech commands" if args.speech_commands else "espeak digits"
    header = [f"{name} (train {first['train_size']} clips / {first['train_speakers']} speakers, test "
              f"{first['test_size']} / {first['test_speakers']})", "parameters",
              f"test accuracy (%), {len(rows)} seed(s)"]
    table = [[label, f"{count:,}", mean_std([100 * r[key] for r in rows])] for label, key, count in (
        ("teacher (CNN)", "teacher", first["teacher_parameters"]),
        ("student alone (small CNN)", "student_alone", first["student_parameters"]),
        (f"student distilled ({args.method}, α={args.alpha:g}, T={args.temperature:g})", "distilled",
         first["student_parameters"]))]
    table.append(["distilled − alone (points)", "",
                  mean_std([100 * (r["distilled"] - r["student_alone"]) for r in rows], signed=True)])
    text = markdown_table(header, table)
    if args.compare:
        compared = []
        for method in args.compare:
            values = [100 * r["compared"][method] for r in rows]
            gains = [100 * (r["compared"][method] - r["student_alone"]) for r in rows]
            compared.append([method, mean_std(values), mean_std(gains, signed=True),
                             f"{sum(g > 0 for g in gains)}/{len(gains)} seeds"])
        text += "\n\n" + markdown_table([f"method (α={args.alpha:g}, T={args.temperature:g})", "test accuracy (%)",
                                          "− alone (points)", "better than alone"], compared)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="MFCC feature file from make_spoken_digits.py (default: data/spoken_digits_mfcc.npz "
                             "beside this script)")
    parser.add_argument("--speech-commands", default=None, metavar="DIR",
                        help="read DIR/zero/*.wav … DIR/nine/*.wav instead of --data")
    parser.add_argument("--max-per-digit", type=int, default=0,
                        help="with --speech-commands: at most this many files per digit, 0 = all "
                             "(default: %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=0.25,
                        help="fraction of speakers held out for test (default: %(default)g)")
    parser.add_argument("--train-speakers", type=int, default=32,
                        help="training speakers used from the rest, 0 = all (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds to run and average over (default: 0 1 2)")
    parser.add_argument("--epochs", type=int, default=40, help="student epochs (default: %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs (default: %(default)s)")
    parser.add_argument("--teacher-width", type=int, default=32,
                        help="teacher's first conv width (default: %(default)s)")
    parser.add_argument("--student-width", type=int, default=16,
                        help="student's first conv width (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-2,
                        help="student learning rate, Adam with cosine decay (default: %(default)g)")
    parser.add_argument("--method", default="kd", choices=available_methods(), metavar="NAME",
                        help=f"distillation method from the kdfast.methods registry: "
                             f"{', '.join(available_methods())} (default: %(default)s)")
    parser.add_argument("--compare", nargs="*", default=[], choices=available_methods(), metavar="METHOD",
                        help="also distil with these methods (same teacher, seeds and data) and tabulate them "
                             "(default: none)")
    parser.add_argument("--method-weight", type=float, default=None,
                        help="weight β of the extra term of --method and of every --compare method "
                             "(default: each method's own, from the registry)")
    parser.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (default: %(default)g)")
    parser.add_argument("--alpha", type=float, default=0.5, help="hard-label weight α (default: %(default)g)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; results repeat exactly for the same value "
                             "(default: %(default)s)")
    parser.add_argument("--out", default=os.path.join("runs", "speech_digits"),
                        help="output directory for results.json (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long CI configuration: one seed, 16 training speakers, 2 epochs; "
                             "its numbers are not meaningful")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.seeds, args.train_speakers, args.epochs, args.teacher_epochs = [0], 16, 2, 1
    if not (args.temperature > 0 and 0 <= args.alpha <= 1 and args.lr > 0 and 0 < args.test_fraction < 1):
        raise SystemExit(f"need --temperature > 0, --alpha in [0, 1], --lr > 0 and --test-fraction in (0, 1), got "
                         f"{args.temperature}, {args.alpha}, {args.lr}, {args.test_fraction}")
    for name, value in (("--epochs", args.epochs), ("--teacher-epochs", args.teacher_epochs),
                        ("--teacher-width", args.teacher_width), ("--student-width", args.student_width),
                        ("--threads", args.threads)):
        if value < 1:
            raise SystemExit(f"{name} must be >= 1, got {value}")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        print(SMOKE_NOTE, flush=True)
    started = time.perf_counter()
    try:
        data = load_data(args)
    except DatasetUnavailable as reason:
        print(f"[speech] skipped: {reason}")
        return 0
    rows = []
    for seed in args.seeds:
        row = run_seed(args, data, seed)
        rows.append(row)
        compared = "".join(f"  {method} {100 * value:.2f}%" for method, value in row["compared"].items())
        print(f"seed {seed}: teacher {100 * row['teacher']:.2f}%  alone {100 * row['student_alone']:.2f}%  "
              f"distilled {100 * row['distilled']:.2f}%{compared}", flush=True)
    seconds = time.perf_counter() - started
    note = f"{SMOKE_NOTE}\n" if args.smoke else ""
    print(f"\n{seconds:.1f} s on {args.threads} thread(s)\n{note}{format_table(args, rows)}")
    write_results(args, seconds=seconds, results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
