"""Benchmark cases of the dense KD loss: shapes, dtypes, deterministic inputs and the bytes they move.

A `Case` fixes device, dtype, rows N, vocabulary V and the loss hyper-parameters; `make_inputs`
turns it into the same student logits, teacher logits and labels for every provider, and
`minimum_bytes` is the denominator of every GB/s figure. This module depends on torch only.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch

__all__ = ["Case", "DIVERGENCES", "DTYPES", "FLOOR_PROVIDERS", "PASSES", "PROVIDERS", "make_inputs", "minimum_bytes"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
PASSES = ("fwd", "fwd+bwd")
# Order in which providers run within a case: eager first, so that its loss and gradient can
# serve as the cross-check for the others.
# kdfast: the public loss (on the CPU with a gradient: the one-pass kernel); kdfast-2pass: the
# same loss through the two-pass kernels (forward, then backward); kdfast-inplace: the one-pass
# kernel with inplace_backward=True (CPU). add-out and add-fresh are not losses but the memory
# floor of fwd+bwd (read s and t, write an N×V result): torch.add(s, t, out=g) into a buffer
# allocated once, and s + t into a fresh tensor each call.
PROVIDERS = ("eager", "compile", "liger", "kdfast", "kdfast-2pass", "kdfast-inplace", "add-out", "add-fresh")
FLOOR_PROVIDERS = ("add-out", "add-fresh")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Every this-many-th row (starting with row 0) carries ignore_index: "a few rows ignored".
_IGNORED_ROW_STRIDE = 16


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration: shape, dtype and the loss hyper-parameters."""

    device: str
    dtype: torch.dtype
    rows: int
    vocab: int
    divergence: str = "forward_kl"
    temperature: float = 2.0
    alpha: float = 0.5
    beta: float = 0.5
    ignore_index: int = -100
    label_smoothing: float = 0.0
    t2_scale: bool = True

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def loss_kwargs(self) -> Dict[str, object]:
        """Keyword arguments shared by `kdfast.functional.kd_loss` and `eager_kd_loss`."""
        return dict(
            divergence=self.divergence,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            t2_scale=self.t2_scale,
        )

    def label(self) -> str:
        return f"{self.dtype_name} N={self.rows} V={self.vocab} {self.divergence}"


def make_inputs(case: Case, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic student logits, teacher logits [N, V] (case dtype) and int64 labels [N].

    Logits are N(0, 2²), drawn in float32 on the device and cast to the case dtype.
    Rows 0, 16, 32, ... carry `ignore_index`. None of the tensors requires grad.

    Args:
        case: shape, dtype, device and ignore_index of the inputs.
        seed: seed of the device generator.

    Returns:
        (student, teacher, labels).
    """
    generator = torch.Generator(device=case.device).manual_seed(seed)
    shape = (case.rows, case.vocab)
    student = (torch.randn(shape, generator=generator, device=case.device) * 2.0).to(case.dtype)
    teacher = (torch.randn(shape, generator=generator, device=case.device) * 2.0).to(case.dtype)
    labels = torch.randint(0, case.vocab, (case.rows,), generator=generator, device=case.device)
    labels[::_IGNORED_ROW_STRIDE] = case.ignore_index
    return student, teacher, labels


def minimum_bytes(case: Case, pass_name: str, with_labels: bool = True) -> int:
    """Minimum bytes any implementation must move for one call (the GB/s denominator).

    Each input is read once and each output written once:
      fwd:      bytes = N·V·(size_s + size_t) + N·8           (student, teacher, int64 labels)
      fwd+bwd:  bytes = fwd bytes + N·V·size_s                 (student gradient written once)
    The scalar loss (4 bytes) is neglected. size_s = size_t = the case dtype's element size.

    Args:
        case: shape and dtype.
        pass_name: "fwd" or "fwd+bwd".
        with_labels: count the int64 labels.

    Returns:
        The byte count.
    """
    element = case.dtype.itemsize
    total = case.rows * case.vocab * (element + element)
    if with_labels:
        total += case.rows * 8
    if pass_name == "fwd+bwd":
        total += case.rows * case.vocab * element
    return total
