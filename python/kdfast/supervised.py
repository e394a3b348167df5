"""Plain supervised training and evaluation of classifiers: how the demo and the examples
train their teachers and score every model.

`train_classifier` is cross-entropy with AdamW and a per-step cosine decay over in-memory
tensors; batch order and the optional augmentation draw from a `torch.Generator` seeded with
`seed`, while everything else random (initialisation, dropout) uses the global RNG, which
the caller seeds (e.g. `kdfast.trainer.seed_everything`) so that runs repeat exactly.
`predict_logits` and `accuracy` evaluate in eval mode, without gradients, in batches.
Distillation itself goes through `kdfast.Distiller`.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["accuracy", "predict_logits", "train_classifier"]


def train_classifier(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, epochs: int, seed: int,
                     lr: float, batch_size: int = 64, weight_decay: float = 1e-4,
                     augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None) -> List[float]:
    """Trains `model` in place with cross-entropy on (inputs [N, ...], int64 labels [N]).

    Each epoch visits the rows in a fresh random order in batches of `batch_size`;
    `augment(batch, generator)` (optional) transforms each batch. AdamW(lr, weight_decay),
    cosine decay to 0 over all steps. Leaves the model in eval mode.

    Returns:
        The mean training cross-entropy of each epoch.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        total = 0.0
        for start in range(0, len(labels), batch_size):
            index = order[start:start + batch_size]
            batch = inputs[index] if augment is None else augment(inputs[index], generator)
            loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        curve.append(total / steps_per_epoch)
    model.eval()
    return curve


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """float32 logits [N, classes] of `model` in eval mode (left in eval mode), `batch_size` rows at a time."""
    model.eval()
    return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]).float()


def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of rows whose arg-max logit equals the label (eval mode, no gradients)."""
    return (predict_logits(model, inputs, batch_size).argmax(-1) == labels).float().mean().item()
