"""Build the offline spoken-digit feature set `examples/data/spoken_digits_mfcc.npz`.

The clips are synthesised with Debian's `espeak-ng` (not a Python dependency; only this
script needs it, `apt-get install espeak-ng`): every speaker — one English accent
(`en-us`, `en-gb-scotland`, ...) combined with one voice variant (`+m3`, `+f2`, `+klatt`,
...) — says "zero" … "nine" `--takes` times, each take at a random speed (`-s`), pitch
(`-p`) and pitch range (`-a` is kept fixed). Each waveform is read with the `wave` module,
given a random amount of leading silence, mixed with white or brown noise at a random
signal-to-noise ratio, and turned into MFCCs by `speech_digits.mfcc` (the same numpy code
the example applies to real recordings). The output is one compressed `.npz` with

- `features`: float16 `[N, n_mfcc, frames]` MFCCs, rounded to multiples of 1/32 (far below
  the spread of every coefficient, ≥ 0.9) so that the file compresses to about 1.7 MB,
- `labels`: int64 `[N]` digit 0–9,
- `speaker`: int64 `[N]` speaker index into `speakers`,
- `speakers`: str `[S]` names "accent+variant", `accents` / `variants`: str `[S]`,
- `speed`, `pitch`: int16 `[N]` the espeak-ng settings, `snr_db`: float16 `[N]`,
- `sample_rate`, `seed`: the synthesis parameters, `mfcc_config`: JSON of the MFCC settings.

The shipped file was made with the defaults (`python examples/make_spoken_digits.py`);
the same espeak-ng version and seed reproduce it.

Needs: the `espeak-ng` program (a system package, not a Python one) and numpy. Nothing else
in the examples needs it: they read the shipped file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speech_digits import DEFAULT_DATA, DIGITS, MFCC_CONFIG, mfcc, read_wav  # noqa: E402

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc")
QUANTUM = 32  # features are stored as multiples of 1 / QUANTUM
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "croak")


def synthesise(word: str, voice: str, speed: int, pitch: int, espeak: str = "espeak-ng") -> Tuple[np.ndarray, int]:
    """One espeak-ng utterance as float64 samples in [-1, 1] and its sample rate."""
    completed = subprocess.run([espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                               check=True, capture_output=True)
    return read_wav(io.BytesIO(completed.stdout))


def add_noise(samples: np.ndarray, snr_db: float, brown: bool, rng: np.random.Generator) -> np.ndarray:
    """Mix white (or brown: integrated white, zero-mean) noise at `snr_db` relative to the
    mean power of the voiced part (samples above 1% of the peak)."""
    noise = rng.standard_normal(len(samples))
    if brown:
        noise = np.cumsum(noise)
        noise -= np.convolve(noise, np.ones(201) / 201, mode="same")  # remove the slow drift
    voiced = samples[np.abs(samples) > 0.01 * np.abs(samples).max()]
    signal_power = float(np.mean(voiced ** 2)) if voiced.size else 1e-8
    noise *= np.sqrt(signal_power / (10 ** (snr_db / 10)) / max(float(np.mean(noise ** 2)), 1e-12))
    return samples + noise


def build(takes: int, seed: int, accents: Sequence[str], variants: Sequence[str], snr_range: Tuple[float, float],
          espeak: str = "espeak-ng") -> dict:
    rng = np.random.default_rng(seed)
    features: List[np.ndarray] = []
    labels, speaker_index, speeds, pitches, snrs = [], [], [], [], []
    speakers = [(accent, variant) for accent in accents for variant in variants]
    sample_rate = None
    for index, (accent, variant) in enumerate(speakers):
        for _ in range(takes):
            for digit, word in enumerate(DIGITS):
                speed, pitch = int(rng.integers(120, 221)), int(rng.integers(20, 81))
                samples, rate = synthesise(word, f"{accent}+{variant}", speed, pitch, espeak)
                sample_rate = rate
                lead = np.zeros(int(rng.integers(0, int(0.25 * rate))))
                samples = np.concatenate([lead, samples]) * rng.uniform(0.3, 1.0)
                snr = float(rng.uniform(*snr_range))
                samples = add_noise(samples, snr, brown=bool(rng.random() < 0.5), rng=rng)
                features.append(mfcc(samples, rate))
                labels.append(digit)
                speaker_index.append(index)
                speeds.append(speed)
                pitches.append(pitch)
                snrs.append(snr)
    return {
        "features": (np.round(np.stack(features) * QUANTUM) / QUANTUM).astype(np.float16),
        "labels": np.asarray(labels, dtype=np.int64),
        "speaker": np.asarray(speaker_index, dtype=np.int64),
        "speakers": np.asarray([f"{a}+{v}" for a, v in speakers]),
        "accents": np.asarray([a for a, _ in speakers]),
        "variants": np.asarray([v for _, v in speakers]),
        "speed": np.asarray(speeds, dtype=np.int16),
        "pitch": np.asarray(pitches, dtype=np.int16),
        "snr_db": np.asarray(snrs, dtype=np.float16),
        "sample_rate": np.int64(sample_rate),
        "seed": np.int64(seed),
        "mfcc_config": np.asarray(json.dumps(MFCC_CONFIG)),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_DATA,
                        help="output .npz file (default: data/spoken_digits_mfcc.npz beside this script, the shipped "
                             "file)")
    parser.add_argument("--takes", type=int, default=2,
                        help="utterances of each digit per speaker (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every random choice (speed, pitch, silence, noise); with the same espeak-ng "
                             "version the same seed rebuilds the same file (default: %(default)s)")
    parser.add_argument("--accents", nargs="+", default=list(ACCENTS), metavar="VOICE",
                        help=f"espeak-ng English voices (default: {' '.join(ACCENTS)})")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT",
                        help=f"espeak-ng voice variants, used as voice+VARIANT (default: {' '.join(VARIANTS)})")
    parser.add_argument("--snr-db", type=float, nargs=2, default=[0.0, 20.0], metavar=("LOW", "HIGH"),
                        help="range of the signal-to-noise ratio of the added noise, in dB (default: 0 20)")
    parser.add_argument("--espeak", default="espeak-ng", help="the espeak-ng executable (default: %(default)s)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if shutil.which(args.espeak) is None:
        raise SystemExit(f"{args.espeak!r} not found; install it (e.g. apt-get install espeak-ng)")
    if args.takes < 1:
        raise SystemExit(f"--takes must be >= 1, got {args.takes}")
    started = time.perf_counter()
    data = build(args.takes, args.seed, args.accents, args.variants, tuple(args.snr_db), args.espeak)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **data)
    print(f"wrote {len(data['labels'])} clips from {len(data['speakers'])} speakers, features "
          f"{tuple(data['features'].shape)} float16, to {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) "
          f"in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
