"""Feature-level distillation losses in plain PyTorch: FitNets hints, attention transfer,
similarity-preserving KD.

Inputs are intermediate activations of student and teacher, batch first: `[N, C]`
vectors (or `[..., C]` token features for hints) and `[N, C, *spatial]` maps. Student and
teacher may have different channel counts where the method allows it. The math runs in
float32 (float64 when an input is float64), losses come back in that dtype, gradients
flow to the student features (and to a `HintLoss` projection) only: teacher features are
treated as constants. Bad input raises TypeError/ValueError naming the argument and the
shapes seen.
"""

from __future__ import annotations

import torch
from torch import nn

from kdfast.contract.options import compute_dtype
from kdfast.contract.validation import (
    require_choice,
    require_float_tensor,
    require_positive,
    require_same_device,
)

__all__ = [
    "hint_loss",
    "HintLoss",
    "attention_map",
    "attention_transfer_loss",
    "similarity_preserving_loss",
]

_NORM_EPS = 1e-12


def _check_feature_pair(student_features, teacher_features) -> None:
    require_float_tensor("student_features", student_features)
    require_float_tensor("teacher_features", teacher_features)
    require_same_device(student_features=student_features, teacher_features=teacher_features)


def _check_batch_sizes(student_features: torch.Tensor, teacher_features: torch.Tensor) -> None:
    if student_features.dim() < 1 or teacher_features.dim() < 1:
        raise ValueError(f"student_features and teacher_features must be batch-first tensors [N, ...], "
                         f"got shapes {tuple(student_features.shape)} and {tuple(teacher_features.shape)}")
    if student_features.shape[0] != teacher_features.shape[0]:
        raise ValueError(f"student_features and teacher_features must have the same batch size N, got "
                         f"shapes {tuple(student_features.shape)} and {tuple(teacher_features.shape)}")


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, *,
              reduction: str = "mean") -> torch.Tensor:
    """FitNets hint loss between (already projected) student features and teacher features.

    Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets",
    ICLR 2015. The student's guided layer, mapped to the teacher's width by a regressor r,
    is pulled towards the teacher's hint layer:  L = mean_i (r(u)_i − h_i)². (The paper
    writes ½‖h − r(u)‖²; the mean-squared form keeps the scale independent of the size.)
    Use `HintLoss` to hold the learnable regressor r.

    Args:
        student_features: floating tensor, any shape, equal to the teacher's.
        teacher_features: floating tensor of the same shape; treated as constant.
        reduction: "mean" (default; over all elements), "sum", or "none" (element losses).

    Returns:
        The loss in float32 (float64 when an input is float64).
    """
    _check_feature_pair(student_features, teacher_features)
    require_choice("reduction", reduction, ("none", "sum", "mean"))
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"student_features and teacher_features must have the same shape after "
                         f"projection, got {tuple(student_features.shape)} and {tuple(teacher_features.shape)}; "
                         f"use HintLoss to project the student's channels to the teacher's")
    dtype = compute_dtype(student_features, teacher_features)
    squared_error = (student_features.to(dtype) - teacher_features.detach().to(dtype)).square()
    if reduction == "none":
        return squared_error
    return squared_error.sum() if reduction == "sum" else squared_error.mean()


class HintLoss(nn.Module):
    """FitNets hint loss with a learnable projection of the student's channels.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015; see `hint_loss` for the
    formula. When `student_channels != teacher_channels` (or `always_project=True`) the
    student features first go through a learnable regressor: `nn.Linear(student_channels,
    teacher_channels)` applied to the last dimension of `[..., C]` features
    (`spatial=False`), or a 1×1 `nn.Conv2d` applied to `[N, C, H, W]` maps
    (`spatial=True`). Otherwise the projection is the identity and the module has no
    parameters. Add `hint.parameters()` to the student's optimiser.

    Args:
        student_channels: C_s, the student's feature width (> 0).
        teacher_channels: C_t, the teacher's feature width (> 0).
        spatial: features are `[N, C, H, W]` maps (default False: `[..., C]` vectors).
        always_project: use a regressor even when the widths agree (default False).
        reduction: "mean" (default), "sum" or "none", as in `hint_loss`.

    Shapes:
        forward(student_features, teacher_features): `[..., C_s]` and `[..., C_t]`, or
        `[N, C_s, H, W]` and `[N, C_t, H, W]` (same spatial size). Student features are
        cast to the projection's parameter dtype before projecting (the gradient comes
        back in their own dtype); the loss is float32 (float64 when an input or the
        projection is float64).
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, spatial: bool = False,
                 always_project: bool = False, reduction: str = "mean") -> None:
        super().__init__()
        for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        require_choice("reduction", reduction, ("none", "sum", "mean"))
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.spatial = bool(spatial)
        self.reduction = reduction
        if student_channels != teacher_channels or always_project:
            if self.spatial:
                self.projection = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
            else:
                self.projection = nn.Linear(student_channels, teacher_channels)
        else:
            self.projection = nn.Identity()

    def _check_layout(self, name: str, features: torch.Tensor, channels: int) -> None:
        if self.spatial:
            if features.dim() != 4 or features.shape[1] != channels:
                raise ValueError(f"{name} must have shape [N, {channels}, H, W] (spatial=True), "
                                 f"got {tuple(features.shape)}")
        elif features.dim() < 1 or features.shape[-1] != channels:
            raise ValueError(f"{name} must have shape [..., {channels}] (spatial=False), "
                             f"got {tuple(features.shape)}")

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        _check_feature_pair(student_features, teacher_features)
        self._check_layout("student_features", student_features, self.student_channels)
        self._check_layout("teacher_features", teacher_features, self.teacher_channels)
        weight = getattr(self.projection, "weight", None)
        if weight is not None and student_features.dtype != weight.dtype:
            student_features = student_features.to(weight.dtype)
        projected = self.projection(student_features)
        if projected.shape != teacher_features.shape:
            raise ValueError(f"projected student_features have shape {tuple(projected.shape)} but "
                             f"teacher_features have {tuple(teacher_features.shape)}; batch and spatial "
                             f"sizes must agree")
        return hint_loss(projected, teacher_features, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
                f"spatial={self.spatial}, reduction={self.reduction!r}")


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention map of Zagoruyko & Komodakis: Σ_c |A_c|^p, flattened, L2-normalised.

    Args:
        features: `[N, C, *spatial]` floating tensor (at least one spatial dimension).
        p: exponent p > 0 (default 2.0).

    Returns:
        `[N, prod(spatial)]`, each row of unit L2 norm (a zero map stays zero), in float32
        (float64 for float64 input).
    """
    require_float_tensor("features", features)
    p = require_positive("p", p)
    if features.dim() < 3:
        raise ValueError(f"features must have shape [N, C, *spatial] with at least one spatial "
                         f"dimension, got {tuple(features.shape)}")
    dtype = compute_dtype(features)
    energy = features.to(dtype).abs().pow(p).sum(dim=1).flatten(1)
    norm = torch.linalg.vector_norm(energy, dim=1, keepdim=True).clamp_min(_NORM_EPS)
    return energy / norm


def attention_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, *,
                            p: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """Attention transfer (activation-based).

    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017. With Q = vec(Σ_c |A_c|^p)
    for each sample (p = 2 in the paper),

        ℓ_n = ‖ Q_S/‖Q_S‖₂ − Q_T/‖Q_T‖₂ ‖₂²      (in [0, 2] since the maps are non-negative)

    The squared distance is used (as in the authors' released code, up to a constant factor)
    rather than the paper's plain norm, so the gradient stays bounded when the maps agree.
    Channel counts may differ; spatial sizes must match. Weight β is left to the caller.

    Args:
        student_features: `[N, C_s, *spatial]` floating tensor.
        teacher_features: `[N, C_t, *spatial]`, the same N and spatial sizes; treated as constant.
        p: exponent p > 0 (default 2.0).
        reduction: "mean" (default; over the N samples), "sum", or "none" (`[N]`).

    Returns:
        The loss in float32 (float64 when an input is float64).
    """
    _check_feature_pair(student_features, teacher_features)
    require_choice("reduction", reduction, ("none", "sum", "mean"))
    if (student_features.dim() < 3 or teacher_features.dim() != student_features.dim()
            or student_features.shape[0] != teacher_features.shape[0]
            or student_features.shape[2:] != teacher_features.shape[2:]):
        raise ValueError(f"student_features and teacher_features must be [N, C, *spatial] with the same N "
                         f"and spatial sizes (channels may differ), got {tuple(student_features.shape)} and "
                         f"{tuple(teacher_features.shape)}")
    dtype = compute_dtype(student_features, teacher_features)
    student_map = attention_map(student_features.to(dtype), p)
    teacher_map = attention_map(teacher_features.detach().to(dtype), p)
    per_sample = (student_map - teacher_map).square().sum(dim=1)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _row_normalised_gram(features: torch.Tensor) -> torch.Tensor:
    flat = features.flatten(1)
    gram = flat @ flat.transpose(0, 1)
    norm = torch.linalg.vector_norm(gram, dim=1, keepdim=True).clamp_min(_NORM_EPS)
    return gram / norm


def similarity_preserving_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, *,
                               reduction: str = "mean") -> torch.Tensor:
    """Similarity-preserving KD: match the batch's pairwise-similarity (Gram) matrices.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019. For a batch of
    b samples, Q = features reshaped to `[b, -1]`, G = Q·Qᵀ (`[b, b]`), and G̃ = G with each
    row divided by its L2 norm. Then

        L = ‖G̃_T − G̃_S‖_F² / b²       (reduction="mean"; "sum" omits the 1/b²)

    Student and teacher may have any (different) feature shapes after the batch dimension.

    Args:
        student_features: `[b, ...]` floating tensor.
        teacher_features: `[b, ...]`, same b; treated as constant.
        reduction: "mean" (default) or "sum", as above.

    Returns:
        A 0-dim tensor in float32 (float64 when an input is float64).
    """
    _check_feature_pair(student_features, teacher_features)
    require_choice("reduction", reduction, ("sum", "mean"))
    _check_batch_sizes(student_features, teacher_features)
    dtype = compute_dtype(student_features, teacher_features)
    batch_size = student_features.shape[0]
    difference = (_row_normalised_gram(teacher_features.detach().to(dtype))
                  - _row_normalised_gram(student_features.to(dtype)))
    total = difference.square().sum()
    return total / (batch_size * batch_size) if reduction == "mean" else total
