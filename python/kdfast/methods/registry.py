"""Pick a distillation method by name: `build_method("dkd", ...)` → a loss module.

`build_method` returns a `DistillationMethod`, an `nn.Module` called like `kdfast.KDLoss`:
`method(student_logits, teacher_logits, labels) -> 0-dim float32 loss` (mean over the
rows whose label is not `ignore_index`), so it is a drop-in `loss` for `kdfast.Distiller`.
Every method computes

    L = α·CE(s, y) + (1 − α)·D(s, t) + β·E

with the hard-label cross-entropy CE, a logit-level term D and, for feature-level,
relational and adversarial methods, an extra term E of weight β (`weight`; each method has
a default, listed in `METHODS`). D is the temperature-T forward KL scaled by T² (classic
KD) unless the method replaces it: `reverse_kl`, `jsd`, `tvd` (the fused `KDLoss`
divergences), `mse` (logit MSE) or `dkd` (decoupled KD, T² inside). E reads intermediate
features that `FeatureCapture` hooks record during the forward passes of the student and
the teacher; such methods have `needs_teacher_forward = True`: the teacher must run on
the same batch just before the loss is called (pass it to `Distiller` as a live teacher
rather than precomputed `teacher_logits`). The hooks stay registered until `remove()` (or
the end of a `with method:` block). Learnable parts the student's optimiser must update
(the FitNets regressor) are returned by `trainable_parameters()`; the adversarial
discriminator has its own optimiser and takes one step inside every call made with
autograd enabled while the module is in training mode (so `Distiller.evaluate`, which runs
under `torch.no_grad()`, never trains it). Options are validated when the method is built.
When several terms read bfloat16/float16 student logits (α·CE beside a `mse` or `dkd` term,
or the adversarial term), the logits are converted to float32 once, so the terms' gradients
add up in float32 and are rounded to the logits' dtype once.
"""

from __future__ import annotations

import difflib
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from kdfast.contract.options import compute_dtype
from kdfast.losses import KDLoss
from kdfast.methods.adversarial import AdversarialKD, Discriminator
from kdfast.methods.data_free import DataFreeKD, build_data_free
from kdfast.methods.feature import HintLoss, attention_transfer_loss, similarity_preserving_loss
from kdfast.methods.hooks import FeatureCapture
from kdfast.methods.logit import dkd_loss, logit_mse_loss
from kdfast.methods.relational import relational_kd_loss

__all__ = ["METHODS", "MethodSpec", "DistillationMethod", "available_methods", "build_method"]


@dataclass(frozen=True)
class MethodSpec:
    """One registry entry.

    Attributes:
        logit_term: "forward_kl", "reverse_kl", "jsd", "tvd", "mse" or "dkd" (the D above).
        extra_term: None, "fitnets", "attention", "similarity", "rkd" or "adversarial" (E);
            "generator" marks `data_free`, built as a `DataFreeKD` (logit_term "l1" is its default D).
        default_weight: β used when `build_method(weight=None)`; 0 without an extra term.
        summary: one line for help texts.
    """

    logit_term: str
    extra_term: Optional[str]
    default_weight: float
    summary: str

    @property
    def needs_features(self) -> bool:
        return self.extra_term in ("fitnets", "attention", "similarity", "rkd")


METHODS: Dict[str, MethodSpec] = {
    "kd": MethodSpec("forward_kl", None, 0.0, "Hinton et al. 2015: T²·KL(p_teacher ‖ q_student)"),
    "reverse_kl": MethodSpec("reverse_kl", None, 0.0, "T²·KL(q_student ‖ p_teacher)"),
    "jsd": MethodSpec("jsd", None, 0.0, "T²·generalised Jensen-Shannon divergence (β = 0.5)"),
    "tvd": MethodSpec("tvd", None, 0.0, "T²·total variation distance"),
    "mse": MethodSpec("mse", None, 0.0, "Ba & Caruana 2014: mean squared logit difference"),
    "dkd": MethodSpec("dkd", None, 0.0, "Zhao et al. 2022: decoupled KD (α_tckd = 1, β_nckd = 8)"),
    "fitnets": MethodSpec("forward_kl", "fitnets", 1.0,
                          "KD + Romero et al. 2015 hint loss through a learnable regressor"),
    # Attention: the paper's β = 1000 acts on the mean over N·HW map elements with a factor ½;
    # on our per-sample sum that is 500 / HW, about 10 for maps of ~50 positions.
    "attention": MethodSpec("forward_kl", "attention", 10.0,
                            "KD + Zagoruyko & Komodakis 2017 attention transfer (spatial maps)"),
    "similarity": MethodSpec("forward_kl", "similarity", 3000.0,
                             "KD + Tung & Mori 2019 similarity-preserving loss"),
    "rkd": MethodSpec("forward_kl", "rkd", 25.0, "KD + Park et al. 2019 relational KD (distance + 2·angle)"),
    "adversarial": MethodSpec("forward_kl", "adversarial", 0.1,
                              "KD + a logit discriminator (Xu et al. 2018), non-saturating generator term"),
    "data_free": MethodSpec("l1", "generator", 0.0,
                            "Fang et al. 2019 data-free adversarial KD: a generator of disagreement inputs"),
}


def available_methods() -> List[str]:
    """The registered method names, in registry order."""
    return list(METHODS)


def _first_tensor(output: Any) -> torch.Tensor:
    """A module's output as one tensor (the first tensor of a tuple/list output)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"a captured feature layer returned {type(output).__name__}; choose a layer whose "
                    f"output is a tensor (or a tuple starting with one)")


def _match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool `[N, C, *spatial]` maps to their common (elementwise smaller) size."""
    if student.dim() < 3 or student.shape[2:] == teacher.shape[2:]:
        return student, teacher
    size = tuple(min(a, b) for a, b in zip(student.shape[2:], teacher.shape[2:]))
    pool = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}.get(student.dim())
    if pool is None or teacher.dim() != student.dim():
        raise ValueError(f"cannot match feature maps of shapes {tuple(student.shape)} and {tuple(teacher.shape)}")
    return (student if student.shape[2:] == size else pool(student, size),
            teacher if teacher.shape[2:] == size else pool(teacher, size))


class DistillationMethod(nn.Module):
    """L = α·CE + (1 − α)·D + β·E as described in the module docstring; build with `build_method`.

    Call: `method(student_logits, teacher_logits, labels=None)` with logits `[..., V]` (the
    student's and the teacher's), labels int64 `[...]` or None (then α must be 0, and `dkd`
    needs labels). Returns a 0-dim float32 tensor (float64 for float64 logits): the mean
    over rows whose label is not `ignore_index` (all rows without labels). Feature terms
    use the features captured in the forward passes since the previous call (the captures
    are cleared after every call, so a call without fresh teacher and student passes raises
    RuntimeError rather than reusing stale features) and are batch means.

    Attributes:
        name: the registry name. spec: its `MethodSpec`. alpha, temperature, weight: α, T, β.
        ignore_index: label value left out (read by `Distiller`).
        needs_teacher_forward: True when the loss reads teacher features captured by hooks.
    """

    def __init__(self, name: str, spec: MethodSpec, *, temperature: float, alpha: float, weight: float,
                 ignore_index: int, hint: Optional[HintLoss] = None,
                 adversary: Optional[AdversarialKD] = None,
                 captures: Optional[Tuple[FeatureCapture, FeatureCapture]] = None) -> None:
        super().__init__()
        _check_method_options(temperature, alpha, weight, ignore_index)
        self.name, self.spec = name, spec
        self.temperature, self.alpha, self.weight = float(temperature), float(alpha), float(weight)
        self.ignore_index = int(ignore_index)
        self.needs_teacher_forward = spec.needs_features
        self.hint = hint
        self.adversary = adversary
        self._captures = captures
        if spec.logit_term in ("forward_kl", "reverse_kl", "jsd", "tvd"):
            self.kd = KDLoss(divergence=spec.logit_term, temperature=temperature, alpha=alpha,
                             ignore_index=ignore_index)
        else:
            self.kd = None

    # ------------------------------------------------------------------ hooks
    def remove(self) -> None:
        """Remove the feature hooks from the student and the teacher (no-op without features)."""
        if self._captures is not None:
            for capture in self._captures:
                capture.remove()

    def __enter__(self) -> "DistillationMethod":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def trainable_parameters(self) -> List[nn.Parameter]:
        """Parameters to add to the student's optimiser (the FitNets regressor; else empty)."""
        return list(self.hint.parameters()) if self.hint is not None else []

    # ------------------------------------------------------------------ loss
    def _logit_loss(self, student_logits, teacher_logits, labels) -> torch.Tensor:
        """α·CE + (1 − α)·D, averaged over the valid rows."""
        if self.kd is not None:
            return self.kd(student_logits, teacher_logits, labels)
        dkd = self.spec.logit_term == "dkd"
        if labels is None:
            if self.alpha > 0 or dkd:
                raise ValueError(f"method {self.name!r} with alpha={self.alpha} needs labels"
                                 + (" (its target-class split uses them)" if dkd else ""))
            return logit_mse_loss(student_logits, teacher_logits)
        vocab = student_logits.shape[-1]
        rows = student_logits.reshape(-1, vocab)
        dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        flat_labels = labels.reshape(-1)
        valid = flat_labels != self.ignore_index
        count = valid.sum().clamp_min(1).to(dtype)
        if dkd:
            term = dkd_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                            ignore_index=self.ignore_index)
        else:  # "mse": mean over the elements of the valid rows (no boolean indexing: no sync)
            squared = logit_mse_loss(rows, teacher_logits.reshape(-1, vocab), reduction="none").sum(-1)
            term = torch.where(valid, squared, squared.new_zeros(())).sum() / (count * vocab)
        if self.alpha == 0:
            return term
        cross_entropy = F.cross_entropy(rows.to(dtype), flat_labels, ignore_index=self.ignore_index,
                                        reduction="sum") / count
        return self.alpha * cross_entropy + (1.0 - self.alpha) * term

    def _captured(self) -> Tuple[torch.Tensor, torch.Tensor]:
        assert self._captures is not None
        student_capture, teacher_capture = self._captures
        try:
            student = _first_tensor(student_capture[student_capture.names[0]])
            teacher = _first_tensor(teacher_capture[teacher_capture.names[0]])
        except KeyError as error:
            raise RuntimeError(f"method {self.name!r} found no captured features ({error.args[0]}); run the "
                               f"teacher and the student on the batch before calling the loss (with "
                               f"Distiller, pass the teacher as a live teacher, not precomputed logits)") from None
        return student, teacher.detach()

    def _extra_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        kind = self.spec.extra_term
        if kind == "adversarial":
            assert self.adversary is not None
            dtype = compute_dtype(student_logits, teacher_logits)
            student_rows = student_logits.reshape(-1, student_logits.shape[-1]).to(dtype)
            teacher_rows = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(dtype)
            if self.training and torch.is_grad_enabled():
                self.adversary.discriminator_step(student_rows, teacher_rows)
            return self.adversary.generator_loss(student_rows)
        student, teacher = self._captured()
        if kind == "fitnets":
            assert self.hint is not None
            if self.hint.spatial:
                student, teacher = _match_spatial(student, teacher)
            elif student.dim() == 3:  # [N, C, L] sequences: project the channel axis
                student, teacher = _match_spatial(student, teacher)
                student, teacher = student.transpose(1, 2), teacher.transpose(1, 2)
            return self.hint(student, teacher)
        if kind == "attention":
            student, teacher = _match_spatial(student, teacher)
            return attention_transfer_loss(student, teacher)
        if kind == "similarity":
            return similarity_preserving_loss(student, teacher)
        return relational_kd_loss(student, teacher)  # "rkd"

    def _terms_read_logits(self) -> int:
        """How many separately computed terms read the student logits."""
        extra = self.spec.extra_term == "adversarial" and self.weight > 0
        cross_entropy_apart = self.kd is None and self.alpha > 0  # the fused KDLoss adds α·CE itself
        return 1 + int(extra) + int(cross_entropy_apart)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(student_logits, torch.Tensor) and self._terms_read_logits() > 1:
            # one conversion: the terms' gradients add up in the compute dtype, then are rounded once
            student_logits = student_logits.to(compute_dtype(student_logits))
        loss = self._logit_loss(student_logits, teacher_logits, labels)
        if self.spec.extra_term is not None and self.weight > 0:
            loss = loss + self.weight * self._extra_loss(student_logits, teacher_logits).to(loss.dtype)
        if self._captures is not None:  # each capture serves one call: stale features raise instead
            for capture in self._captures:
                capture.clear()
        return loss

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, temperature={self.temperature}, alpha={self.alpha}, weight={self.weight}, "
                f"needs_teacher_forward={self.needs_teacher_forward}")


def _check_method_options(temperature, alpha, weight, ignore_index) -> None:
    """T > 0, α ∈ [0, 1], β ≥ 0 and an int ignore_index, checked when a method is built."""
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 <= alpha <= 1):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 <= weight < float("inf")):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} ({ignore_index!r})")


def _probe_shapes(student: nn.Module, teacher: Optional[nn.Module], student_layer: str,
                  teacher_layer: Optional[str], example_inputs: Any
                  ) -> Tuple[torch.Size, Optional[torch.Size], torch.Size]:
    """Run the models once on `example_inputs` (eval mode, no grad; modes restored) and return
    the shapes of the student's feature, the teacher's feature (None without a teacher) and
    the student's logits."""
    def call(model: nn.Module) -> Any:
        if isinstance(example_inputs, dict):
            return model(**example_inputs)
        if isinstance(example_inputs, (tuple, list)):
            return model(*example_inputs)
        return model(example_inputs)

    shapes: List[Optional[torch.Size]] = [None, None]
    for position, (model, layer) in enumerate(((student, student_layer), (teacher, teacher_layer))):
        if model is None:
            continue
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), FeatureCapture(model, layer, detach=True) as capture:
                logits = _first_tensor(call(model))
                shapes[position] = _first_tensor(capture[layer]).shape
        finally:
            model.train(was_training)
        if model is student:
            student_logits_shape = logits.shape
    return shapes[0], shapes[1], student_logits_shape


def build_method(name: str, *, temperature: float = 4.0, alpha: float = 0.5, weight: Optional[float] = None,
                 student: Optional[nn.Module] = None, teacher: Optional[nn.Module] = None,
                 student_layer: Optional[str] = None, teacher_layer: Optional[str] = None,
                 example_inputs: Any = None, num_classes: Optional[int] = None,
                 ignore_index: int = -100, **options: Any) -> "DistillationMethod | DataFreeKD":
    """Build the loss of a registered distillation method.

    Args:
        name: one of `available_methods()`: kd, reverse_kl, jsd, tvd, mse, dkd, fitnets,
            attention, similarity, rkd, adversarial, data_free.
        temperature: T > 0 of the logit term (default 4.0; `mse` ignores it).
        alpha: weight α ∈ [0, 1] of the hard-label cross-entropy (default 0.5).
        weight: β ≥ 0 of the extra term (default None: the method's `default_weight`).
        student, teacher: the models, required by the feature methods (fitnets, attention,
            similarity, rkd); the loss registers forward hooks on them.
        student_layer, teacher_layer: module names (from `named_modules()`) whose outputs
            are the features; required by the feature methods. fitnets and attention take
            `[N, C, *spatial]` maps (spatial sizes are pooled to the smaller one) and fitnets
            also `[N, C]` vectors; attention needs maps in both models; similarity and rkd
            take any `[N, ...]` output (rkd needs batches of at least 3).
        example_inputs: a small batch the models accept (a tensor, tuple or mapping), run
            once in eval mode without gradients to size the FitNets regressor, to check
            the feature shapes and, for adversarial, to find the number of classes.
            Required by the feature methods and (unless `num_classes` is given) adversarial.
        num_classes: V, the logits' width, for the adversarial discriminator.
        ignore_index: label value whose rows are left out (default -100).
        **options: method-specific options; only `data_free` takes any (its generator,
            discrepancy and priors: see `kdfast.methods.data_free.build_data_free`).

    Returns:
        A `DistillationMethod` (see its docstring for the call contract); for `data_free` a
        `DataFreeKD`, called the same way on real data and trained without data by
        `kdfast.trainer.DataFreeDistiller`.

    Raises:
        ValueError: unknown name (the message lists the valid names), α outside [0, 1],
            T ≤ 0, β < 0, a missing model, layer or example batch, or feature shapes the
            method cannot use (e.g. attention on an MLP's `[N, C]` vectors).
    """
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=2)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown distillation method {name!r}{hint}; valid names: {', '.join(METHODS)}")
    spec = METHODS[name]
    weight = spec.default_weight if weight is None else weight
    _check_method_options(temperature, alpha, weight, ignore_index)
    if spec.extra_term == "generator":
        return build_data_free(temperature=temperature, alpha=alpha, weight=weight, teacher=teacher,
                               example_inputs=example_inputs, ignore_index=ignore_index, **options)
    if options:
        raise TypeError(f"method {name!r} takes no options, got {sorted(options)}")

    hint_module: Optional[HintLoss] = None
    adversary: Optional[AdversarialKD] = None
    captures: Optional[Tuple[FeatureCapture, FeatureCapture]] = None
    if spec.needs_features or (spec.extra_term == "adversarial" and num_classes is None):
        required = {"student": student, "example_inputs": example_inputs}
        if spec.needs_features:
            required = {"student": student, "teacher": teacher, "example_inputs": example_inputs,
                        "student_layer": student_layer, "teacher_layer": teacher_layer}
        missing = [key for key, value in required.items() if value is None]
        if missing:
            raise ValueError(f"method {name!r} needs {', '.join(missing)}")
    if spec.needs_features:
        student_shape, teacher_shape, _ = _probe_shapes(student, teacher, student_layer, teacher_layer,
                                                        example_inputs)
        shapes = f"student {student_layer!r} gives {tuple(student_shape)}, teacher {teacher_layer!r} gives " \
                 f"{tuple(teacher_shape)}"
        if spec.extra_term == "attention" and (len(student_shape) < 3 or len(teacher_shape) != len(student_shape)):
            raise ValueError(f"method 'attention' needs [N, C, *spatial] feature maps of the same rank in both "
                             f"models; {shapes}")
        if spec.extra_term == "fitnets":
            if len(student_shape) != len(teacher_shape) or len(student_shape) < 2:
                raise ValueError(f"method 'fitnets' needs student and teacher features of the same rank, "
                                 f"[N, C] or [N, C, *spatial]; {shapes}")
            hint_module = HintLoss(int(student_shape[1]), int(teacher_shape[1]), spatial=len(student_shape) == 4,
                                   always_project=True)
        captures = (FeatureCapture(student, student_layer).attach(),
                    FeatureCapture(teacher, teacher_layer, detach=True).attach())
    if spec.extra_term == "adversarial":
        if num_classes is None:
            num_classes = int(_probe_shapes(student, None, "", None, example_inputs)[2][-1])
        adversary = AdversarialKD(Discriminator(int(num_classes), hidden_features=64))
    return DistillationMethod(name, spec, temperature=temperature, alpha=alpha, weight=weight,
                              ignore_index=ignore_index, hint=hint_module, adversary=adversary, captures=captures)
