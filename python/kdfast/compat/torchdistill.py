"""Drop-in for torchdistill 1.1.5's `KDLoss` (`torchdistill.losses.mid_level.KDLoss`).

Same constructor (student_module_path, student_module_io, teacher_module_path,
teacher_module_io, temperature, alpha=None, beta=None, reduction="batchmean", **kwargs for
`nn.CrossEntropyLoss`) and the same numbers, on the fused kernels. The module paths may be
omitted (None) to use it as a plain criterion: forward(student_logits, teacher_logits,
targets) with tensors instead of torchdistill's io dicts.

The loss, with softmax over dim 1 (the class dimension of [N, C] or [N, C, d1, ...]):
soft = KLDivLoss(reduction)(log_softmax(s/T), softmax(t/T)) ("batchmean" divides by N,
"mean" by every element, "sum"); if `alpha` is None or 0 or no targets are given, the loss is
`soft` alone (no T², no β: torchdistill's convention); otherwise
α·CE(s, targets) + β·T²·soft with β = 1 − α by default and CE reduced with "mean" for
"batchmean". One fused kernel call computes both terms when they share a denominator
("batchmean" or "sum" on [N, C] logits with no ignored target); otherwise two calls.
Class weights (`weight=`) and reduction="none" (element-wise [N, C] output) raise ValueError.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from kdfast.functional import kd_loss

__all__ = ["KDLoss"]


def _class_last(logits: Tensor) -> Tensor:
    """[N, C, d1, ...] -> [N·d1·..., C] (a copy for more than two dimensions)."""
    if logits.dim() == 2:
        return logits
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


class KDLoss(nn.KLDivLoss):
    """torchdistill 1.1.5 `KDLoss` (Hinton et al. 2015) on the fused kernels.

    Args:
        student_module_path, student_module_io, teacher_module_path, teacher_module_io: where
            forward finds the logits in torchdistill's io dicts (`io_dict[path][io]`); None to
            call forward with tensors.
        temperature: τ > 0.
        alpha: weight of the cross-entropy (None or 0: the soft loss alone).
        beta: weight of τ²·soft (default 1 − α; with alpha and beta both None, TypeError as in
            torchdistill).
        reduction: "batchmean" (default), "mean" or "sum" of the KL term; the cross-entropy
            uses "mean" for "batchmean", otherwise the same reduction.
        **kwargs: `nn.CrossEntropyLoss` options: ignore_index (default -100), label_smoothing.

    forward(student_io_dict or student_logits [N, C, ...], teacher_io_dict or teacher_logits,
    targets [N, ...] int64 or None) -> float32 scalar (float64 for float64 logits).
    """

    def __init__(self, student_module_path=None, student_module_io=None, teacher_module_path=None,
                 teacher_module_io=None, temperature: Optional[float] = None, alpha: Optional[float] = None,
                 beta: Optional[float] = None, reduction: str = "batchmean", **kwargs):
        super().__init__(reduction=reduction)
        if temperature is None:
            raise TypeError("KDLoss requires a temperature")
        if reduction not in ("batchmean", "mean", "sum"):
            raise ValueError(f"KDLoss: reduction={reduction!r} is not supported by kdfast's fused kernels "
                             "(expected 'batchmean', 'mean' or 'sum')")
        if kwargs.get("weight") is not None:
            raise ValueError("KDLoss: class weights (weight=) are not supported by kdfast's fused kernels")
        unknown = set(kwargs) - {"weight", "ignore_index", "label_smoothing"}
        if unknown:
            raise ValueError(f"KDLoss: unsupported CrossEntropyLoss options {sorted(unknown)}")
        self.student_module_path = student_module_path
        self.student_module_io = student_module_io
        self.teacher_module_path = teacher_module_path
        self.teacher_module_io = teacher_module_io
        self.temperature = temperature
        self.alpha = alpha
        self.beta = 1 - alpha if beta is None else beta
        self.cel_reduction = "mean" if reduction == "batchmean" else reduction
        self.ignore_index = int(kwargs.get("ignore_index", -100))
        self.label_smoothing = float(kwargs.get("label_smoothing", 0.0))

    def _soft(self, student: Tensor, teacher: Tensor, batch: int) -> Tensor:
        total = kd_loss(student, teacher, temperature=self.temperature, reduction="sum", t2_scale=False)
        if self.reduction == "batchmean":
            return total / batch
        if self.reduction == "mean":
            return total / student.numel()
        return total

    def forward(self, student_io_dict, teacher_io_dict, targets: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        student_logits = student_io_dict
        if self.student_module_path is not None and not isinstance(student_io_dict, Tensor):
            student_logits = student_io_dict[self.student_module_path][self.student_module_io]
        teacher_logits = teacher_io_dict
        if self.teacher_module_path is not None and not isinstance(teacher_io_dict, Tensor):
            teacher_logits = teacher_io_dict[self.teacher_module_path][self.teacher_module_io]
        batch = student_logits.shape[0]
        student, teacher = _class_last(student_logits), _class_last(teacher_logits.detach())
        if self.alpha is None or self.alpha == 0 or targets is None:
            return self._soft(student, teacher, batch)
        labels = targets.reshape(-1)
        weight = self.alpha + self.beta
        fusable = (student_logits.dim() == 2 and self.reduction in ("batchmean", "sum") and weight > 0
                   and self.alpha >= 0 and self.beta >= 0 and not bool((labels == self.ignore_index).any()))
        if fusable:
            loss = kd_loss(student, teacher, labels, temperature=self.temperature, alpha=self.alpha / weight,
                           ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                           reduction="mean" if self.reduction == "batchmean" else "sum")
            return weight * loss
        hard = kd_loss(student, teacher, labels, alpha=1.0, ignore_index=self.ignore_index,
                       label_smoothing=self.label_smoothing, reduction=self.cel_reduction)
        return self.alpha * hard + self.beta * (self.temperature ** 2) * self._soft(student, teacher, batch)
