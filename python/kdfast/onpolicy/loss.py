"""The generalized JSD of GKD (Agarwal et al. 2024) on causal-LM batches, from logits or fused.

`gkd_divergence(beta)` maps GKD's β onto kdfast's divergences with TRL's convention
(`GKDTrainer.generalized_jsd_loss`, trl 1.16): β = 0 is the forward KL(p‖q), β = 1 the
reverse KL(q‖p), and 0 < β < 1 is β·KL(p‖m) + (1−β)·KL(q‖m) with m = βp + (1−β)q, which is
kdfast's `jsd` with the same β (p the teacher's softmax(t/T), q the student's softmax(s/T)).
`divergence_options(divergence, beta)` resolves the name "generalized_jsd" to that pair and
passes any other divergence through.

`completion_kd_loss` (from `[B, L, V]` logits) and `fused_model_kd_loss` (from two models,
through their last hidden states and lm_head weights, never building `[B, L, V]` logits) give
the next-token loss: position i is scored against label i+1, rows labelled `ignore_index`
count nothing, α·CE + (1−α)·τ·D with τ = T² only when `t2_scale` is True, mean over the kept
rows (0 with a zero gradient when none is kept, as TRL's clamped count). With α = 0 and
t2_scale False this is TRL's loss with reduction "batchmean" and labels.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from kdfast import functional
from kdfast.onpolicy.models import hidden_and_head

__all__ = ["GENERALIZED_JSD", "completion_kd_loss", "divergence_options", "fused_model_kd_loss", "gkd_divergence"]

GENERALIZED_JSD = "generalized_jsd"


def gkd_divergence(beta: float) -> Dict[str, Any]:
    """kdfast loss options for GKD's generalized JSD with weight `beta` in [0, 1] (TRL's convention).

    Returns:
        {"divergence": "forward_kl"} for β = 0, {"divergence": "reverse_kl"} for β = 1, else
        {"divergence": "jsd", "beta": β}.

    Raises:
        ValueError: β outside [0, 1].
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"the generalized JSD's beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    if beta == 0.0:
        return {"divergence": "forward_kl"}
    if beta == 1.0:
        return {"divergence": "reverse_kl"}
    return {"divergence": "jsd", "beta": beta}


def divergence_options(divergence: str, beta: float) -> Tuple[str, float]:
    """(divergence, beta) for kdfast's losses: "generalized_jsd" resolved by `gkd_divergence`, others unchanged."""
    if divergence != GENERALIZED_JSD:
        return divergence, beta
    options = gkd_divergence(beta)
    return options["divergence"], options.get("beta", 0.5)


def completion_kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, beta: float = 0.5,
                       temperature: float = 1.0, alpha: float = 0.0, t2_scale: bool = False,
                       ignore_index: int = -100, shift: bool = True) -> Tensor:
    """GKD's generalized JSD (plus optional CE) of next-token logits over the labelled positions.

    Args:
        student_logits: `[B, L, V]` float32/bfloat16/float16; receives the gradient.
        teacher_logits: `[B, L, V]`, a constant.
        labels: `[B, L]` int64 aligned with the inputs (`completion_batch`'s labels), `ignore_index`
            where no loss is taken.
        beta: the generalized JSD's β in [0, 1] (default 0.5; 0 = forward KL, 1 = reverse KL).
        temperature: T > 0 of both softmaxes (default 1.0).
        alpha: weight of the cross-entropy on the labels (default 0: the divergence only).
        t2_scale: multiply the divergence by T² (default False, as TRL).
        ignore_index: label of skipped positions (default −100).
        shift: score position i against label i+1 (default True).

    Returns:
        float32 scalar: the mean over kept positions of α·CE + (1−α)·τ·D.
    """
    if shift:
        student_logits, teacher_logits, labels = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
    return functional.kd_loss(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
                              t2_scale=t2_scale, ignore_index=ignore_index, reduction="mean", **gkd_divergence(beta))


def fused_model_kd_loss(student: torch.nn.Module, teacher: torch.nn.Module, inputs: dict, labels: Tensor, *,
                        shift: bool = True, vocab_size: Optional[int] = None, **options: Any):
    """The next-token KD loss of two causal LMs from their last hidden states and lm_head weights.

    Neither model's `[B, L, V]` logits are built: the student's hidden states and lm_head
    weight and the teacher's (run under `torch.no_grad()`) go to
    `kdfast.functional.fused_linear_kd_loss`, which computes both models' logits chunk by
    chunk. A soft-capped model (`final_logit_softcapping`) caps the student in the chunks; the
    teacher's capped logits are then materialised, since the fused loss caps the student only.

    Args:
        student, teacher: models `hidden_and_head` accepts (base model + Linear lm_head).
        inputs: keyword inputs of both base models (`input_ids`, `attention_mask`, ...).
        labels: `[B, L]` int64, `ignore_index` where no loss is taken.
        shift: score position i against label i+1 (default True).
        vocab_size: cut both lm_heads to their first `vocab_size` rows (default None).
        **options: `fused_linear_kd_loss` options (divergence, beta, temperature, alpha,
            t2_scale, label_smoothing, ignore_index); the reduction is "mean".

    Returns:
        `(loss, student_base_output)`: the float32 scalar and the student's base-model output.

    Raises:
        TypeError / ValueError: `hidden_and_head`'s errors, student and teacher soft-caps that
            differ, and `fused_linear_kd_loss`'s errors.
    """
    hidden, weight, bias, softcap, outputs = hidden_and_head(student, inputs)
    with torch.no_grad():
        teacher_hidden, teacher_weight, teacher_bias, teacher_softcap, _ = hidden_and_head(teacher, inputs)
    if teacher_softcap != softcap:
        raise ValueError(f"fused=True: student softcap {softcap} and teacher softcap {teacher_softcap} differ; "
                         "use fused=False")
    if vocab_size is not None:
        weight, teacher_weight = weight[:vocab_size], teacher_weight[:vocab_size]
        bias = bias[:vocab_size] if bias is not None else None
        teacher_bias = teacher_bias[:vocab_size] if teacher_bias is not None else None
    if shift:
        hidden, teacher_hidden, labels = hidden[:, :-1], teacher_hidden[:, :-1], labels[:, 1:]
    teacher_spec = (teacher_hidden, teacher_weight) + ((teacher_bias,) if teacher_bias is not None else ())
    if softcap:
        with torch.no_grad():
            teacher_logits = torch.nn.functional.linear(teacher_hidden, teacher_weight, teacher_bias)
            teacher_spec = softcap * torch.tanh(teacher_logits / softcap)
    loss = functional.fused_linear_kd_loss(hidden, weight, teacher_spec, labels, student_bias=bias, softcap=softcap,
                                           reduction="mean", **options)
    return loss, outputs
