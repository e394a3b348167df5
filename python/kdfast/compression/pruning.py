"""Magnitude pruning of a student on a schedule, with the recovery phase trained by any kdfast loss.

`prepare_pruning(model, pattern)` attaches an all-ones mask to the weight of every
`nn.Linear` (and, for the unstructured pattern, every `nn.Conv1d/2d/3d`) through
`torch.nn.utils.prune.custom_from_mask`: the layer then holds `weight_orig` (the trained
parameter) and the buffer `weight_mask`, and computes with `weight = weight_orig * weight_mask`.
Because the masks exist from the start, the state_dict has the same keys before and after
pruning, so a `Distiller` checkpoint restores the masks with the student.

`PruningSchedule` is a `Distiller` callback (`on_step`) that sets the masks as the steps go:
- "unstructured": the gradual magnitude schedule, sparsity s(t) = s·(1 − (1 − p)³) with
  p = (t − start) / (end − start) clipped to [0, 1], updated every `frequency` steps; each
  layer keeps its round((1 − s(t))·numel) largest |weight| entries (ties broken by position)
  and a pruned entry stays pruned (its masked weight is 0, the smallest magnitude).
- "2:4": at `start_step`, in one shot, every group of 4 consecutive input weights of each
  row keeps its 2 largest |weight| entries (exactly 2 of every 4 are zero), the pattern of
  semi-structured sparse kernels. Layers need `in_features` divisible by 4.
The masked entries get zero gradient, so the weights stay as sparse as the masks while the
remaining ones recover under the loss (with KD, from the teacher's soft labels).
`apply_masks(model, pattern, sparsity)` sets the masks at once (one-shot pruning);
`finish_pruning(model)` makes the masks permanent (`prune.remove`).

The callback is stateless (the masks live in the model), so a resumed run prunes exactly as an
uninterrupted one. Distiller calls callbacks on rank 0 only: under DDP it raises rather than let
the ranks' weights diverge.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = ["PATTERNS", "PruningSchedule", "apply_masks", "finish_pruning", "mask_2_4", "mask_unstructured",
           "prepare_pruning", "pruned_layers", "sparsity"]

PATTERNS = ("unstructured", "2:4")
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def mask_unstructured(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """0/1 mask (weight's shape and dtype) zeroing the round(sparsity·numel) smallest |weight| entries."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    pruned = int(round(sparsity * weight.numel()))
    mask = torch.ones(weight.numel(), dtype=weight.dtype, device=weight.device)
    if pruned:
        # stable sort: among equal magnitudes the earlier entries are pruned first
        order = torch.sort(weight.detach().abs().flatten(), stable=True).indices
        mask[order[:pruned]] = 0
    return mask.view_as(weight)


def mask_2_4(weight: torch.Tensor) -> torch.Tensor:
    """0/1 mask keeping the 2 largest |weight| of every 4 consecutive entries along the last
    (input) dimension of a 2-D weight `[out, in]`, in % 4 == 0."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"2:4 sparsity needs a 2-D weight with in_features divisible by 4, got {tuple(weight.shape)}")
    groups = weight.detach().abs().reshape(-1, 4)
    keep = torch.topk(groups, 2, dim=1, sorted=False).indices
    mask = torch.zeros_like(groups).scatter_(1, keep, 1.0)
    return mask.view_as(weight).to(weight.dtype)


def _targets(model: nn.Module, pattern: str) -> List[Tuple[str, nn.Module]]:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    chosen, refused = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if pattern == "2:4" and module.in_features % 4:
                refused.append(f"{name} (in_features={module.in_features})")
            chosen.append((name, module))
        elif isinstance(module, CONV):
            if pattern == "2:4":
                refused.append(f"{name} ({type(module).__name__}: 2:4 applies to Linear layers)")
            chosen.append((name, module))
    if refused:
        raise ValueError(f"2:4 pruning cannot apply to: {', '.join(refused)}")
    if not chosen:
        raise ValueError("the model has no nn.Linear or convolution layer to prune")
    return chosen


def prepare_pruning(model: nn.Module, pattern: str = "unstructured") -> List[str]:
    """Attach all-ones weight masks to the layers `pattern` prunes, in place; returns their names.

    Raises ValueError for an unknown pattern, a model without prunable layers, layers 2:4 cannot
    apply to (convolutions, `in_features` not divisible by 4), or a model already prepared.
    """
    targets = _targets(model, pattern)
    for name, module in targets:
        if hasattr(module, "weight_mask"):
            raise ValueError(f"layer {name!r} already has a pruning mask: prepare_pruning runs once per model")
    for _, module in targets:
        prune.custom_from_mask(module, "weight", torch.ones_like(module.weight))
    return [name for name, _ in targets]


def pruned_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every layer with a pruning mask, in `named_modules` order."""
    return [(name, module) for name, module in model.named_modules() if hasattr(module, "weight_mask")]


@torch.no_grad()
def apply_masks(model: nn.Module, pattern: str, target: float) -> None:
    """Set every mask of a prepared `model` at once: each layer at sparsity `target` (a fraction
    in [0, 1]) for "unstructured", 2 of every 4 for "2:4" (`target` ignored); masks and
    `weight_orig` keep their shapes and float dtype, pruned entries of `weight_orig` become 0."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    layers = pruned_layers(model)
    if not layers:
        raise ValueError("the model has no pruning masks: call prepare_pruning first")
    for _, module in layers:
        masked = module.weight_orig * module.weight_mask
        mask = mask_2_4(masked) if pattern == "2:4" else mask_unstructured(masked, target)
        module.weight_mask.copy_(mask)
        module.weight_orig.mul_(mask)
        module.weight = module.weight_orig * module.weight_mask  # what the next forward recomputes


def sparsity(model: nn.Module) -> Dict[str, float]:
    """Fraction of exactly-zero entries of each pruned layer's effective weight, by layer name."""
    return {name: float((module.weight_orig * module.weight_mask == 0).float().mean())
            for name, module in pruned_layers(model)}


def finish_pruning(model: nn.Module) -> nn.Module:
    """Make the masks permanent (`torch.nn.utils.prune.remove`): each layer's `weight` becomes a
    plain parameter holding the masked values. Returns `model`."""
    for _, module in pruned_layers(model):
        prune.remove(module, "weight")
    return model


class PruningSchedule:
    """`Distiller` callback pruning a prepared student by weight magnitude as training goes.

    Args:
        model: the student, prepared with `prepare_pruning(model, pattern)`.
        sparsity: final fraction of zero weights per layer (unstructured; 2:4 is always 0.5).
        pattern: "unstructured" or "2:4".
        start_step: first optimizer step (counted from 1, as `Distiller.step`) after which the
            masks are set (2:4: the only one). Default 1.
        end_step: step at which the unstructured schedule reaches `sparsity` (default: start_step).
        frequency: steps between unstructured mask updates (default 1).
    """

    def __init__(self, model: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured",
                 start_step: int = 1, end_step: Optional[int] = None, frequency: int = 1) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
        end_step = start_step if end_step is None else end_step
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        if pattern == "2:4" and sparsity != 0.5:
            raise ValueError("2:4 sparsity is always 0.5")
        if start_step < 1 or end_step < start_step or frequency < 1:
            raise ValueError(f"need 1 <= start_step <= end_step and frequency >= 1, "
                             f"got {start_step}, {end_step}, {frequency}")
        if not pruned_layers(model):
            raise ValueError("the model has no pruning masks: call prepare_pruning(model, pattern) first")
        self.model, self.final, self.pattern = model, float(sparsity), pattern
        self.start_step, self.end_step, self.frequency = int(start_step), int(end_step), int(frequency)

    def target(self, step: int) -> float:
        """Sparsity the schedule asks for after optimizer step `step` (0 before `start_step`)."""
        if step < self.start_step:
            return 0.0
        if self.end_step == self.start_step:
            return self.final
        progress = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
        return self.final * (1.0 - (1.0 - progress) ** 3)

    def due(self, step: int) -> bool:
        """Whether the masks are updated after optimizer step `step`."""
        if self.pattern == "2:4":
            return step == self.start_step
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step

    def update(self, step: int) -> None:
        """Set the masks for optimizer step `step` when it is due (what `on_step` does)."""
        if self.due(step):
            apply_masks(self.model, self.pattern, self.target(step))

    def on_step(self, distiller: Any, metrics: Dict[str, float]) -> None:
        if getattr(distiller, "distributed", False):
            raise RuntimeError("PruningSchedule runs in a single process: Distiller calls callbacks on rank 0 only")
        self.update(int(metrics["step"]))
