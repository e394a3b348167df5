"""Adversarial knowledge distillation: a discriminator between teacher and student outputs.

`Discriminator` is a small MLP scoring vectors `[..., D]` (logits or features) as teacher
(positive score) or student (negative). `AdversarialKD` owns a discriminator and its
optimiser and exposes the two halves of the alternating game a trainer drives:
`discriminator_step` (one optimiser step on the discriminator, student outputs detached)
and `student_loss` (the student's generator term added to a given KD loss; gradients reach
the student outputs, never the discriminator's parameters). Bad input raises
TypeError/ValueError naming the argument and the shapes seen.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.contract.validation import require_float_tensor, require_non_negative, require_same_device

__all__ = ["Discriminator", "AdversarialKD"]


class Discriminator(nn.Module):
    """MLP that maps `[..., in_features]` to one real score per row, `[...]`.

    Layers: Linear(in_features, hidden_features), LeakyReLU, then `num_hidden_layers − 1`
    times Linear(hidden_features, hidden_features), LeakyReLU, then Linear(hidden_features, 1).
    The score is a logit: σ(score) is the probability that the row came from the teacher.
    Inputs are cast to the parameters' dtype. Flatten `[N, C, H, W]` features (or pool them)
    to `[N, D]` before scoring.

    Args:
        in_features: D, the width of the scored vectors (> 0).
        hidden_features: width of the hidden layers (default 256).
        num_hidden_layers: number of hidden layers, ≥ 1 (default 2).
        negative_slope: LeakyReLU slope (default 0.2).
    """

    def __init__(self, in_features: int, hidden_features: int = 256, num_hidden_layers: int = 2,
                 negative_slope: float = 0.2) -> None:
        super().__init__()
        for name, value, minimum in (("in_features", in_features, 1), ("hidden_features", hidden_features, 1),
                                     ("num_hidden_layers", num_hidden_layers, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        self.in_features = in_features
        layers = []
        width = in_features
        for _ in range(num_hidden_layers):
            layers += [nn.Linear(width, hidden_features), nn.LeakyReLU(negative_slope)]
            width = hidden_features
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        require_float_tensor("outputs", outputs)
        if outputs.dim() < 1 or outputs.shape[-1] != self.in_features:
            raise ValueError(f"Discriminator expects outputs of shape [..., {self.in_features}], got "
                             f"{tuple(outputs.shape)}; flatten or pool feature maps to [N, D] first")
        weight_dtype = self.layers[0].weight.dtype
        return self.layers(outputs.to(weight_dtype)).squeeze(-1)


def _check_output_pair(student_out, teacher_out) -> None:
    require_float_tensor("student_out", student_out)
    require_float_tensor("teacher_out", teacher_out)
    require_same_device(student_out=student_out, teacher_out=teacher_out)
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"student_out and teacher_out must have the same shape, got "
                         f"{tuple(student_out.shape)} and {tuple(teacher_out.shape)}")


class AdversarialKD(nn.Module):
    """Adversarial KD component: a discriminator, its optimiser and the two losses.

    Xu, Hsu & Huang, "Training Shallow and Thin Networks for Acceleration via Knowledge
    Distillation with Conditional Adversarial Networks", ICLR Workshop 2018 (a discriminator
    on teacher vs student logits), with the losses of Goodfellow et al., "Generative
    Adversarial Nets", NeurIPS 2014. With scores d = D(·) and σ the logistic function:

        discriminator:  L_D = −mean log σ(D(t)) − mean log(1 − σ(D(s)))   (BCE with logits)
        student:        L_S = L_KD + w · (−mean log σ(D(s)))                (non-saturating)

    where the means run over the rows of `[..., D]` outputs. A trainer alternates
    `discriminator_step(student_out, teacher_out)` and a student update on
    `student_loss(student_out, teacher_out, kd_loss)`. Being an `nn.Module`, the component
    moves with `.to(device)` and saves the discriminator in its `state_dict`; the
    optimiser's state is in `self.optimizer.state_dict()`.

    Args:
        discriminator: the scoring module, `[..., D]` → `[...]` logits (e.g. `Discriminator(D)`).
        optimizer: optimiser over the discriminator's parameters (default: Adam with `lr`
            and `betas`, the DCGAN setting of Radford et al. 2016).
        lr: Adam learning rate when `optimizer` is None (default 2e-4).
        betas: Adam betas when `optimizer` is None (default (0.5, 0.999)).
    """

    def __init__(self, discriminator: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                 lr: float = 2e-4, betas: Tuple[float, float] = (0.5, 0.999)) -> None:
        super().__init__()
        if not isinstance(discriminator, nn.Module):
            raise TypeError(f"discriminator must be a torch.nn.Module, got {type(discriminator).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.discriminator = discriminator
        if optimizer is None:
            optimizer = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=betas)
        self.optimizer = optimizer

    def discriminator_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
        """L_D on detached inputs: BCE-with-logits, teacher rows labelled 1, student rows 0."""
        _check_output_pair(student_out, teacher_out)
        teacher_scores = self.discriminator(teacher_out.detach())
        student_scores = self.discriminator(student_out.detach())
        return (F.binary_cross_entropy_with_logits(teacher_scores, torch.ones_like(teacher_scores))
                + F.binary_cross_entropy_with_logits(student_scores, torch.zeros_like(student_scores)))

    def discriminator_step(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> float:
        """One optimiser step on L_D; returns L_D before the step as a Python float.

        Both inputs are detached, so the step never touches the student's graph.
        Shapes: `[..., D]`, equal for student and teacher.
        """
        loss = self.discriminator_loss(student_out, teacher_out)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def generator_loss(self, student_out: torch.Tensor) -> torch.Tensor:
        """−mean log σ(D(s)), differentiable in `student_out` only.

        The discriminator's parameters are frozen while the graph is built, so a backward
        pass through this loss leaves their `.grad` untouched.
        """
        require_float_tensor("student_out", student_out)
        parameters = list(self.discriminator.parameters())
        previous_flags = [parameter.requires_grad for parameter in parameters]
        try:
            for parameter in parameters:
                parameter.requires_grad_(False)
            scores = self.discriminator(student_out)
        finally:
            for parameter, flag in zip(parameters, previous_flags):
                parameter.requires_grad_(flag)
        return F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))

    def student_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                     kd_loss: Optional[torch.Tensor] = None, weight: float = 1.0) -> torch.Tensor:
        """L_S = kd_loss + weight · (−mean log σ(D(student_out))).

        Args:
            student_out: student outputs `[..., D]` (logits or features), with their graph.
            teacher_out: the matching teacher outputs, same shape; checked against
                `student_out` so that a mismatched pair fails here as it would in
                `discriminator_step` (the generator term itself depends on the student only).
            kd_loss: a 0-dim KD loss to add to (default None: the adversarial term alone).
            weight: w ≥ 0, the weight of the adversarial term (default 1.0).

        Returns:
            0-dim tensor; its gradient reaches `student_out` (and whatever `kd_loss` depends on).
        """
        _check_output_pair(student_out, teacher_out)
        weight = require_non_negative("weight", weight)
        if kd_loss is not None:
            if not isinstance(kd_loss, torch.Tensor) or kd_loss.dim() != 0:
                shape = tuple(kd_loss.shape) if isinstance(kd_loss, torch.Tensor) else type(kd_loss).__name__
                raise ValueError(f"kd_loss must be a 0-dim tensor or None, got {shape}")
        adversarial_term = weight * self.generator_loss(student_out)
        return adversarial_term if kd_loss is None else kd_loss + adversarial_term
