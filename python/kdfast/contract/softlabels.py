"""Top-k soft labels: the `SoftLabels` container and the index/log-probability dtype rules.

A teacher row of V logits is summarised by its k most probable tokens at temperature T:
`indices` [..., k] (sorted by descending probability; equal logits keep the lower vocabulary
index first), `logprobs` [..., k] = log softmax(t/T) at those indices, normalised over the
full vocabulary, and `tail_logprob` [...] = log of the probability mass outside the top k
(−inf when there is none, e.g. k = V). `kdfast.compress_topk` builds them;
`kdfast.functional.sparse_kd_loss` consumes them. Storage dtypes: indices int64/int32, or
int16 when V ≤ 32768 and uint16 when V ≤ 65536; logprobs and tail float32, float16,
bfloat16 (or float64 for reference computations). This module is at the bottom of the
package: it imports nothing from kdfast.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from kdfast.contract.options import TEMPERATURE_RANGE, temperature_in_range

__all__ = ["INDEX_DTYPES", "INDEX_DTYPE_MAX_VOCAB", "LOGPROB_DTYPES", "SoftLabels", "smallest_index_dtype"]

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint16)
LOGPROB_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Largest vocabulary size each index dtype can address (indices are 0 .. V-1).
INDEX_DTYPE_MAX_VOCAB = {
    torch.int16: 1 << 15,
    torch.uint16: 1 << 16,
    torch.int32: (1 << 31) - 1,
    torch.int64: (1 << 63) - 1,
}


def smallest_index_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest index dtype that holds every index of a `vocab_size` vocabulary.

    Returns uint16 for V ≤ 65536 (int16 is also valid up to 32768), else int32.
    """
    if vocab_size <= INDEX_DTYPE_MAX_VOCAB[torch.uint16]:
        return torch.uint16
    return torch.int32


def _check_index_dtype(dtype: torch.dtype, vocab_size: int) -> None:
    if dtype not in INDEX_DTYPES:
        raise TypeError(f"SoftLabels: index dtype must be one of {INDEX_DTYPES}, got {dtype}")
    if vocab_size > INDEX_DTYPE_MAX_VOCAB[dtype]:
        raise ValueError(
            f"SoftLabels: index dtype {dtype} cannot hold indices of a vocabulary of size "
            f"{vocab_size} (max {INDEX_DTYPE_MAX_VOCAB[dtype]}); use {smallest_index_dtype(vocab_size)} "
            "or wider"
        )


def _check_logprob_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in LOGPROB_DTYPES:
        raise TypeError(f"SoftLabels: {name} dtype must be one of {LOGPROB_DTYPES}, got {dtype}")


@dataclasses.dataclass(eq=False)
class SoftLabels:
    """The k most probable teacher tokens per row, with the mass left outside them.

    Attributes:
        indices: [..., k] integer tensor (int64, int32, int16 for V ≤ 32768, uint16 for
            V ≤ 65536): vocabulary ids sorted by descending teacher probability.
        logprobs: [..., k] float tensor (float32, float16, bfloat16, float64):
            log softmax(teacher_logits / temperature) at `indices`, normalised over all V.
        tail_logprob: [...] float tensor: log(1 − Σ_k exp(logprobs)) computed without
            cancellation; −inf when the top k hold all the mass.
        temperature: the T the probabilities were computed at (> 0).
        vocab_size: V, the teacher's vocabulary size (≥ k).

    Shapes, dtypes and devices are checked on construction; `validate()` checks values.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    temperature: float
    vocab_size: int

    def __post_init__(self) -> None:
        for name in ("indices", "logprobs", "tail_logprob"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"SoftLabels: {name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"SoftLabels: vocab_size must be a positive int, got {self.vocab_size!r}")
        self.temperature = float(self.temperature)
        if not temperature_in_range(self.temperature):
            low, high = TEMPERATURE_RANGE
            raise ValueError(f"SoftLabels: temperature must be finite and in [{low:g}, {high:g}], "
                             f"got {self.temperature}")
        if self.indices.dim() < 1:
            raise ValueError("SoftLabels: indices must have shape [..., k], got a 0-d tensor")
        if tuple(self.logprobs.shape) != tuple(self.indices.shape):
            raise ValueError(
                f"SoftLabels: logprobs shape {tuple(self.logprobs.shape)} must equal indices shape "
                f"{tuple(self.indices.shape)}"
            )
        if tuple(self.tail_logprob.shape) != tuple(self.indices.shape[:-1]):
            raise ValueError(
                f"SoftLabels: tail_logprob shape {tuple(self.tail_logprob.shape)} must equal the leading "
                f"shape of indices {tuple(self.indices.shape[:-1])}"
            )
        k = self.indices.shape[-1]
        if not 1 <= k <= self.vocab_size:
            raise ValueError(f"SoftLabels: k must satisfy 1 <= k <= vocab_size, got k={k}, V={self.vocab_size}")
        _check_index_dtype(self.indices.dtype, self.vocab_size)
        _check_logprob_dtype("logprobs", self.logprobs.dtype)
        _check_logprob_dtype("tail_logprob", self.tail_logprob.dtype)
        devices = {self.indices.device, self.logprobs.device, self.tail_logprob.device}
        if len(devices) != 1:
            raise ValueError(f"SoftLabels: tensors must share one device, got {sorted(map(str, devices))}")

    # ----------------------------------------------------------------- properties
    @property
    def k(self) -> int:
        """Number of kept tokens per row."""
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """Leading (row) shape `[...]`, i.e. `tail_logprob.shape`."""
        return self.tail_logprob.shape

    @property
    def device(self) -> torch.device:
        return self.indices.device

    @property
    def bytes_per_token(self) -> int:
        """Storage bytes per row at the current dtypes: k·(index + logprob) + tail."""
        return (
            self.k * (self.indices.element_size() + self.logprobs.element_size())
            + self.tail_logprob.element_size()
        )

    # ----------------------------------------------------------------- conversions
    def to(
        self,
        device: Optional[Union[str, torch.device]] = None,
        *,
        index_dtype: Optional[torch.dtype] = None,
        logprob_dtype: Optional[torch.dtype] = None,
        tail_dtype: Optional[torch.dtype] = None,
        non_blocking: bool = False,
    ) -> "SoftLabels":
        """A copy on `device` with the given storage dtypes (None keeps the current one).

        Args:
            device: target device; None keeps the current one.
            index_dtype: int64, int32, int16 (V ≤ 32768) or uint16 (V ≤ 65536).
            logprob_dtype: dtype of `logprobs` (float32, float16, bfloat16, float64).
            tail_dtype: dtype of `tail_logprob`; None keeps it (it is 1 value per row, so
                float32 is the usual choice even when logprobs are 16-bit).
        """
        index_dtype = self.indices.dtype if index_dtype is None else index_dtype
        logprob_dtype = self.logprobs.dtype if logprob_dtype is None else logprob_dtype
        tail_dtype = self.tail_logprob.dtype if tail_dtype is None else tail_dtype
        _check_index_dtype(index_dtype, self.vocab_size)
        _check_logprob_dtype("logprobs", logprob_dtype)
        _check_logprob_dtype("tail_logprob", tail_dtype)
        device = self.device if device is None else torch.device(device)
        indices = self.indices
        if indices.dtype != index_dtype:
            # uint16 <-> other integer conversions go through int32, which holds every value.
            if indices.dtype == torch.uint16 or index_dtype == torch.uint16:
                indices = indices.to(torch.int32)
            indices = indices.to(index_dtype)
        return SoftLabels(
            indices=indices.to(device, non_blocking=non_blocking),
            logprobs=self.logprobs.to(device, logprob_dtype, non_blocking=non_blocking),
            tail_logprob=self.tail_logprob.to(device, tail_dtype, non_blocking=non_blocking),
            temperature=self.temperature,
            vocab_size=self.vocab_size,
        )

    def for_storage(self, logprob_dtype: torch.dtype = torch.float16) -> "SoftLabels":
        """A compact copy: the narrowest index dtype for V, 16-bit logprobs, float32 tail.

        float16 keeps ~3 significant digits of log-probabilities in [−65504, 0]; bfloat16
        keeps ~2 but never overflows. −inf survives both.
        """
        return self.to(
            index_dtype=smallest_index_dtype(self.vocab_size), logprob_dtype=logprob_dtype, tail_dtype=torch.float32
        )

    def reshape(self, *shape: int) -> "SoftLabels":
        """Reshapes the leading dims to `shape` (k stays last)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
            shape = tuple(shape[0])
        tail = self.tail_logprob.reshape(shape)
        return SoftLabels(
            indices=self.indices.reshape(*tail.shape, self.k),
            logprobs=self.logprobs.reshape(*tail.shape, self.k),
            tail_logprob=tail,
            temperature=self.temperature,
            vocab_size=self.vocab_size,
        )

    def flatten(self) -> "SoftLabels":
        """Rows flattened: indices/logprobs [N, k], tail [N]."""
        return self.reshape(-1)

    def __len__(self) -> int:
        if self.tail_logprob.dim() == 0:
            raise TypeError("len() of SoftLabels with a single row (0-d leading shape)")
        return self.tail_logprob.shape[0]

    def __getitem__(self, index) -> "SoftLabels":
        """Indexes the leading dims (e.g. a token range `labels[start:stop]`)."""
        if isinstance(index, tuple) and any(item is Ellipsis for item in index):
            raise IndexError("SoftLabels indexing does not support Ellipsis; index the leading dims explicitly")
        return SoftLabels(
            indices=self.indices[index],
            logprobs=self.logprobs[index],
            tail_logprob=self.tail_logprob[index],
            temperature=self.temperature,
            vocab_size=self.vocab_size,
        )

    @staticmethod
    def cat(parts: Sequence["SoftLabels"], dim: int = 0) -> "SoftLabels":
        """Concatenates soft labels along a leading dim; they must agree on k, T and V."""
        if not parts:
            raise ValueError("SoftLabels.cat: need at least one SoftLabels")
        first = parts[0]
        for part in parts[1:]:
            if (part.k, part.temperature, part.vocab_size) != (first.k, first.temperature, first.vocab_size):
                raise ValueError(
                    "SoftLabels.cat: parts disagree on (k, temperature, vocab_size): "
                    f"{(first.k, first.temperature, first.vocab_size)} vs {(part.k, part.temperature, part.vocab_size)}"
                )
        leading = first.tail_logprob.dim()
        if not -leading <= dim < leading:
            raise ValueError(f"SoftLabels.cat: dim {dim} is out of range for leading shape {tuple(first.shape)}")
        dim = dim % leading
        return SoftLabels(
            indices=torch.cat([part.indices for part in parts], dim),
            logprobs=torch.cat([part.logprobs for part in parts], dim),
            tail_logprob=torch.cat([part.tail_logprob for part in parts], dim),
            temperature=first.temperature,
            vocab_size=first.vocab_size,
        )

    def to_dense_probs(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[..., V] teacher probabilities with the kept entries filled in and 0 elsewhere.

        The tail mass is not spread over the other tokens; it is `exp(tail_logprob)`.
        """
        dense = torch.zeros(*self.shape, self.vocab_size, dtype=dtype, device=self.device)
        dense.scatter_(-1, self.indices.to(torch.int64), self.logprobs.to(dtype).exp())
        return dense

    # ----------------------------------------------------------------- checks
    def validate(self, atol: Optional[float] = None) -> "SoftLabels":
        """Checks the values and returns self; raises ValueError naming the first problem.

        Checks: indices in [0, V) and distinct within a row; logprobs ≤ 0, not NaN, and
        non-increasing along k; tail_logprob ≤ 0 and not NaN; and that the kept mass plus
        the tail mass is 1 within `atol` (default: 1e-4 for 32/64-bit logprobs, 2e-2 for
        16-bit ones), checked as |logsumexp([logprobs, tail])| ≤ atol.
        """
        vocab, k = self.vocab_size, self.k
        indices = self.indices.to(torch.int32) if self.indices.dtype == torch.uint16 else self.indices
        indices = indices.to(torch.int64)
        if indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= vocab:
                raise ValueError(f"SoftLabels.validate: indices must lie in [0, {vocab}), found range [{low}, {high}]")
            if k > 1:
                sorted_indices = indices.sort(-1).values
                if bool((sorted_indices[..., 1:] == sorted_indices[..., :-1]).any()):
                    raise ValueError("SoftLabels.validate: indices repeat within a row")
        logprobs = self.logprobs.to(torch.float64)
        tail = self.tail_logprob.to(torch.float64)
        if bool(logprobs.isnan().any()) or bool(tail.isnan().any()):
            raise ValueError("SoftLabels.validate: logprobs or tail_logprob contain NaN")
        if bool((logprobs > 0).any()) or bool((tail > 0).any()):
            raise ValueError("SoftLabels.validate: log-probabilities must be <= 0")
        if k > 1 and bool((logprobs[..., 1:] > logprobs[..., :-1]).any()):
            raise ValueError("SoftLabels.validate: logprobs must be sorted in descending order along k")
        if atol is None:
            narrow = self.logprobs.element_size() < 4 or self.tail_logprob.element_size() < 4
            atol = 2e-2 if narrow else 1e-4
        if logprobs.numel():
            total = torch.logsumexp(torch.cat([logprobs, tail.unsqueeze(-1)], -1), -1)
            worst = float(total.abs().max())
            if not worst <= atol:
                raise ValueError(
                    f"SoftLabels.validate: kept mass + tail mass must be 1; worst |log total| = {worst:.3g} > {atol}"
                )
        return self
