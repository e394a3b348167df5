"""Data-free adversarial distillation: a generator of inputs on which teacher and student disagree.

Fang et al., "Data-Free Adversarial Distillation" (DFAD, 2019): a generator G maps noise
z ~ N(0, I) to inputs x = G(z); G *maximises* a teacher–student discrepancy D(S(x), T(x))
while the student S *minimises* it, so the student learns the teacher's function where it
is least like it, without the original training data. The two play

    generator:  L_G = −D(S(G(z)), T(G(z))) + λ_BN·R_BN + λ_bal·R_bal     (one step of G's optimiser)
    student:    L_S =  D(S(G(z)), T(G(z)))   with G(z) detached          (steps of the student's)

D is `"l1"`, the mean absolute logit difference of DFAD, or a kdfast divergence
(`"forward_kl"`, `"reverse_kl"`, `"jsd"`, `"tvd"`) at temperature T through the fused
`kdfast.functional.kd_loss` (T² scaled). For L_G the divergence is differentiated through
both the student's and the teacher's logits (the fused op treats its teacher argument as a
constant, so the teacher side is added with the arguments swapped: KL(p‖q) is the reverse KL
of the swapped pair, JSD_β the JSD_{1−β} and TVD itself). The optional stabilisers are
R_BN, the batch-norm statistics prior of Yin et al., "Dreaming to Distill" (DeepInversion,
CVPR 2020): Σ over the teacher's BatchNorm layers of ‖μ_batch − μ_running‖₂ + ‖σ²_batch −
σ²_running‖₂, recorded by forward hooks on the teacher while G steps; and R_bal, the
information-entropy term of Chen et al., "Data-Free Learning of Student Networks" (DAFL, ICCV
2019): log V − H(mean teacher softmax over the batch), which keeps G from producing one class.

`DataFreeKD` holds G, its optimiser (and optional scheduler) and the hooks; a trainer
(`kdfast.trainer.DataFreeDistiller`) alternates `generator_step` and steps on
`student_loss`. Called like every registry method, `method(student_logits,
teacher_logits, labels=None)` returns α·CE + (1−α)·D on real data (D alone without labels),
so `Distiller.evaluate` reports it. Build it with `kdfast.methods.build_method("data_free",
...)`; `Generator` is the default G. Options are checked at construction.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from kdfast.contract.validation import require_choice, require_float_tensor, require_non_negative, require_positive
from kdfast.functional import kd_loss

__all__ = ["DISCREPANCIES", "Generator", "BatchNormPrior", "DataFreeKD", "build_data_free"]

DISCREPANCIES = ("l1", "forward_kl", "reverse_kl", "jsd", "tvd")
_SWAPPED = {"forward_kl": "reverse_kl", "reverse_kl": "forward_kl", "jsd": "jsd", "tvd": "tvd"}
_ACTIVATIONS = ("tanh", "sigmoid", "none")
_JSD_BETA = 0.5


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class Generator(nn.Module):
    """The default generator: noise `[N, latent_dim]` → inputs `[N, *output_shape]` (float32).

    For an image shape `(C, H, W)` (the DFAD architecture): Linear(latent_dim, 2w·⌈H/4⌉·⌈W/4⌉)
    → reshape → BatchNorm2d → upsample to ⌈H/2⌉×⌈W/2⌉ → Conv3×3(2w→2w), BN, LeakyReLU(0.2) →
    upsample to H×W → Conv3×3(2w→w), BN, LeakyReLU(0.2) → Conv3×3(w→C) → activation. For a
    feature shape `(D,)`: two blocks Linear, BatchNorm1d, LeakyReLU(0.2) of width w, then
    Linear(w, D) → activation. For `(C, L)` sequences: as images with H = 1 (1-D convolutions).

    Args:
        latent_dim: width of z (≥ 1).
        output_shape: one input without the batch axis: `(D,)`, `(C, L)` or `(C, H, W)`.
        width: w, the channel / hidden width (default 64).
        activation: "tanh" (outputs in (−1, 1), default), "sigmoid" ((0, 1), e.g. pixel
            intensities) or "none".
    """

    def __init__(self, latent_dim: int, output_shape: Sequence[int], width: int = 64,
                 activation: str = "tanh") -> None:
        super().__init__()
        self.latent_dim = _positive_int("latent_dim", latent_dim)
        width = _positive_int("width", width)
        if isinstance(output_shape, int) or not 1 <= len(tuple(output_shape)) <= 3:
            raise ValueError(f"output_shape must be (D,), (C, L) or (C, H, W), got {output_shape!r}")
        self.output_shape = tuple(_positive_int("output_shape entries", size) for size in output_shape)
        self.activation = require_choice("activation", activation, _ACTIVATIONS)
        if len(self.output_shape) == 1:
            self.body = nn.Sequential(
                nn.Linear(latent_dim, width), nn.BatchNorm1d(width), nn.LeakyReLU(0.2),
                nn.Linear(width, width), nn.BatchNorm1d(width), nn.LeakyReLU(0.2),
                nn.Linear(width, self.output_shape[0]))
            return
        channels, *spatial = self.output_shape
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if len(spatial) == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self._start = tuple(math.ceil(size / 4) for size in spatial)
        self._middle = tuple(math.ceil(size / 2) for size in spatial)
        self.project = nn.Linear(latent_dim, 2 * width * math.prod(self._start))
        self.norm = norm(2 * width)
        self.block1 = nn.Sequential(conv(2 * width, 2 * width, 3, padding=1), norm(2 * width), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(conv(2 * width, width, 3, padding=1), norm(width), nn.LeakyReLU(0.2),
                                    conv(width, channels, 3, padding=1))

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        require_float_tensor("noise", noise)
        if noise.dim() != 2 or noise.shape[1] != self.latent_dim:
            raise ValueError(f"Generator expects noise [N, {self.latent_dim}], got {tuple(noise.shape)}")
        if len(self.output_shape) == 1:
            out = self.body(noise)
        else:
            out = self.norm(self.project(noise).view(noise.shape[0], -1, *self._start))
            out = self.block1(F.interpolate(out, size=self._middle, mode="nearest"))
            out = self.block2(F.interpolate(out, size=tuple(self.output_shape[1:]), mode="nearest"))
        if self.activation == "tanh":
            return torch.tanh(out)
        return torch.sigmoid(out) if self.activation == "sigmoid" else out


class BatchNormPrior:
    """Forward hooks on a model's BatchNorm layers that score how far a batch's feature
    statistics are from the layers' running statistics (the DeepInversion prior).

    While `active` is True each hooked layer adds ‖μ − μ_run‖₂ + ‖σ² − σ²_run‖₂ to `loss`,
    with μ, σ² the per-channel mean and biased variance of the layer's input `[N, C, *]`
    over every axis but C (in float32, differentiable in the input). Outside `active` the
    hooks do nothing. `remove()` unregisters them.

    Raises:
        ValueError: the model has no BatchNorm layer with running statistics.
    """

    def __init__(self, model: nn.Module) -> None:
        layers = [module for module in model.modules()
                  if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None]
        if not layers:
            raise ValueError("the batch-norm prior needs a teacher with BatchNorm layers that track running "
                             "statistics; this teacher has none (set bn_weight=0)")
        self.layers = layers
        self.active = False
        self.loss: Optional[torch.Tensor] = None
        self._handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: Any) -> None:
        if not self.active:
            return
        features = inputs[0].float()
        axes = [0] + list(range(2, features.dim()))
        mean = features.mean(dim=axes)
        variance = features.var(dim=axes, unbiased=False)
        term = (torch.linalg.vector_norm(mean - module.running_mean.float())
                + torch.linalg.vector_norm(variance - module.running_var.float()))
        self.loss = term if self.loss is None else self.loss + term

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _logits(output: Any) -> torch.Tensor:
    """A model's logits: a tensor, a `logits` entry/attribute or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"a model returned {type(output).__name__}; expected logits [N, V]")


class DataFreeKD(nn.Module):
    """The data-free adversarial method: generator, its optimiser and the two losses.

    Args:
        generator: G, a module `[N, latent_dim]` → model inputs `[N, ...]` (e.g. `Generator`).
        latent_dim: width of the noise G reads (≥ 1).
        discrepancy: D, one of `DISCREPANCIES` (default "l1", as in DFAD).
        temperature: T > 0 of the divergences (default 1.0; "l1" ignores it).
        alpha: α ∈ [0, 1], the hard-label cross-entropy weight in labelled calls (default 0.0).
        teacher: the teacher, required when `bn_weight` > 0 (its BatchNorm layers get hooks).
        bn_weight: λ_BN ≥ 0 of the batch-norm prior (default 0.0: off).
        balance_weight: λ_bal ≥ 0 of the class-balance term (default 0.0: off).
        optimizer: G's optimiser (default Adam(lr, betas=(0.5, 0.999)) over G's parameters).
        lr: G's Adam learning rate when `optimizer` is None (default 1e-3).
        scheduler: a callable `optimizer → LR scheduler` for G, stepped after each G step
            (default None).
        ignore_index: label value left out of labelled calls (default -100).

    Attributes:
        name: "data_free". generator, optimizer, scheduler (G's; None without one),
        bn_prior (a `BatchNormPrior` or None). needs_teacher_forward: False; hint,
        adversary: None (the `DistillationMethod` parts this method has none of).
    """

    name = "data_free"
    needs_teacher_forward = False
    hint = None
    adversary = None

    def __init__(self, generator: nn.Module, latent_dim: int, *, discrepancy: str = "l1", temperature: float = 1.0,
                 alpha: float = 0.0, teacher: Optional[nn.Module] = None, bn_weight: float = 0.0,
                 balance_weight: float = 0.0, optimizer: Optional[torch.optim.Optimizer] = None, lr: float = 1e-3,
                 scheduler: Optional[Callable[[torch.optim.Optimizer], Any]] = None,
                 ignore_index: int = -100) -> None:
        super().__init__()
        if not isinstance(generator, nn.Module):
            raise TypeError(f"generator must be a torch.nn.Module, got {type(generator).__name__}")
        self.discrepancy_name = require_choice("discrepancy", discrepancy, DISCREPANCIES)
        self.latent_dim = _positive_int("latent_dim", latent_dim)
        self.temperature = require_positive("temperature", temperature)
        self.alpha = require_non_negative("alpha", alpha)
        if self.alpha > 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.bn_weight = require_non_negative("bn_weight", bn_weight)
        self.balance_weight = require_non_negative("balance_weight", balance_weight)
        self.weight = 0.0
        self.ignore_index = int(ignore_index)
        if not math.isfinite(self.bn_weight + self.balance_weight + self.temperature):
            raise ValueError("temperature, bn_weight and balance_weight must be finite")
        self.generator = generator
        if optimizer is None:
            optimizer = torch.optim.Adam(generator.parameters(), lr=require_positive("lr", lr), betas=(0.5, 0.999))
        elif not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.scheduler = scheduler(optimizer) if scheduler is not None else None
        self.bn_prior: Optional[BatchNormPrior] = None
        if self.bn_weight > 0:
            if not isinstance(teacher, nn.Module):
                raise ValueError("bn_weight > 0 needs the teacher (its BatchNorm layers' running statistics)")
            self.bn_prior = BatchNormPrior(teacher)

    # ------------------------------------------------------------------ pieces
    def remove(self) -> None:
        """Remove the batch-norm hooks from the teacher (no-op without them)."""
        if self.bn_prior is not None:
            self.bn_prior.remove()

    def __enter__(self) -> "DataFreeKD":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def trainable_parameters(self) -> List[nn.Parameter]:
        """Empty: G has its own optimiser, so nothing joins the student's."""
        return []

    def sample(self, batch_size: int) -> torch.Tensor:
        """x = G(z) for z ~ N(0, I) `[batch_size, latent_dim]` drawn from torch's global generator,
        on G's device; with G's graph (detach for the student's step)."""
        parameter = next(self.generator.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        noise = torch.randn(_positive_int("batch_size", batch_size), self.latent_dim, device=device)
        return self.generator(noise)

    def discrepancy(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """D(s, t), a 0-dim float32 mean over rows, differentiable in both logits `[..., V]`."""
        require_float_tensor("student_logits", student_logits)
        require_float_tensor("teacher_logits", teacher_logits)
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student and teacher logits must have the same shape, got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
        if self.discrepancy_name == "l1":
            return (student_logits.float() - teacher_logits.float()).abs().mean()
        options = dict(temperature=self.temperature, beta=_JSD_BETA)
        student_side = kd_loss(student_logits, teacher_logits.detach(), divergence=self.discrepancy_name, **options)
        if not teacher_logits.requires_grad:
            return student_side
        # The same value with the arguments swapped: its gradient is the teacher side's.
        teacher_side = kd_loss(teacher_logits, student_logits.detach(), divergence=_SWAPPED[self.discrepancy_name],
                               **options)
        return student_side + (teacher_side - teacher_side.detach())

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """α·CE(s, y) + (1 − α)·D(s, t) over rows whose label is not `ignore_index`; D alone
        when `labels` is None. Logits `[..., V]`, labels int64 `[...]`; a 0-dim float32 loss."""
        teacher_logits = teacher_logits.detach()
        if labels is None:
            return self.discrepancy(student_logits, teacher_logits)
        vocab = student_logits.shape[-1]
        rows, flat_labels = student_logits.reshape(-1, vocab), labels.reshape(-1)
        valid = flat_labels != self.ignore_index
        if self.discrepancy_name == "l1":
            per_row = (rows.float() - teacher_logits.reshape(-1, vocab).float()).abs().mean(-1)
            term = torch.where(valid, per_row, per_row.new_zeros(())).sum() / valid.sum().clamp_min(1)
        else:
            term = kd_loss(student_logits, teacher_logits, labels, divergence=self.discrepancy_name,
                           temperature=self.temperature, beta=_JSD_BETA, ignore_index=self.ignore_index)
        if self.alpha == 0:
            return term
        cross_entropy = F.cross_entropy(rows.float(), flat_labels, ignore_index=self.ignore_index,
                                        reduction="sum") / valid.sum().clamp_min(1)
        return self.alpha * cross_entropy + (1 - self.alpha) * term

    # ------------------------------------------------------------------ the game
    def generator_loss(self, student: nn.Module, teacher: nn.Module, batch_size: int) -> Dict[str, torch.Tensor]:
        """L_G on a fresh batch x = G(z): returns {"loss", "discrepancy", "bn", "balance"}
        (0-dim tensors; "loss" carries G's graph). The models' parameters get no gradient."""
        inputs = self.sample(batch_size)
        frozen = [p for model in (student, teacher) for p in model.parameters() if p.requires_grad]
        for parameter in frozen:
            parameter.requires_grad_(False)
        if self.bn_prior is not None:
            self.bn_prior.active, self.bn_prior.loss = True, None
        try:
            teacher_logits = _logits(teacher(inputs))
            student_logits = _logits(student(inputs))
        finally:
            for parameter in frozen:
                parameter.requires_grad_(True)
            if self.bn_prior is not None:
                self.bn_prior.active = False
        discrepancy = self.discrepancy(student_logits, teacher_logits)
        zero = discrepancy.new_zeros(())
        bn = self.bn_prior.loss if self.bn_prior is not None and self.bn_prior.loss is not None else zero
        if self.bn_prior is not None:
            self.bn_prior.loss = None
        balance = zero
        if self.balance_weight > 0:
            mean_probability = F.softmax(teacher_logits.float().reshape(-1, teacher_logits.shape[-1]), -1).mean(0)
            entropy = -(mean_probability * mean_probability.clamp_min(1e-12).log()).sum()
            balance = math.log(teacher_logits.shape[-1]) - entropy
        loss = -discrepancy + self.bn_weight * bn + self.balance_weight * balance
        return {"loss": loss, "discrepancy": discrepancy.detach(), "bn": bn.detach(), "balance": balance.detach()}

    def generator_step(self, student: nn.Module, teacher: nn.Module, batch_size: int,
                       max_grad_norm: Optional[float] = None) -> Dict[str, float]:
        """One step of G's optimiser on L_G (then of G's scheduler, if any).

        The teacher runs as it is (keep it in eval mode, so its running statistics are the
        prior's reference); gradients reach G only. `max_grad_norm` clips G's gradient norm.
        Returns the terms before the step as Python floats.
        """
        self.generator.train()
        terms = self.generator_loss(student, teacher, batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return {name: float(value.detach()) for name, value in terms.items()}

    def student_loss(self, student: nn.Module, teacher: nn.Module, batch_size: int) -> torch.Tensor:
        """L_S = D(S(x), T(x)) on a fresh batch x = G(z) (G detached, teacher without grad):
        a 0-dim float32 loss whose gradient reaches the student only."""
        with torch.no_grad():
            self.generator.train()
            inputs = self.sample(batch_size)
            teacher_logits = _logits(teacher(inputs))
        return self.discrepancy(_logits(student(inputs)), teacher_logits)

    def extra_repr(self) -> str:
        return (f"discrepancy={self.discrepancy_name!r}, latent_dim={self.latent_dim}, temperature={self.temperature}, "
                f"alpha={self.alpha}, bn_weight={self.bn_weight}, balance_weight={self.balance_weight}")


_OPTIONS = ("discrepancy", "bn_weight", "balance_weight", "latent_dim", "output_shape", "generator",
            "generator_width", "activation", "generator_lr", "generator_optimizer", "generator_scheduler")


def build_data_free(*, temperature: float, alpha: float, weight: Optional[float], teacher: Optional[nn.Module],
                    example_inputs: Any, ignore_index: int, **options: Any) -> DataFreeKD:
    """`build_method("data_free", ...)`: a `DataFreeKD` from the registry's arguments and options.

    Options (all optional): discrepancy ("l1"), bn_weight (0.0), balance_weight (0.0),
    latent_dim (64), output_shape (default: `example_inputs.shape[1:]`), generator (default a
    `Generator(latent_dim, output_shape, generator_width, activation)`), generator_width (64),
    activation ("tanh"), generator_lr (1e-3), generator_optimizer, generator_scheduler (a
    callable optimizer → scheduler). `weight` must be None or 0: the method has no β term.

    Raises:
        TypeError: an unknown option (the message lists the valid ones).
        ValueError: a bad value, or neither `output_shape` nor float `example_inputs` with
            a default generator.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"method 'data_free' got unknown options {unknown}; valid options: {', '.join(_OPTIONS)}")
    if weight:
        raise ValueError(f"method 'data_free' has no β term (weight={weight!r}); weigh its generator's priors "
                         f"with bn_weight and balance_weight")
    latent_dim = options.get("latent_dim", 64)
    generator = options.get("generator")
    if generator is None:
        shape = options.get("output_shape")
        if shape is None:
            if not isinstance(example_inputs, torch.Tensor) or not example_inputs.is_floating_point() \
                    or example_inputs.dim() < 2:
                raise ValueError("method 'data_free' needs output_shape, or float example_inputs [N, ...] to take "
                                 "it from, for its default generator (or pass generator=...)")
            shape = tuple(example_inputs.shape[1:])
        generator = Generator(latent_dim, shape, width=options.get("generator_width", 64),
                              activation=options.get("activation", "tanh"))
    return DataFreeKD(generator, latent_dim, discrepancy=options.get("discrepancy", "l1"), temperature=temperature,
                      alpha=alpha, teacher=teacher, bn_weight=options.get("bn_weight", 0.0),
                      balance_weight=options.get("balance_weight", 0.0), optimizer=options.get("generator_optimizer"),
                      lr=options.get("generator_lr", 1e-3), scheduler=options.get("generator_scheduler"),
                      ignore_index=ignore_index)
