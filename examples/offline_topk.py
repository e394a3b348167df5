"""Offline top-k distillation end to end on the CPU: compress a teacher once, train a student from the store.

Nothing is downloaded. The steps are those of a real offline run, at toy size:

1. Teacher: a small causal LM in plain torch (`TinyCausalLM`: the logits at position t
   depend on the tokens at t and t − 1 of the same window) with fixed random weights
   (`TEACHER_SEED`), sharpened so that its top-8 keeps about 93% of the probability mass.
   The token stream is sampled from the teacher itself, window by window (`--seed`), so it
   is the true distribution of the data.
2. Compress: `kdfast compress` (its `main()`, the same code as the command line) runs the
   teacher over the training stream, given as `examples/offline_topk.py:teacher`, and
   writes the top-k soft labels and the token ids to a `kdfast.SoftLabelStore`.
3. Train: a smaller student of the same kind learns from the store alone, through
   `SoftLabelWindowDataset` (whose items carry `labels` already aligned with the soft
   labels: no shifting) and `kdfast.functional.sparse_kd_loss`; the teacher is not run
   during training.

The table compares the student before and after training: the top-k KD loss on the
training store (what was minimised), the dense KD loss against the full teacher
distribution on held-out windows (what top-k KD approximates), and the held-out next-token
cross-entropy, with the teacher's own for reference. `--smoke` is a seconds-long check
whose numbers are not meaningful (it says so). Two runs with the same `--seed` and
`--threads` print the same table. The loop is the one in docs/soft_label_store.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import SMOKE_NOTE, markdown_table, significant  # noqa: E402
from kdfast.compress_cli import main as compress_main  # noqa: E402
from kdfast.functional import kd_loss, sparse_kd_loss  # noqa: E402
from kdfast.store import SoftLabelStore, SoftLabelWindowDataset  # noqa: E402

VOCAB = 64
TEACHER_SEED = 1234  # fixed: `kdfast compress` imports this file and rebuilds the same teacher
TEACHER_HIDDEN, TEACHER_SCALE = 48, 8.0


class TinyCausalLM(nn.Module):
    """Logits [B, L, V] at position t from the tokens at t and t − 1 of the same window.

    The first position of a window sees a begin-of-window id (V) as its previous token, so
    a window is processed on its own, as `kdfast compress` runs the teacher.
    """

    def __init__(self, vocab_size: int, hidden: int, scale: float = 1.0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.scale = scale
        self.current = nn.Embedding(vocab_size, hidden)
        self.previous = nn.Embedding(vocab_size + 1, hidden)
        self.output = nn.Linear(hidden, vocab_size)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        previous = F.pad(token_ids[:, :-1], (1, 0), value=self.vocab_size)
        return self.output(torch.tanh(self.current(token_ids) + self.previous(previous))) * self.scale


_TEACHER: Dict[str, TinyCausalLM] = {}


def teacher_model() -> TinyCausalLM:
    """The teacher, built once per process from `TEACHER_SEED` without touching the global generator."""
    if "model" not in _TEACHER:
        with torch.random.fork_rng():
            torch.manual_seed(TEACHER_SEED)
            _TEACHER["model"] = TinyCausalLM(VOCAB, TEACHER_HIDDEN, TEACHER_SCALE).eval()
    return _TEACHER["model"]


def teacher(token_ids: torch.Tensor) -> torch.Tensor:
    """The `kdfast compress` teacher: token ids [B, L] int64 → logits [B, L, V] float32."""
    with torch.no_grad():
        return teacher_model()(token_ids)


def sample_windows(windows: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Token windows [windows, seq_len] int64 sampled from the teacher, each started afresh."""
    ids = torch.randint(0, VOCAB, (windows, 1), generator=generator)
    with torch.no_grad():
        for _ in range(seq_len - 1):
            probabilities = teacher(ids)[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
    return ids


def compress(tokens: torch.Tensor, directory: str, args: argparse.Namespace) -> SoftLabelStore:
    """Writes the store with `kdfast compress` (in-process) and opens it."""
    data = os.path.join(directory, "train_tokens.npy")
    np.save(data, tokens.reshape(-1).numpy().astype(np.int32))
    store = os.path.join(directory, "store")
    code = compress_main([
        "--teacher", f"{os.path.abspath(__file__)}:teacher", "--data", data, "--out", store,
        "--k", str(args.k), "--temperature", str(args.temperature), "--seq-len", str(args.seq_len),
        "--batch-size", "16", "--shard-tokens", str(args.shard_tokens), "--overwrite", "--no-fsync", "--quiet",
    ])
    if code != 0:
        raise SystemExit(f"offline_topk: kdfast compress failed with exit status {code}")
    return SoftLabelStore(store)


def training_loss(student: nn.Module, dataset: SoftLabelWindowDataset, batch, alpha: float) -> torch.Tensor:
    """The top-k KD loss of one batch of the dataset (soft labels and labels straight from the store)."""
    return sparse_kd_loss(student(batch["input_ids"]), dataset.to_soft_labels(batch), batch["labels"], alpha=alpha)


@torch.no_grad()
def measure(student: nn.Module, dataset: SoftLabelWindowDataset, held_out: torch.Tensor,
            args: argparse.Namespace) -> Dict[str, float]:
    """Top-k KD loss over the whole store, dense KD loss and next-token CE on the held-out windows."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size)
    losses = [(training_loss(student, dataset, batch, args.alpha).item(), len(batch["input_ids"]))
              for batch in loader]
    logits = student(held_out)
    teacher_logits = teacher(held_out)
    return {
        "topk": sum(loss * count for loss, count in losses) / sum(count for _, count in losses),
        "dense": kd_loss(logits.reshape(-1, VOCAB), teacher_logits.reshape(-1, VOCAB),
                         temperature=args.temperature).item(),
        "ce": F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), held_out[:, 1:].reshape(-1)).item(),
    }


def train(student: nn.Module, dataset: SoftLabelWindowDataset, args: argparse.Namespace) -> int:
    """Trains the student from the store; returns the number of optimizer steps."""
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=generator)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    steps = 0
    for _ in range(args.epochs):
        for batch in loader:
            loss = training_loss(student, dataset, batch, args.alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
    return steps


def run(args: argparse.Namespace, directory: str) -> None:
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    train_windows = sample_windows(args.train_windows, args.seq_len, generator)
    held_out = sample_windows(args.eval_windows, args.seq_len, generator)

    store = compress(train_windows, directory, args)
    dataset = SoftLabelWindowDataset(store)  # windows of the length the teacher saw (manifest source.seq_len)
    assert torch.equal(dataset[0]["input_ids"], train_windows[0])

    torch.manual_seed(args.seed)
    student = TinyCausalLM(VOCAB, args.student_hidden)
    before = measure(student, dataset, held_out, args)
    steps = train(student, dataset, args)
    after = measure(student, dataset, held_out, args)
    with torch.no_grad():
        teacher_ce = F.cross_entropy(teacher(held_out)[:, :-1].reshape(-1, VOCAB), held_out[:, 1:].reshape(-1)).item()

    per_token = store.bytes_per_token
    print(f"store: {len(store):,} tokens in {store.num_shards} shards, top-{store.k} of V = {store.vocab_size} at "
          f"T = {store.temperature:g}, {per_token['soft_labels']} bytes/token of soft labels "
          f"(a dense float32 row: {4 * store.vocab_size})")
    print(f"student: {sum(p.numel() for p in student.parameters()):,} parameters, {steps} steps "
          f"(batch {args.batch_size} windows of {args.seq_len} tokens, alpha = {args.alpha:g}, seed {args.seed})")
    if args.smoke:
        print(SMOKE_NOTE)
    rows: List[Sequence[object]] = [
        ("top-k KD loss, training store", significant(before["topk"]), significant(after["topk"]), "-"),
        ("dense KD loss vs the teacher, held out", significant(before["dense"]), significant(after["dense"]), "0"),
        ("next-token cross-entropy, held out", significant(before["ce"]), significant(after["ce"]),
         significant(teacher_ce)),
    ]
    print(markdown_table(("student, nats per token", "before", "after", "teacher"), rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long check with tiny sizes; its numbers are not meaningful")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sampled token stream, the student and the data order (default 0)")
    parser.add_argument("--out", default=None,
                        help="directory for the token file and the store, kept afterwards "
                             "(default: a temporary directory, removed at the end)")
    parser.add_argument("--k", type=int, default=8, help="teacher tokens kept per position in the store (default 8)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the store (default 1)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per window (default 64)")
    parser.add_argument("--train-windows", type=int, default=512, help="windows compressed and trained on "
                                                                       "(default 512)")
    parser.add_argument("--eval-windows", type=int, default=128, help="held-out windows (default 128)")
    parser.add_argument("--shard-tokens", type=int, default=8192, help="tokens per store shard (default 8192)")
    parser.add_argument("--student-hidden", type=int, default=16, help="student width (default 16)")
    parser.add_argument("--epochs", type=int, default=8, help="passes over the store (default 8)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per optimizer step (default 16)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="weight of the cross-entropy on the store's labels; 1 − alpha on top-k KD (default 0.5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return parser


SMOKE = {"seq_len": 16, "train_windows": 64, "eval_windows": 16, "shard_tokens": 256, "epochs": 2, "batch_size": 8}


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.smoke:
        print(SMOKE_NOTE)
        for name, value in SMOKE.items():
            setattr(args, name, value)
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        run(args, args.out)
        print(f"store and tokens kept in {args.out}")
    else:
        with tempfile.TemporaryDirectory(prefix="kdfast-offline-topk-") as directory:
            run(args, directory)


if __name__ == "__main__":
    main()
