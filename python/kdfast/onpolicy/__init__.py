"""On-policy knowledge distillation (GKD) and hidden-state teachers for causal language models.

- `OnPolicyDistiller`: per batch, with probability `lmbda` the student samples completions of
  the prompts (else the teacher with `seq_kd`, else the data batch is used), and the loss is
  GKD's generalized JSD over the completion tokens, by default from both models' hidden
  states and lm_head weights without building logits. Deterministic under its seed.
- `GenerationSettings`, `generate`, `sample`, `settings_for`, `completion_batch`: sampling (Hugging Face
  `generate`, or a built-in sampler for plain modules returning logits) and TRL's completion
  masking.
- `gkd_divergence`, `divergence_options`, `completion_kd_loss`, `fused_model_kd_loss`: the
  loss, from logits or fused.
- `model_logits`, `hidden_and_head`: what is read from a model.

Guide: docs/onpolicy.md. Needs torch only; `kdfast.integrations.huggingface.DistillationTrainer`
builds on it.
"""

from kdfast.onpolicy.distiller import SOURCES, OnPolicyDistiller
from kdfast.onpolicy.generation import (
    GenerationSettings,
    completion_batch,
    filter_logits,
    generate,
    sample,
    settings_for,
)
from kdfast.onpolicy.loss import (
    GENERALIZED_JSD,
    completion_kd_loss,
    divergence_options,
    fused_model_kd_loss,
    gkd_divergence,
)
from kdfast.onpolicy.models import hidden_and_head, model_logits

__all__ = [
    "GENERALIZED_JSD",
    "GenerationSettings",
    "OnPolicyDistiller",
    "SOURCES",
    "completion_batch",
    "completion_kd_loss",
    "divergence_options",
    "filter_logits",
    "fused_model_kd_loss",
    "generate",
    "gkd_divergence",
    "hidden_and_head",
    "model_logits",
    "sample",
    "settings_for",
]
