"""The providers a benchmark compares: kdfast, the eager baseline, its torch.compile and Liger-Kernel.

`eager_kd_loss` is the loss contract of docs/design.md written with torch.nn.functional (the
yardstick of every speed-up; tests check it against `kdfast.reference`). `make_provider`
returns a `Provider` (a loss callable `fn(student, teacher, labels)`) for one `Case`, or raises
`ProviderUnavailable`; `make_step` wraps it into the no-argument call that is timed for the
`fwd` or `fwd+bwd` pass. Liger-Kernel is an optional dependency imported when its provider is
built.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kdfast import functional
from kdfast.benchmark.cases import DIVERGENCES, PASSES, PROVIDERS, Case
from kdfast.contract.options import KDOptions
from kdfast.ops import kd_loss as kd_ops

__all__ = ["Provider", "ProviderUnavailable", "eager_kd_loss", "make_provider", "make_step"]


# ----------------------------------------------------------------------------- the eager baseline


def _divergence_rows(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, divergence: str,
                     beta: float) -> torch.Tensor:
    """Row-wise D(p, q) from log p (teacher) and log q (student), via torch.nn.functional.

    F.kl_div(input, target, log_target=True) is Σ exp(target)·(target − input), i.e.
    KL(target ‖ exp(input)) summed over the last dim.
    """
    if divergence == "forward_kl":  # Σ p (log p − log q)
        return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
    if divergence == "reverse_kl":  # Σ q (log q − log p)
        return F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True).sum(-1)
    if divergence == "jsd":  # β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q
        mixture_log_probs = torch.logaddexp(teacher_log_probs + math.log(beta), student_log_probs + math.log1p(-beta))
        teacher_to_mixture = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)
        student_to_mixture = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True).sum(-1)
        return beta * teacher_to_mixture + (1.0 - beta) * student_to_mixture
    if divergence == "tvd":  # ½ Σ |p − q|
        return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")


def eager_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor] = None,
                  *, divergence: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.0, beta: float = 0.5,
                  ignore_index: int = -100, label_smoothing: float = 0.0, t2_scale: bool = True) -> torch.Tensor:
    """The KD loss with reduction "mean", written as a user would with torch.nn.functional.

    Args:
        student_logits: [..., V] float32/bfloat16/float16 (float64 is kept as float64).
        teacher_logits: [..., V]; detached (a constant).
        labels: int64 [...] or None (every row valid; alpha must then be 0).
        divergence, temperature, alpha, beta, ignore_index, label_smoothing, t2_scale: as in
            `kdfast.functional.kd_loss`.

    Returns:
        Scalar: Σ over valid rows of α·CE + (1−α)·τ·D, divided by the number of valid rows
        (0 when none is valid). Computed in float32 (float64 for float64 inputs); autograd
        returns the student gradient in the student's dtype. The CE term is skipped when α = 0.
    """
    vocab = student_logits.shape[-1]
    compute_dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    student = student_logits.reshape(-1, vocab).to(compute_dtype)
    teacher = teacher_logits.detach().reshape(-1, vocab).to(compute_dtype)

    student_log_probs = F.log_softmax(student / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher / temperature, dim=-1)
    divergence_scale = (1.0 - alpha) * (temperature * temperature if t2_scale else 1.0)
    row_loss = divergence_scale * _divergence_rows(teacher_log_probs, student_log_probs, divergence, beta)

    if labels is None:
        if alpha != 0:
            raise ValueError("eager_kd_loss: alpha > 0 needs labels")
        return row_loss.mean()
    flat_labels = labels.reshape(-1)
    if alpha != 0:
        cross_entropy = F.cross_entropy(student, flat_labels, ignore_index=ignore_index,
                                        label_smoothing=label_smoothing, reduction="none")
        row_loss = row_loss + alpha * cross_entropy
    valid_rows = flat_labels != ignore_index
    row_loss = torch.where(valid_rows, row_loss, 0.0)
    return row_loss.sum() / valid_rows.sum().clamp_min(1)


# ----------------------------------------------------------------------------- providers


class ProviderUnavailable(Exception):
    """The provider does not apply here (not importable, wrong device, unsupported divergence)."""


@dataclasses.dataclass
class Provider:
    """A loss callable `fn(student, teacher, labels) -> scalar loss` plus how to drive it.

    `mutates_student`: the callable overwrites the student logits in place (Liger's
    cross-entropy stores its gradient there), so it must be given a private copy.
    `extra_warmup`: calls to make before the regular warmup (torch.compile compiles on the first).
    `kind`: "loss"; "inplace" (the loss overwrites a non-leaf student with its gradient: the
    step makes one such student once, and each later call runs on the previous call's
    gradient, which costs the kernels the same); "floor" (`fn(student, teacher, out)` is an
    N×V elementwise op, timed for fwd+bwd only and not cross-checked).
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    mutates_student: bool = False
    extra_warmup: int = 0
    kind: str = "loss"


def _raise_compile_limits() -> None:
    # Each (shape, dtype, grad mode) gets its own static graph of the same function; raise the
    # per-function recompile limit (8 by default) so that a full table never falls back to eager.
    config = torch._dynamo.config
    for attribute in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, attribute):
            setattr(config, attribute, max(getattr(config, attribute), 512))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)


def _make_liger_fn(case: Case) -> Callable:
    if case.device != "cuda":
        raise ProviderUnavailable("liger runs on CUDA only")
    if case.divergence not in ("forward_kl", "jsd"):
        raise ProviderUnavailable(f"Liger-Kernel has no {case.divergence} loss with a student gradient")
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerJSD, LigerKLDIVLoss
    except Exception as error:  # ImportError, or Triton failing to initialise
        raise ProviderUnavailable(f"liger_kernel not importable ({type(error).__name__}: {error})") from None

    temperature, alpha, beta, ignore_index = case.temperature, case.alpha, case.beta, case.ignore_index
    divergence_scale = (1.0 - alpha) * (temperature * temperature if case.t2_scale else 1.0)
    cross_entropy = LigerCrossEntropyLoss(ignore_index=ignore_index, label_smoothing=case.label_smoothing,
                                          reduction="mean")
    kl_sum = LigerKLDIVLoss(reduction="sum", log_target=True)
    jsd_parameters = inspect.signature(LigerJSD.__init__).parameters
    jsd = LigerJSD(beta=beta, ignore_index=ignore_index) if "ignore_index" in jsd_parameters else LigerJSD(beta=beta)
    jsd_takes_labels = len(inspect.signature(jsd.forward).parameters) >= 3

    def liger_kd_loss(student, teacher, labels):
        # Temperature softmax in PyTorch (upcast to float32 as in eager), divergence in Liger.
        # The divergence runs first: Liger's cross-entropy overwrites `student` with its gradient.
        student_log_probs = F.log_softmax(student.float() / temperature, dim=-1)
        teacher_log_probs = F.log_softmax(teacher.float() / temperature, dim=-1)
        valid_rows = (labels != ignore_index).nonzero().squeeze(1)
        valid_count = max(int(valid_rows.numel()), 1)
        if case.divergence == "forward_kl":
            # LigerKLDIVLoss(y_pred=log q, y_true=log p) = Σ p (log p − log q); it has no
            # ignore_index, so the valid rows are selected first.
            divergence = kl_sum(student_log_probs[valid_rows], teacher_log_probs[valid_rows]) / valid_count
        elif jsd_takes_labels:  # mean over rows whose label is not ignore_index
            divergence = jsd(student_log_probs, teacher_log_probs, labels)
        else:
            divergence = jsd(student_log_probs[valid_rows], teacher_log_probs[valid_rows])
        loss = divergence_scale * divergence.float()
        if alpha != 0:
            loss = loss + alpha * cross_entropy(student, labels).float()
        return loss

    return liger_kd_loss


def make_provider(name: str, case: Case) -> Provider:
    """Builds provider `name` for `case`.

    Args:
        name: one of PROVIDERS ("eager", "compile", "liger", "kdfast").
        case: the shape, dtype, device and loss hyper-parameters.

    Returns:
        The Provider.

    Raises:
        ProviderUnavailable: the provider does not apply to this case or machine.
        ValueError: unknown name.
    """
    kwargs = case.loss_kwargs()
    if name == "eager":
        return Provider(name, functools.partial(eager_kd_loss, **kwargs))
    if name == "compile":
        _raise_compile_limits()
        return Provider(name, torch.compile(functools.partial(eager_kd_loss, **kwargs), dynamic=False),
                        extra_warmup=1)
    if name == "kdfast":
        return Provider(name, functools.partial(functional.kd_loss, reduction="mean", **kwargs))
    if name == "kdfast-2pass":
        options = KDOptions.of(reduction="mean", **kwargs)

        def two_pass(student, teacher, labels):
            return kd_ops.kd_loss(student, teacher, labels, options, one_pass=False)
        return Provider(name, two_pass)
    if name == "kdfast-inplace":
        if case.device != "cpu":
            raise ProviderUnavailable("inplace_backward runs on the CPU only")
        return Provider(name, functools.partial(functional.kd_loss, reduction="mean", inplace_backward=True, **kwargs),
                        kind="inplace")
    if name == "add-out":
        return Provider(name, lambda student, teacher, out: torch.add(student, teacher, out=out), kind="floor")
    if name == "add-fresh":
        return Provider(name, lambda student, teacher, out: student + teacher, kind="floor")
    if name == "liger":
        return Provider(name, _make_liger_fn(case), mutates_student=True)
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def make_step(provider: Provider, pass_name: str, student: torch.Tensor, teacher: torch.Tensor,
              labels: torch.Tensor) -> Callable[[], object]:
    """A no-argument callable running one `pass_name` call of the provider on these inputs.

    fwd: the loss under torch.no_grad (returns the loss).
    fwd+bwd: the loss with a student that requires grad, then torch.autograd.grad of the
    scalar loss (returns (loss, student gradient); nothing accumulates into .grad).

    Args:
        provider: what to call.
        pass_name: "fwd" or "fwd+bwd".
        student, teacher, labels: the inputs (the student is copied when the provider mutates it).

    Returns:
        The step callable.
    """
    if provider.mutates_student:
        student = student.clone()
    student = student.detach()
    fn = provider.fn
    if provider.kind == "floor":
        if pass_name != "fwd+bwd":
            raise ProviderUnavailable(f"{provider.name} is a floor of fwd+bwd only")
        out = torch.empty_like(student)
        return lambda: fn(student, teacher, out)
    if provider.kind == "inplace" and pass_name == "fwd+bwd":
        # A non-leaf student (an lm_head output stands for it), made once: its storage takes
        # each call's gradient.
        student = student.clone().requires_grad_(True) * 1

        def inplace_step():
            loss = fn(student, teacher, labels)
            (gradient,) = torch.autograd.grad(loss, student)
            return loss, gradient
        return inplace_step
    if pass_name == "fwd":

        def forward_step():
            with torch.no_grad():
                return fn(student, teacher, labels)

        return forward_step
    if pass_name == "fwd+bwd":
        student.requires_grad_(True)

        def forward_backward_step():
            loss = fn(student, teacher, labels)
            (gradient,) = torch.autograd.grad(loss, student)
            return loss, gradient

        return forward_backward_step
    raise ValueError(f"unknown pass {pass_name!r}; expected one of {PASSES}")
