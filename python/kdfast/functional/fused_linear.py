"""`fused_linear_kd_loss`: lm_head and distillation loss without ever holding the [N, V] logits.

Validates the hidden states, weights, teacher (logits, hidden states with their lm_head, or
SoftLabels) and the vocabulary mapping, then runs the chunked op `kdfast.ops.fused_linear`
(or, with `process_group`, its vocabulary-parallel form in `kdfast.vocab_parallel`). The
chunks' losses come from the compiled kernels where the device has them and from
`kdfast.reference` elsewhere.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdfast import vocab_parallel
from kdfast.contract.options import KDOptions, compute_dtype
from kdfast.contract.softlabels import SoftLabels
from kdfast.contract.validation import (
    FUSED_LINEAR_NAMES,
    check_chunk_size,
    check_labels_metadata,
    check_logits_tensor,
    check_softcap,
    check_sparse_kd_inputs,
    check_tail_options,
    check_vocab_mapping_kind,
)
from kdfast.functional._rows import uses_kernels
from kdfast.ops import fused_linear as fused_linear_ops
from kdfast.ops import sparse as sparse_ops

__all__ = ["fused_linear_kd_loss"]


def _resolve_teacher_vocab(teacher_vocab: int, vocab: int, vocab_mapping, device: torch.device):
    """(columns to keep: None | int | int64 [V] map) for a teacher vocabulary of another size."""
    if vocab_mapping is None:
        if teacher_vocab != vocab:
            raise ValueError(
                f"fused_linear_kd_loss: the teacher's vocabulary has {teacher_vocab} entries but the student's has "
                f"{vocab}; pass vocab_mapping='truncate' (teacher columns >= {vocab} are padding and get no "
                "probability) or an int64 index map of shape [student vocab] to say how they correspond"
            )
        return None
    if isinstance(vocab_mapping, str):  # "truncate" (checked by check_vocab_mapping_kind)
        if teacher_vocab < vocab:
            raise ValueError(
                f"fused_linear_kd_loss: vocab_mapping='truncate' needs a teacher vocabulary at least as large as the "
                f"student's, got teacher {teacher_vocab} < student {vocab}; use an index map with -1 for student "
                "tokens the teacher lacks"
            )
        return vocab
    if tuple(vocab_mapping.shape) != (vocab,):
        raise ValueError(f"fused_linear_kd_loss: vocab_mapping must have shape [student vocab] = ({vocab},), got "
                         f"{tuple(vocab_mapping.shape)}")
    if not torch.compiler.is_compiling():
        low, high = int(vocab_mapping.min()), int(vocab_mapping.max())
        if low < -1 or high >= teacher_vocab:
            raise ValueError(f"fused_linear_kd_loss: vocab_mapping values must be in [-1, {teacher_vocab}) (the "
                             f"teacher's vocabulary; -1 = no teacher column), got values in [{low}, {high}]")
    return vocab_mapping.to(device)


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher,
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    softcap: Optional[float] = None,
    vocab_mapping=None,
    divergence: str = "forward_kl",
    temperature: Optional[float] = None,
    alpha: float = 0.0,
    beta: float = 0.5,
    tail: str = "bucket",
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    t2_scale: bool = True,
    process_group=None,
) -> Tensor:
    """Linear layer + distillation loss without ever holding the [N, V] logits.

    The student logits are s = h·Wᵀ + b, soft-capped to c·tanh(s/c) when `softcap=c`; the loss
    is exactly `kd_loss(s, t, labels, ...)` for a dense teacher and `sparse_kd_loss(s,
    soft_labels, labels, ...)` for top-k soft labels. Rows are processed `chunk_size` at a
    time: each chunk's logits are one matmul into a reused buffer, its loss and logit
    gradient come from the fused kernels, and the gradient is folded into grad_hidden,
    grad_weight and grad_bias at once. Memory above the inputs and parameter gradients: one
    chunk of logits, plus one teacher chunk for a hidden-state or index-mapped teacher, plus
    one gradient chunk for soft labels or `softcap` (with `softcap` and bfloat16/float16
    hidden states, the capped logits and their gradient are float32 chunks). The matmuls run
    in the hidden states' dtype; the soft cap, the loss and the logit gradient in float32
    (float64 for float64 inputs), the logit gradient being rounded once for the gradient
    matmuls. A backward pass with create_graph=True recomputes the loss on the whole [N, V]
    logits with differentiable PyTorch operations, so second-order gradients are exact
    (not with `process_group`, which raises RuntimeError there).

    Args:
        student_hidden: [..., H] float32, bfloat16, float16 or float64. Receives a gradient.
        student_weight: [V, H], the lm_head weight, same dtype and device. Receives a gradient.
        teacher: one of
            - teacher logits [..., V_t] (any floating dtype), a constant;
            - a tuple (teacher_hidden [..., H_t], teacher_weight [V_t, H_t][, teacher_bias
              [V_t]]): the teacher's logits are computed chunk by chunk as well, without grad;
            - `kdfast.SoftLabels` with leading shape [...] and vocab_size V.
        labels: [...] int64 in [0, V), or None (then `alpha` must be 0); rows labelled
            `ignore_index` contribute 0 and no gradient.
        student_bias: None or [V]. Receives a gradient.
        chunk_size: rows per chunk; None picks the largest power of two whose [chunk, V]
            logits fit 32 MiB on the CPU or 256 MiB on a GPU (`ops.fused_linear.default_chunk_rows`;
            soft-capped logits counted in float32 for bfloat16/float16 hidden states).
        softcap: None, or c > 0 for Gemma-style logit soft-capping c·tanh(s/c) (with its gradient).
        vocab_mapping: how a teacher vocabulary of another size maps to the student's: None
            (sizes must match), "truncate" (the teacher's columns past V are padding: they are
            dropped, i.e. the teacher's softmax is taken over its first V columns — excluded,
            not given a zero logit), or an int64 tensor [V] giving each student token's teacher
            column (−1: the teacher gives it probability 0). Not available for SoftLabels,
            whose tail mass cannot be split by column.
        divergence, temperature, alpha, beta, ignore_index, reduction, label_smoothing, t2_scale: as in
            `kd_loss` (temperature None means 1.0, or the soft labels' own).
        tail: "bucket" or "renormalize" for SoftLabels, as in `sparse_kd_loss`.
        process_group: a torch.distributed group over which the vocabulary is sharded
            (tensor-parallel lm_head): each rank passes its [V_r, H] weight shard, its teacher
            shard and the global labels; see `kdfast.vocab_parallel`.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [...] for reduction="none".

    Raises:
        TypeError / ValueError: bad dtypes, shapes, devices or options, naming the argument
            as this function calls it (`student_hidden`, `student_weight`, `teacher`, ...);
            a teacher vocabulary size that differs from V without `vocab_mapping`.
    """
    for name, tensor in (("student_hidden", student_hidden), ("student_weight", student_weight)):
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise TypeError(f"fused_linear_kd_loss: {name} must be a floating torch.Tensor, got "
                            f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
    if student_hidden.dim() < 1 or student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"fused_linear_kd_loss: student_weight must be [V, H] with H = student_hidden.shape[-1]; got "
                         f"student_hidden.shape={tuple(student_hidden.shape)}, "
                         f"student_weight.shape={tuple(student_weight.shape)}")
    if student_weight.dtype != student_hidden.dtype or student_weight.device != student_hidden.device:
        raise ValueError(f"fused_linear_kd_loss: student_weight ({student_weight.dtype}, {student_weight.device}) must "
                         f"match student_hidden ({student_hidden.dtype}, {student_hidden.device})")
    vocab, hidden_size = student_weight.shape
    if student_bias is not None and (tuple(student_bias.shape) != (vocab,) or student_bias.dtype != student_hidden.dtype
                                     or student_bias.device != student_hidden.device):
        raise ValueError(f"fused_linear_kd_loss: student_bias must be [V] = ({vocab},) with the hidden states' dtype "
                         f"and device, got shape {tuple(student_bias.shape)}, {student_bias.dtype}")
    check_chunk_size(chunk_size)
    check_softcap(softcap)
    check_vocab_mapping_kind(vocab_mapping)
    leading_shape = student_hidden.shape[:-1]
    device = student_hidden.device

    teacher_logits = teacher_hidden = teacher_weight = teacher_bias = teacher_columns = None
    soft = (None, None, None)
    if isinstance(teacher, SoftLabels):
        if vocab_mapping is not None:
            raise ValueError("fused_linear_kd_loss: vocab_mapping cannot be used with SoftLabels: their tail mass "
                             "is not split by column; compress the teacher's logits after mapping them instead")
        # with process_group, the weight is one shard of the soft labels' vocabulary
        temperature = check_sparse_kd_inputs(
            student_hidden, teacher, labels, divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
            tail=tail, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            names=FUSED_LINEAR_NAMES, vocab_size=teacher.vocab_size if process_group is not None else vocab,
        )
        flat = teacher.flatten()
        soft = (flat.indices.contiguous(), flat.logprobs.detach().contiguous(), flat.tail_logprob.detach().contiguous())
        if student_hidden.dtype == torch.float64:
            soft = (soft[0], soft[1].to(torch.float64), soft[2].to(torch.float64))
    else:
        temperature = 1.0 if temperature is None else temperature
        check_tail_options(tail=tail, temperature=temperature, divergence=divergence, alpha=alpha, beta=beta,
                           ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                           names=FUSED_LINEAR_NAMES)
        check_labels_metadata(student_hidden, labels, alpha, FUSED_LINEAR_NAMES)
        if isinstance(teacher, Tensor):
            if teacher.shape[:-1] != leading_shape:
                raise ValueError(f"fused_linear_kd_loss: teacher logits have leading shape {tuple(teacher.shape[:-1])} "
                                 f"but student_hidden has {tuple(leading_shape)}")
            check_logits_tensor("teacher", teacher, FUSED_LINEAR_NAMES)
            columns = _resolve_teacher_vocab(teacher.shape[-1], vocab, vocab_mapping, device)
            teacher_logits = teacher.detach().reshape(-1, teacher.shape[-1])
            if teacher_logits.stride(-1) != 1:
                teacher_logits = teacher_logits.contiguous()
            if isinstance(columns, int):
                teacher_logits = teacher_logits[:, :columns]
            teacher_columns = columns if isinstance(columns, Tensor) else None
        elif isinstance(teacher, (tuple, list)) and len(teacher) in (2, 3):
            teacher_hidden, teacher_weight = teacher[0], teacher[1]
            teacher_bias = teacher[2] if len(teacher) == 3 else None
            if (not isinstance(teacher_hidden, Tensor) or not isinstance(teacher_weight, Tensor)
                    or teacher_weight.dim() != 2 or teacher_hidden.shape[:-1] != leading_shape
                    or teacher_weight.shape[1] != teacher_hidden.shape[-1]
                    or teacher_weight.dtype != teacher_hidden.dtype):
                raise ValueError(
                    "fused_linear_kd_loss: a (teacher_hidden, teacher_weight[, teacher_bias]) teacher needs "
                    f"teacher_hidden [..., H_t] with leading shape {tuple(leading_shape)} and teacher_weight "
                    "[V_t, H_t] "
                    f"of the same dtype; got {tuple(getattr(teacher_hidden, 'shape', ()))} and "
                    f"{tuple(getattr(teacher_weight, 'shape', ()))}")
            if teacher_bias is not None and tuple(teacher_bias.shape) != (teacher_weight.shape[0],):
                raise ValueError(f"fused_linear_kd_loss: teacher_bias must be [V_t] = ({teacher_weight.shape[0]},), "
                                 f"got {tuple(teacher_bias.shape)}")
            check_logits_tensor("teacher_hidden", teacher_hidden, FUSED_LINEAR_NAMES)
            columns = _resolve_teacher_vocab(teacher_weight.shape[0], vocab, vocab_mapping, device)
            teacher_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
            teacher_weight = teacher_weight.detach()
            teacher_bias = teacher_bias.detach() if teacher_bias is not None else None
            if isinstance(columns, int):
                teacher_weight = teacher_weight[:columns]
                teacher_bias = teacher_bias[:columns] if teacher_bias is not None else None
            teacher_columns = columns if isinstance(columns, Tensor) else None
        else:
            raise TypeError("fused_linear_kd_loss: teacher must be teacher logits, a (teacher_hidden, teacher_weight"
                            f"[, teacher_bias]) tuple or kdfast.SoftLabels, got {type(teacher).__name__}")
        for name, tensor in (("teacher", teacher_logits), ("teacher_hidden", teacher_hidden)):
            if tensor is not None and tensor.device != device:
                raise ValueError(f"fused_linear_kd_loss: {name} is on {tensor.device} but student_hidden is on "
                                 f"{device}")

    hidden_rows = student_hidden.reshape(-1, hidden_size)
    label_rows = labels.reshape(-1).contiguous() if labels is not None else None
    rows = hidden_rows.shape[0]
    # soft-capped logits are held in the compute dtype (float32 for bfloat16/float16 hidden states)
    logits_dtype = compute_dtype(student_hidden) if softcap else student_hidden.dtype
    chunk_rows = chunk_size or fused_linear_ops.default_chunk_rows(rows, vocab, logits_dtype, device)
    if process_group is not None:
        return vocab_parallel.fused_linear_kd_loss(
            hidden_rows, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
            teacher_columns, soft, label_rows, chunk_size, float(softcap or 0.0), process_group,
            divergence=divergence, tail_mode=tail, reduction=reduction, temperature=float(temperature),
            alpha=float(alpha), beta=float(beta), label_smoothing=float(label_smoothing), t2_scale=bool(t2_scale),
            ignore_index=int(ignore_index), leading_shape=leading_shape,
            soft_vocab=teacher.vocab_size if isinstance(teacher, SoftLabels) else None,
        )
    if soft[0] is not None:
        kernels = sparse_ops.uses_kernels(device) and (soft[1].dtype != torch.float64
                                                        or student_hidden.dtype == torch.float64)
    else:
        kernels = uses_kernels(device)
        mixed_float64 = teacher_logits is not None and teacher_logits.dtype == torch.float64
        if mixed_float64 and student_hidden.dtype != torch.float64:
            kernels = False  # the kernels take float64 only for both sides; the reference takes any mix
    options = KDOptions.of(divergence=divergence, tail=tail, reduction=reduction, temperature=temperature,
                           alpha=alpha, beta=beta, label_smoothing=label_smoothing, t2_scale=t2_scale,
                           ignore_index=ignore_index)
    loss = fused_linear_ops.fused_linear_kd_loss(
        options, torch.is_grad_enabled(), int(chunk_rows), float(softcap or 0.0), kernels,
        hidden_rows, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
        teacher_columns, *soft, label_rows,
    )
    if reduction == "none":
        loss = loss.reshape(leading_shape)
    return loss

