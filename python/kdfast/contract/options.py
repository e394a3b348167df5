"""The options of every kdfast loss as one frozen dataclass, and the names of its modes.

`KDOptions` mirrors the C++ `kdfast::KDOptions` struct (csrc/include/kdfast/types.h) plus the
two mode switches of the sparse and multi-teacher losses (`tail`, `combine`). It travels
unchanged from `kdfast.functional` through the autograd wrappers to the custom ops, whose
schemas are generated from its fields (`kdfast.ops`), so the option list is written once.
Values are validated by `kdfast.contract.validation` before an options object is built;
constructing one does not re-check them. The mode names here are the public spelling; the
integer codes the compiled core uses are read from `kdfast._C` by `kdfast.ops`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Tuple

import torch

__all__ = ["COMBINE_MODES", "DIVERGENCES", "KDOptions", "REDUCTIONS", "TAIL_MODES", "TEMPERATURE_RANGE",
           "compute_dtype", "temperature_in_range"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "none", "batchmean")
TAIL_MODES = ("bucket", "renormalize")
COMBINE_MODES = ("sum", "mixture")

# The temperatures every loss, compressor and store accepts, [1e-20, 1e20]. Within it the
# float32 kernels' row math cannot overflow: 1/T, the scale of a logit difference (h / T with
# h >= 2^-33) and τ = T² stay inside their ranges for any vocabulary. Beyond it the loss itself
# (τ·D, with D's float32 rounding) and 1/T leave the float32 range.
TEMPERATURE_RANGE = (1e-20, 1e20)


def temperature_in_range(temperature: float) -> bool:
    """True when `temperature` is a finite number inside `TEMPERATURE_RANGE`."""
    low, high = TEMPERATURE_RANGE
    return math.isfinite(temperature) and low <= temperature <= high


@dataclasses.dataclass(frozen=True)
class KDOptions:
    """Scalar options of a distillation loss call (see docs/design.md, "The loss contract").

    Attributes:
        divergence: "forward_kl", "reverse_kl", "jsd" or "tvd".
        reduction: "mean", "sum", "batchmean" or "none".
        temperature: T in TEMPERATURE_RANGE, [1e-20, 1e20].
        alpha: weight of the hard-label cross-entropy, in [0, 1].
        beta: the generalised JSD's mixture weight, in (0, 1).
        label_smoothing: ε in [0, 1).
        t2_scale: scale the divergence by T² (τ = T²) when True, else τ = 1.
        ignore_index: label value of rows that contribute nothing.
        tail: top-k soft labels only: "bucket" or "renormalize".
        combine: multi-teacher only: "sum" or "mixture".
        teacher_entropy: dense loss only, forward_kl only: the divergence term is the
            soft-target cross-entropy −Σ p·log q = KL(p‖q) + H(p) (torchtune's convention)
            instead of the KL; the gradient is the same. Not part of the public functions'
            arguments: `kdfast.compat` sets it.
        divergence_weight: dense loss only: a factor folded into τ (`divergence_scale`), so that
            a normaliser known before the call (e.g. the kept-token count of several calls)
            reaches the one-pass gradient and the backward pass needs no scaling pass. Set by
            `kdfast.compat`, with α = 0.
    """

    divergence: str = "forward_kl"
    reduction: str = "mean"
    temperature: float = 1.0
    alpha: float = 0.0
    beta: float = 0.5
    label_smoothing: float = 0.0
    t2_scale: bool = True
    ignore_index: int = -100
    tail: str = "bucket"
    combine: str = "sum"
    teacher_entropy: bool = False
    divergence_weight: float = 1.0

    @classmethod
    def of(cls, **values) -> "KDOptions":
        """Options from Python values, coerced to the field types (floats, bool, int)."""
        return cls(**{name: FIELD_TYPES[name](value) for name, value in values.items()})

    def replace(self, **changes) -> "KDOptions":
        """A copy with some fields changed (e.g. `options.replace(reduction="none")`)."""
        return dataclasses.replace(self, **changes)

    def values(self) -> Tuple:
        """The field values in declaration order: the options part of every op's arguments."""
        return tuple(getattr(self, name) for name in FIELD_NAMES)

    def row_options(self) -> dict:
        """The options a per-row loss takes, as keyword arguments of `kdfast.reference`'s row
        functions: divergence, temperature, alpha, beta, ignore_index, label_smoothing, t2_scale."""
        values = dict(divergence=self.divergence, temperature=self.temperature, alpha=self.alpha, beta=self.beta,
                      ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, t2_scale=self.t2_scale)
        if self.dense_only():
            values.update(teacher_entropy=self.teacher_entropy, divergence_weight=self.divergence_weight)
        return values

    def dense_only(self) -> bool:
        """True when an option only the dense loss honours is set (`teacher_entropy`,
        `divergence_weight`)."""
        return self.teacher_entropy or self.divergence_weight != 1.0

    def require_not_dense_only(self, function: str) -> None:
        """Raises ValueError when `dense_only()`: the other losses' kernels do not take those options."""
        if self.dense_only():
            raise ValueError(f"{function}: teacher_entropy and divergence_weight are options of the dense loss only")

    @property
    def divergence_scale(self) -> float:
        """τ of the loss contract, T² when `t2_scale`, else 1, times `divergence_weight`."""
        return (self.temperature * self.temperature if self.t2_scale else 1.0) * self.divergence_weight


FIELD_NAMES = tuple(field.name for field in dataclasses.fields(KDOptions))
# the field annotations as types (str, float, bool, int): `of` coerces with them, `kdfast.ops` builds op schemas
FIELD_TYPES = typing.get_type_hints(KDOptions)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the losses compute in: float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
