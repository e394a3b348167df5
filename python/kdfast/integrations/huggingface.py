"""Distil a Hugging Face causal language model into a smaller one with kdfast's fused loss.

Three entry points:
- `causal_lm_kd_loss(student_logits, teacher_logits, labels, ...)`: the next-token KD loss
  on `[B, L, V]` logits. Position i predicts label i+1 (the causal-LM shift that
  `transformers` models apply to their own loss), rows whose shifted label is -100 (padding,
  prompt tokens) are skipped, and the rest goes to `kdfast.functional.kd_loss`
  (α·CE + (1−α)·T²·D, mean over valid tokens). It needs only torch.
- `distillation_loss(student, teacher, batch, ...)`: runs both models on a batch (the
  teacher frozen, under `torch.no_grad()`) and returns `(loss, student_outputs)`; usable
  in any training loop.
- `DistillationTrainer`: a `transformers.Trainer` subclass whose `compute_loss` runs the
  frozen teacher on the same batch and returns `distillation_loss`'s loss. The Trainer
  itself needs `accelerate` (a dependency of `transformers.Trainer`, not of kdfast).
  It is built the first time the name is accessed, which imports `transformers`; when that
  package is missing the access raises an ImportError naming the install command
  (`INSTALL_HINT`: `pip install 'kdfast[hf]'` for a wheel from an index, the packages under
  the checkout's `constraints.txt` for a source install; `kdfast.contract.install`).
  With `lmbda` (or `seq_kd`) it distils on-policy (GKD): a batch is replaced, with probability
  `lmbda`, by the student's own completions of its `prompts` before the loss
  (`kdfast.onpolicy.OnPolicyDistiller` draws and generates; docs/onpolicy.md), and
  `divergence="generalized_jsd"` is GKD's divergence with TRL's `beta` convention.

A copy-paste recipe with both models loaded by `AutoModelForCausalLM` is in
docs/huggingface.md.

Teacher and student share the tokenizer, except with `DistillationTrainer(teacher_tokenizer=...)`
(cross-tokenizer KD through `kdfast.integrations.cross_tokenizer`). Their logits may differ in width only when
one model pads its embedding matrix; pass `vocab_size` (the tokenizer's real size) and both
are cut to it. With `fused=True` (`distillation_loss`, `DistillationTrainer`) neither model's
logits are materialised: both run their base model to the last hidden states, and
`kdfast.functional.fused_linear_kd_loss` computes the same loss from those and the two
lm_head weights chunk by chunk (for models whose logits are `lm_head(hidden)`, soft-capped
when the config sets `final_logit_softcapping`; a config that rescales logits with
`logit_scale` (Cohere) or `logits_scaling` (Granite) is refused with a message to use
`fused=False`, and other custom logit transforms are not detected).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import Tensor

from kdfast import functional
from kdfast.contract.install import install_hint
from kdfast.integrations.cross_tokenizer import CrossTokenizerCollator, cross_tokenizer_distillation_loss
from kdfast.onpolicy import (
    GenerationSettings,
    OnPolicyDistiller,
    divergence_options,
    fused_model_kd_loss,
    model_logits,
)

# DistillationTrainer needs transformers, so it is built on first access by the module-level __getattr__ below
__all__ = ["DistillationTrainer", "causal_lm_kd_loss", "distillation_loss", "fused_causal_lm_kd_loss",  # noqa: F822
           "require_transformers"]

INSTALL_HINT = install_hint("hf", ["transformers", "accelerate"])
# batch entries that hold the on-policy prompts, never model inputs
PROMPT_KEYS = ("prompts", "prompt_attention_mask")


def require_transformers():
    """Import and return the `transformers` module, or raise ImportError naming the install command."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"kdfast.integrations.huggingface needs Hugging Face transformers: {INSTALL_HINT}") from error
    return transformers


def causal_lm_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor],
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
    shift: bool = True,
    t2_scale: bool = True,
) -> Tensor:
    """Next-token distillation loss for causal language models.

    Args:
        student_logits: `[B, L, V_s]` float32/bfloat16/float16 logits of the student; receives
            the gradient.
        teacher_logits: `[B, L, V_t]` logits of the teacher on the same tokens (constant).
        labels: `[B, L]` int64 token ids with `ignore_index` at positions to skip (the
            format of `DataCollatorForLanguageModeling(mlm=False)`), or None, in which case
            every position is used and `alpha` must be 0.
        temperature: T > 0 (default 1.0).
        alpha: weight of the hard-label cross-entropy in [0, 1] (default 0.5).
        divergence: "forward_kl" (default), "reverse_kl", "jsd", "tvd", or "generalized_jsd"
            (GKD's, with TRL's convention for `beta` in [0, 1]: 0 = forward KL, 1 = reverse KL,
            between them "jsd"; `kdfast.onpolicy.gkd_divergence`).
        beta: JSD mixture weight in (0, 1), [0, 1] for "generalized_jsd" (default 0.5).
        label_smoothing: ε in [0, 1) for the cross-entropy term (default 0.0).
        ignore_index: label value of skipped positions (default -100).
        vocab_size: if given, both logits are cut to their first `vocab_size` entries
            (default None: V_s must equal V_t).
        shift: True (default) scores position i against label i+1 and drops the last
            position; False when the caller has already aligned logits and labels.
        t2_scale: scale the divergence by T² (default True; TRL's GKD loss has no such factor).

    Returns:
        float32 scalar: the mean over valid positions of α·CE + (1−α)·T²·D (`kd_loss`
        with reduction="mean"; 0 with zero gradient when no position is valid).

    Raises:
        ValueError: logits that are not 3-D, differing `[B, L]`, differing vocabularies
            without `vocab_size`, a `vocab_size` larger than either vocabulary, labels not
            `[B, L]`, plus the option errors of `kdfast.functional.kd_loss`.
        TypeError: labels that are not int64.
    """
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise ValueError(f"student_logits and teacher_logits must be [B, L, V], got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must share [B, L]")
    if vocab_size is not None:
        if vocab_size < 1 or vocab_size > min(student_logits.shape[-1], teacher_logits.shape[-1]):
            raise ValueError(f"vocab_size={vocab_size} must be in [1, min(V_student={student_logits.shape[-1]}, "
                             f"V_teacher={teacher_logits.shape[-1]})]")
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size]
    elif student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"student vocabulary {student_logits.shape[-1]} != teacher vocabulary "
                         f"{teacher_logits.shape[-1]}; the models must share a tokenizer (pass vocab_size when one "
                         "of them pads its embedding matrix)")
    if labels is not None:
        if labels.dtype != torch.int64:
            raise TypeError(f"labels must be int64, got {labels.dtype}")
        if tuple(labels.shape) != tuple(student_logits.shape[:2]):
            raise ValueError(f"labels {tuple(labels.shape)} must be [B, L] = {tuple(student_logits.shape[:2])}")
    if shift:
        student_logits = student_logits[:, :-1]
        teacher_logits = teacher_logits[:, :-1]
        labels = labels[:, 1:] if labels is not None else None
    divergence, beta = divergence_options(divergence, beta)
    return functional.kd_loss(
        student_logits, teacher_logits, labels, divergence=divergence, temperature=temperature, alpha=alpha,
        beta=beta, ignore_index=ignore_index, reduction="mean", label_smoothing=label_smoothing, t2_scale=t2_scale,
    )


def fused_causal_lm_kd_loss(student: torch.nn.Module, teacher: torch.nn.Module, inputs: dict, labels: Tensor, *,
                            temperature: float = 1.0, alpha: float = 0.5, divergence: str = "forward_kl",
                            beta: float = 0.5, label_smoothing: float = 0.0, ignore_index: int = -100,
                            vocab_size: Optional[int] = None, shift: bool = True, t2_scale: bool = True):
    """`causal_lm_kd_loss` of the two models' logits without materialising either of them
    (`kdfast.onpolicy.fused_model_kd_loss`).

    Returns `(loss, student_base_outputs)`; the student's base-model output has the hidden
    states but no logits.

    Raises:
        TypeError: a model without a base model and a Linear lm_head.
        ValueError: a model whose config scales its logits (`logit_scale`, `logits_scaling`),
            student and teacher with different soft-caps, plus `fused_linear_kd_loss`'s errors.
    """
    divergence, beta = divergence_options(divergence, beta)
    return fused_model_kd_loss(student, teacher, inputs, labels, shift=shift, vocab_size=vocab_size,
                               divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                               ignore_index=ignore_index, label_smoothing=label_smoothing, t2_scale=t2_scale)


def distillation_loss(student: torch.nn.Module, teacher: torch.nn.Module, batch: Any, *, fused: bool = False,
                      **options: Any):
    """KD loss of `student` against the frozen `teacher` on one causal-LM batch.

    Args:
        student: a causal LM called as `student(**inputs)`, returning logits `[B, L, V]`
            (a tensor, or an output with `.logits`).
        teacher: the same kind of model on the same tokenizer; run in eval mode under
            `torch.no_grad()`, moved to the student logits' device when it is elsewhere.
        batch: a mapping with `labels` `[B, L]` int64 (-100 = skip) and the models' keyword
            inputs (`input_ids`, `attention_mask`, ...); `prompts` and `prompt_attention_mask`
            (the on-policy prompts) are not passed to the models. It is not modified.
        fused: compute the loss from the models' last hidden states and lm_head weights with
            `fused_linear_kd_loss`, never materialising the logits (default False).
        **options: keyword options of `causal_lm_kd_loss` (temperature, alpha, divergence,
            beta, label_smoothing, ignore_index, vocab_size, shift, t2_scale).

    Returns:
        `(loss, student_outputs)`: the float32 scalar of `causal_lm_kd_loss` and the
        student's raw output (with `fused`, its base model's output: no logits).

    Raises:
        ValueError: a batch without `labels`, or `causal_lm_kd_loss`'s errors (with `fused`,
            `fused_causal_lm_kd_loss`'s).
        TypeError: a batch that is not a mapping.
    """
    if not hasattr(batch, "keys"):
        raise TypeError(f"batch must be a mapping of model inputs, got {type(batch).__name__}")
    inputs = {key: value for key, value in batch.items() if key not in PROMPT_KEYS}
    labels = inputs.pop("labels", None)
    if labels is None:
        raise ValueError("the batch needs 'labels' [B, L] (-100 at skipped positions); "
                         "DataCollatorForLanguageModeling(tokenizer, mlm=False) makes them")
    first, student_first = next(teacher.parameters(), None), next(student.parameters(), None)
    if first is not None and student_first is not None and first.device != student_first.device:
        teacher.to(student_first.device)
    teacher.eval()
    if fused:
        return fused_causal_lm_kd_loss(student, teacher, inputs, labels, **options)
    outputs = student(**inputs)
    student_logits = model_logits(outputs)
    if first is not None and next(teacher.parameters()).device != student_logits.device:
        teacher.to(student_logits.device)
    with torch.no_grad():
        teacher_logits = model_logits(teacher(**inputs))
    return causal_lm_kd_loss(student_logits, teacher_logits, labels, **options), outputs


_TRAINER_CLASS = None
# file beside the Trainer's rng_state*.pth in a checkpoint: the on-policy generator and counts
ON_POLICY_STATE = "kdfast_onpolicy_state.pt"


def _on_policy_helper(processing_class, lmbda, seq_kd, max_new_tokens, generation_temperature, top_p, top_k,
                      seed) -> Optional[OnPolicyDistiller]:
    """The trainer's `OnPolicyDistiller` (it draws sources and generates; the loss stays the trainer's), or None.

    The EOS id is the generating model's (`generation_config`); the pad id the processing class's, else the model's.
    """
    if lmbda is None and not seq_kd:
        return None
    generation = GenerationSettings(max_new_tokens=max_new_tokens, temperature=generation_temperature, top_p=top_p,
                                    top_k=top_k, pad_token_id=getattr(processing_class, "pad_token_id", None))
    return OnPolicyDistiller(lmbda=0.0 if lmbda is None else lmbda, seq_kd=seq_kd, generation=generation, seed=seed)


def _build_trainer_class():
    global _TRAINER_CLASS
    if _TRAINER_CLASS is not None:
        return _TRAINER_CLASS
    transformers = require_transformers()

    class DistillationTrainer(transformers.Trainer):
        """`transformers.Trainer` that distils `teacher_model` into the trained `model`.

        Args:
            teacher_model: a causal LM (`torch.nn.Module` returning logits `[B, L, V]`) that
                shares the student's tokenizer. It is put in eval mode with
                `requires_grad=False`, run under `torch.no_grad()` on every batch, and moved
                to the student's device on first use. It is not saved with the student.
            temperature: T > 0 (default 1.0).
            alpha: weight of the hard-label cross-entropy in [0, 1] (default 0.5).
            divergence: "forward_kl" (default), "reverse_kl", "jsd", "tvd" or "generalized_jsd"
                (GKD's, β in [0, 1] with TRL's convention: 0 = forward KL, 1 = reverse KL).
            beta: JSD mixture weight (default 0.5).
            label_smoothing: ε for the cross-entropy term (default 0.0).
            vocab_size: cut both logits to this many entries (default None: they must match).
            fused: never materialise either model's logits (`fused_linear_kd_loss` on the last
                hidden states and lm_head weights; default False).
            t2_scale: scale the divergence by T² (default True; TRL's GKD loss: False).
            lmbda: on-policy distillation: the probability in [0, 1] that a training batch is
                replaced by the student's own completions of its `prompts` (default None: off,
                every batch is used as it is).
            seq_kd: when the student does not generate, the teacher does (sequence-level KD;
                default False).
            max_new_tokens, generation_temperature, top_p, top_k: sampling settings of those
                completions (defaults 128, 1.0, 1.0, 0; temperature 0 = greedy). EOS and pad ids
                come from the student's `generation_config` and the processing class.
            on_policy_seed: seed of the generator that draws the batch sources and the sampling
                seeds (default None: `args.seed`); its state is saved with each checkpoint and
                restored on resume.
            teacher_tokenizer: a fast tokenizer of the teacher when it differs from the
                student's (cross-tokenizer KD; default None: one shared tokenizer). Batches are
                then texts, tokenized by both (`CrossTokenizerCollator`, the default
                data_collator when `processing_class` is the student's fast tokenizer; keep the
                text column with `TrainingArguments(remove_unused_columns=False)`), and the loss
                is α·CE + (1 − α)·ULD over byte-aligned span predictions
                (`cross_tokenizer_distillation_loss`, docs/cross_tokenizer.md). Not combined
                with `fused`, `lmbda` or `seq_kd`; `divergence`, `beta`, `label_smoothing`,
                `vocab_size` and `t2_scale` do not apply.
            uld_k: top-k form of that ULD loss (default None: exact).
            max_length: tokens kept per text on each side by that collator (default 512).
            *args, **kwargs: passed to `transformers.Trainer` (model, args, datasets,
                data_collator, ...).

        Batches must carry `labels` `[B, L]` (e.g. from
        `DataCollatorForLanguageModeling(tokenizer, mlm=False)`); the other entries are the
        keyword arguments of both models, except `prompts` `[B, P]` and
        `prompt_attention_mask`, which on-policy training reads (left-padded prompts, as TRL's
        GKD collator makes them). A generated batch replaces the whole batch by its
        `input_ids`, `attention_mask` and `labels`, and trains on its completion tokens only
        (prompt, padding and tokens after the first EOS have label -100). `compute_loss`
        returns the mean loss over the micro-batch's valid tokens, and the Trainer divides it
        by the gradient-accumulation steps, so an optimizer step uses the mean of its
        micro-batch means.
        """

        # compute_loss returns a per-micro-batch mean: let Trainer scale it for accumulation.
        loss_is_scaled_for_ga = False

        def __init__(self, *args: Any, teacher_model: torch.nn.Module, temperature: float = 1.0,
                     alpha: float = 0.5, divergence: str = "forward_kl", beta: float = 0.5,
                     label_smoothing: float = 0.0, vocab_size: Optional[int] = None, fused: bool = False,
                     t2_scale: bool = True, lmbda: Optional[float] = None, seq_kd: bool = False,
                     max_new_tokens: int = 128, generation_temperature: float = 1.0, top_p: float = 1.0,
                     top_k: int = 0, on_policy_seed: Optional[int] = None, teacher_tokenizer: Any = None,
                     uld_k: Optional[int] = None, max_length: int = 512, **kwargs: Any) -> None:
            if not isinstance(teacher_model, torch.nn.Module):
                raise TypeError(f"teacher_model must be a torch.nn.Module, got {type(teacher_model).__name__}")
            if not (float(temperature) > 0):
                raise ValueError(f"temperature must be > 0, got {temperature}")
            if not 0.0 <= float(alpha) <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {alpha}")
            if lmbda is not None and not 0.0 <= float(lmbda) <= 1.0:
                raise ValueError(f"lmbda must be in [0, 1] or None, got {lmbda}")
            divergence_options(divergence, beta)  # checks a generalized JSD's beta
            model = kwargs.get("model", args[0] if args else None)
            if teacher_model is model:
                raise ValueError("teacher_model must be a different module from the student model")
            GenerationSettings(max_new_tokens=max_new_tokens, temperature=generation_temperature, top_p=top_p,
                               top_k=top_k)  # checks the sampling settings before the Trainer is built
            if teacher_tokenizer is not None:
                if fused or lmbda is not None or seq_kd:
                    raise ValueError("teacher_tokenizer (cross-tokenizer KD) does not combine with fused, lmbda or "
                                     "seq_kd")
                if uld_k is not None and int(uld_k) < 1:
                    raise ValueError(f"uld_k must be >= 1 or None, got {uld_k}")
                student_tokenizer = kwargs.get("processing_class", kwargs.get("tokenizer"))
                if kwargs.get("data_collator") is None:
                    if student_tokenizer is None:
                        raise ValueError("teacher_tokenizer needs the student's tokenizer as processing_class (or "
                                         "a data_collator making CrossTokenizerCollator batches)")
                    kwargs["data_collator"] = CrossTokenizerCollator(student_tokenizer, teacher_tokenizer, max_length)
            super().__init__(*args, **kwargs)
            # Older Trainer versions decide loss scaling from this flag instead of loss_is_scaled_for_ga.
            self.model_accepts_loss_kwargs = False
            self.teacher_model = teacher_model.eval().requires_grad_(False)
            self.kd_options = dict(temperature=float(temperature), alpha=float(alpha), divergence=divergence,
                                   beta=float(beta), label_smoothing=float(label_smoothing), vocab_size=vocab_size,
                                   fused=bool(fused), t2_scale=bool(t2_scale))
            seed = self.args.seed if on_policy_seed is None else on_policy_seed
            self.teacher_tokenizer, self.uld_k = teacher_tokenizer, uld_k
            self.on_policy = _on_policy_helper(getattr(self, "processing_class", None), lmbda, seq_kd, max_new_tokens,
                                               generation_temperature, top_p, top_k, seed)

        def training_step(self, model, inputs, num_items_in_batch=None):
            """With on-policy options, first replace the batch by generated completions (see the class docstring)."""
            if self.on_policy is not None:
                inputs = self._prepare_inputs(inputs)  # on the model's device before generating
                student = self.accelerator.unwrap_model(model)
                device = next(student.parameters()).device
                if next(self.teacher_model.parameters(), torch.empty(0, device=device)).device != device:
                    self.teacher_model.to(device)
                prepared, source = self.on_policy.prepare(student, self.teacher_model, inputs)
                if source != "data":  # a generated batch: its own input_ids, attention_mask and labels only
                    inputs = prepared
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
            """`distillation_loss(model, teacher_model, inputs)`; `num_items_in_batch` is unused
            (the loss is a per-micro-batch mean, see the class docstring)."""
            if self.teacher_tokenizer is not None:
                loss, outputs = cross_tokenizer_distillation_loss(
                    model, self.teacher_model, inputs, temperature=self.kd_options["temperature"],
                    alpha=self.kd_options["alpha"], k=self.uld_k)
            else:
                loss, outputs = distillation_loss(model, self.teacher_model, inputs, **self.kd_options)
            return (loss, outputs) if return_outputs else loss

        def _save_rng_state(self, output_dir):
            super()._save_rng_state(output_dir)
            if self.on_policy is not None and self.args.should_save:
                torch.save(self.on_policy.state_dict(), os.path.join(output_dir, ON_POLICY_STATE))

        def _load_rng_state(self, checkpoint):
            super()._load_rng_state(checkpoint)
            path = os.path.join(checkpoint, ON_POLICY_STATE) if checkpoint is not None else None
            if self.on_policy is not None and path is not None and os.path.isfile(path):
                self.on_policy.load_state_dict(torch.load(path, weights_only=True))

    _TRAINER_CLASS = DistillationTrainer
    return DistillationTrainer


def __getattr__(name: str):
    if name == "DistillationTrainer":
        return _build_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
