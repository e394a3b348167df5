"""Teacher-to-quantised-self distillation: a float model teaches its own quantised copy.

`distil_into_quantised(model, loader, scheme)` copies `model` twice: a frozen float teacher
and a student prepared for QAT (`prepare_qat`), trains the student with a KD loss against the
teacher through `kdfast.Distiller`, converts it (`convert_qat`) and returns it with a report.
No labels are needed with the default loss (pure KL to the float model's outputs at T = 1),
so any loader of the model's inputs works. `model` itself is not modified.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import nn

from kdfast.compression.measure import model_bytes
from kdfast.compression.quantisation import QuantScheme, as_scheme, convert_qat, prepare_qat, quantise_ptq
from kdfast.losses import KDLoss
from kdfast.trainer import Distiller

__all__ = ["distil_into_quantised", "evaluate_against"]


def evaluate_against(student: nn.Module, teacher: nn.Module, loader: Iterable[Any],
                     loss: Optional[Callable[..., torch.Tensor]] = None) -> Dict[str, float]:
    """`Distiller.evaluate` of `student` against `teacher` on `loader` (loss, agreement, and with
    labels accuracy and ce); the loss defaults to `KDLoss(temperature=1.0)`. Nothing is trained."""
    loss = loss if loss is not None else KDLoss(temperature=1.0)
    frozen = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)  # no update happens here
    return Distiller(student, teacher, loss, frozen, progress=False).evaluate(loader)


def distil_into_quantised(
    model: nn.Module,
    loader: Iterable[Any],
    scheme: Union[str, QuantScheme] = "a8w4",
    *,
    epochs: int = 1,
    max_steps: Optional[int] = None,
    loss: Optional[Callable[..., torch.Tensor]] = None,
    lr: float = 1e-4,
    eval_loader: Optional[Iterable[Any]] = None,
    seed: Optional[int] = 0,
    strict: bool = True,
    progress: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Distil `model` (float) into its quantised copy with QAT and return the converted copy.

    Args:
        model: the float model; returns logits `[..., V]` (see `kdfast.Distiller`). Not modified.
        loader: training batches in the `Distiller` format; labels are optional with the default loss.
        scheme: a `QuantScheme` or a name in `kdfast.compression.SCHEMES` (default "a8w4": int8
            dynamic activations, int4 weights in groups of 32).
        epochs, max_steps: passed to `Distiller.fit`.
        loss: default `KDLoss(temperature=1.0, alpha=0.0)` (KL to the float model only).
        lr: Adam learning rate, decayed to 0 with a cosine over the planned steps (needs len(loader)
            unless max_steps is given).
        eval_loader: when given, the report holds `Distiller.evaluate` metrics of the post-training
            quantised copy ("ptq") and of the distilled, converted one ("qat") against the float model.
        seed: seeds the run (`Distiller(seed=...)`); None leaves the generators as they are.
        strict: refuse models with layers that would stay in float (see `prepare_qat`).
        progress: show the Distiller's progress bar.

    Returns:
        (converted model in eval mode, report) where report has "scheme", "layers" (names of the
        quantised Linear layers), "steps", "float_bytes", "quantised_bytes", "train_loss" (per
        step) and, with `eval_loader`, "eval": {"ptq": {...}, "qat": {...}}.
    """
    scheme = as_scheme(scheme)
    if epochs < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1 and lr > 0, got {epochs}, {lr}")
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model)
    layers = prepare_qat(student, scheme, strict)
    loss = loss if loss is not None else KDLoss(temperature=1.0, alpha=0.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    if max_steps is not None:
        total = max_steps
    elif hasattr(loader, "__len__"):
        total = epochs * len(loader)  # type: ignore[arg-type]
    else:
        raise ValueError("a loader without len() needs max_steps (the cosine decay needs the step count)")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
    distiller = Distiller(student, teacher, loss, optimizer, scheduler, seed=seed, progress=progress)
    history = distiller.fit(loader, epochs=epochs, max_steps=max_steps)
    converted = convert_qat(student, scheme)
    report: Dict[str, Any] = {
        "scheme": scheme.name, "layers": layers, "steps": distiller.step,
        "float_bytes": model_bytes(model), "quantised_bytes": model_bytes(converted),
        "train_loss": [entry["loss"] for entry in history["train"]],
    }
    if eval_loader is not None:
        ptq = quantise_ptq(copy.deepcopy(model), scheme, strict)
        report["eval"] = {"ptq": evaluate_against(ptq, teacher, eval_loader),
                          "qat": evaluate_against(converted, teacher, eval_loader)}
    return converted, report
