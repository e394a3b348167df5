"""Top-k soft labels in the functional API: `compress_topk` and `sparse_kd_loss`.

`compress_topk` turns teacher logits into `SoftLabels` with the fused one-read kernel;
`sparse_kd_loss` distils against them. Both validate from metadata only (they trace under
`torch.compile(fullgraph=True)`), flatten to rows, and run `kdfast.ops.sparse` on the CPU and
on CUDA when the core has the CUDA top-k kernels (within its k and vocabulary limits);
elsewhere `kdfast.reference` computes the same contract. With `process_group` the student's
vocabulary is sharded and `kdfast.vocab_parallel` computes the loss.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdfast import vocab_parallel
from kdfast.contract.options import KDOptions
from kdfast.contract.softlabels import SoftLabels
from kdfast.contract.validation import check_compress_inputs, check_sparse_kd_inputs
from kdfast.functional._rows import as_rows, stand_in
from kdfast.ops import sparse as sparse_ops
from kdfast.ops.kd_loss import check_inplace_student
from kdfast.reference import sparse as sparse_reference

__all__ = ["compress_topk", "sparse_kd_loss"]


def compress_topk(
    teacher_logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    index_dtype: torch.dtype = torch.int32,
) -> SoftLabels:
    """Compresses teacher logits to their top-k soft labels at `temperature`.

    One fused pass per row selects the k largest logits (ties: the lower vocabulary index
    comes first; −inf entries are kept, in index order, only when fewer than k finite
    entries exist) while accumulating the row's log-sum-exp of t/T; the tail mass is summed
    directly over the entries that were not kept, so it stays exact when tiny. A row whose
    logits are all −inf, or with a NaN or +inf logit, gets NaN log-probabilities and tail.

    Args:
        teacher_logits: [..., V] float32, bfloat16, float16 or float64; may contain −inf
            (masked vocabulary entries). Not differentiated (the result is a constant).
        k: number of tokens kept per row, 1 ≤ k ≤ V.
        temperature: T in [1e-20, 1e20] (default 1.0); probabilities are softmax(teacher_logits / T).
        index_dtype: dtype of the returned indices: int32 (default), int64, or int16
            (V ≤ 32768) / uint16 (V ≤ 65536).

    Returns:
        SoftLabels with indices [..., k] (index_dtype), logprobs [..., k] float32 (float64
        for float64 input), tail_logprob [...] in the same float dtype, the temperature and V.
        CPU tensors (and CUDA ones when kdfast has CUDA kernels, for k ≤ 4096) use the fused
        kernel; other devices use `kdfast.reference.compress_topk`.

    Raises:
        ValueError: k < 1 or k > V, T outside [1e-20, 1e20] or not finite, a 0-dim input, or an index dtype
            too narrow for V.
        TypeError: non-floating logits, non-integer k, unknown index dtype.
    """
    check_compress_inputs(teacher_logits, k, temperature, index_dtype)
    if not sparse_ops.compress_uses_kernels(teacher_logits.device, int(k)):
        return sparse_reference.compress_topk(teacher_logits, k, temperature=temperature, index_dtype=index_dtype)
    vocab_size = teacher_logits.shape[-1]
    leading_shape = teacher_logits.shape[:-1]
    rows = teacher_logits.detach().reshape(-1, vocab_size)
    if rows.stride(-1) != 1 and vocab_size > 1:
        rows = rows.contiguous()
    kernel_index_dtype = torch.int64 if index_dtype == torch.int64 else torch.int32
    indices, logprobs, tail = sparse_ops.compress(rows, int(k), float(temperature), kernel_index_dtype == torch.int64)
    if index_dtype != kernel_index_dtype:
        indices = indices.to(index_dtype)
    return SoftLabels(
        indices=indices.reshape(*leading_shape, k),
        logprobs=logprobs.reshape(*leading_shape, k),
        tail_logprob=tail.reshape(leading_shape),
        temperature=float(temperature),
        vocab_size=vocab_size,
    )


def sparse_kd_loss(
    student_logits: Tensor,
    soft_labels,
    labels: Optional[Tensor] = None,
    *,
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
    inplace_backward: bool = False,
) -> Tensor:
    """Distillation loss against top-k soft labels (`kdfast.SoftLabels`).

    Per row, with q = softmax(s/T) over all V student logits and the teacher's kept
    log-probabilities log p_K and tail log-mass log p_tail:
    - `tail="bucket"` (default): D is taken over k+1 buckets, the kept tokens plus one tail
      bucket: student (q_K, q_tail) with log q_tail = logsumexp of the non-kept s/T minus the
      full log-sum-exp (never 1 − Σ q_K), teacher (p_K, p_tail) renormalised to sum to 1
      (a no-op up to rounding for labels from `compress_topk`; it absorbs the rounding of
      16-bit storage). The gradient reaches every student logit. With k = V this is `kd_loss`.
    - `tail="renormalize"`: D between p_K / Σ p_K and q_K / Σ q_K; only the kept logits get
      a divergence gradient.
    The row loss is α·CE(s, y) + (1−α)·τ·D with CE on the full student row at temperature 1
    (label smoothing ε spread over all V), τ = T² when `t2_scale` else 1; D is `forward_kl`,
    `reverse_kl`, `jsd` (β) or `tvd` exactly as in `kd_loss`.

    Args:
        student_logits: [..., V] float32, bfloat16, float16 or float64. Receives the gradient.
        soft_labels: SoftLabels with leading shape [...] and vocab_size V (any storage
            dtypes; a float64 student computes in float64). Treated as constants.
        labels: [...] int64 class indices in [0, V), or None (every row valid; `alpha` must
            be 0). Rows whose label equals `ignore_index` contribute 0 and get zero gradient.
        divergence: "forward_kl" (default), "reverse_kl", "jsd" or "tvd".
        temperature: None (default) uses `soft_labels.temperature`; any other value must
            equal it, because log-probabilities stored at one temperature cannot be rescaled
            to another without the raw teacher logits (which SoftLabels does not keep).
        alpha: weight of the hard-label cross-entropy, in [0, 1] (default 0.0).
        beta: JSD mixture weight in (0, 1) (default 0.5); used by "jsd" only.
        tail: "bucket" (default) or "renormalize", as above.
        ignore_index: label value of rows to skip (default -100).
        reduction: "mean" (default: sum over valid rows / number of valid rows, 0 when no
            row is valid), "sum", "batchmean" (sum / number of rows) or "none" (per-row
            losses with the leading shape [...]).
        label_smoothing: ε in [0, 1) for the cross-entropy term (default 0.0).
        t2_scale: scale the divergence by T² (default True).
        process_group: None, or the torch.distributed group the vocabulary is sharded over:
            each rank passes its student logits shard [..., V_r] (slices in rank order), the
            same SoftLabels (global ids, vocab_size = Σ V_r) and global labels; the exact
            loss comes from all-reduced row statistics (`kdfast.vocab_parallel`).
        inplace_backward: write the student gradient over the student logits' storage (CPU),
            with the contract and refusals of `kdfast.functional.kd_loss`'s (default False).
            Labels and soft-label indices are checked before the logits are overwritten.

    Returns:
        float32 loss (float64 for a float64 student or float64 soft labels): a scalar, or
        [...] for reduction="none". The student gradient has the student's dtype.

    Raises:
        TypeError: wrong types or dtypes (student not floating, labels not int64, soft_labels
            not a SoftLabels).
        ValueError: vocabulary or row-shape mismatch with the soft labels, a temperature that
            differs from the soft labels', an unknown tail mode, the `kd_loss` option errors,
            labels outside [0, V), soft-label indices outside [0, V) or repeated in a row.
    """
    checked = student_logits
    if process_group is not None and isinstance(student_logits, Tensor) and isinstance(soft_labels, SoftLabels):
        # a shard has fewer columns than the soft labels' vocabulary: check a full-width stand-in
        checked = stand_in(student_logits.shape[:-1], soft_labels.vocab_size, student_logits.dtype,
                           student_logits.device)
    temperature = check_sparse_kd_inputs(
        checked, soft_labels, labels, divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
        tail=tail, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )
    options = KDOptions.of(divergence=divergence, tail=tail, reduction=reduction, temperature=temperature,
                           alpha=alpha, beta=beta, label_smoothing=label_smoothing, t2_scale=t2_scale,
                           ignore_index=ignore_index)
    if inplace_backward:
        if process_group is not None:
            raise ValueError("sparse_kd_loss: inplace_backward=True is not supported with process_group")
        check_inplace_student(student_logits)
    if process_group is not None:
        flat = soft_labels.flatten()
        return vocab_parallel.kd_loss(
            as_rows(student_logits, student_logits.shape[-1]),
            (flat.indices, flat.logprobs.detach(), flat.tail_logprob.detach()),
            labels.reshape(-1) if labels is not None else None, process_group, soft=True, options=options,
            leading_shape=student_logits.shape[:-1], vocab_size=soft_labels.vocab_size,
        )
    if not sparse_ops.sparse_uses_kernels(student_logits.device, student_logits.shape[-1]):
        return sparse_reference.sparse_kd_loss(
            student_logits, soft_labels, labels, divergence=divergence, temperature=temperature, alpha=alpha,
            beta=beta, tail=tail, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            t2_scale=t2_scale,
        )
    vocab = student_logits.shape[-1]
    leading_shape = student_logits.shape[:-1]
    flat = soft_labels.flatten()
    teacher_logprobs, teacher_tail = flat.logprobs.detach(), flat.tail_logprob.detach()
    if student_logits.dtype == torch.float64 or teacher_logprobs.dtype == torch.float64:
        student_logits = student_logits.to(torch.float64)
        teacher_logprobs, teacher_tail = teacher_logprobs.to(torch.float64), teacher_tail.to(torch.float64)
    student_rows = as_rows(student_logits, vocab)
    label_rows = labels.reshape(-1).contiguous() if labels is not None else None
    loss = sparse_ops.sparse_kd_loss(student_rows, flat.indices.contiguous(), teacher_logprobs.contiguous(),
                                     teacher_tail.contiguous(), label_rows, options, inplace=inplace_backward)
    if reduction == "none":
        loss = loss.reshape(leading_shape)
    return loss
