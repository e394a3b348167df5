"""Functional knowledge-distillation losses backed by kdfast's fused kernels.

`kd_loss` validates its arguments (metadata only, so it traces under
`torch.compile(fullgraph=True)`), flattens `[..., V]` inputs to rows without copying when
the vocabulary dimension is contiguous, and calls the `kdfast::kd_loss_forward` custom op
(under torch.compile) or the equivalent autograd.Function (eager, no dispatcher cost),
whose backward is the fused backward kernel. CPU and CUDA tensors run the compiled
kernels; tensors on other devices (or CUDA when kdfast was built without CUDA kernels) use
`kdfast.reference`, which computes the same contract in plain PyTorch. `sparse_kd_loss`
does the same against top-k soft labels (`kdfast.SoftLabels`) through the
`kdfast::sparse_kd_forward` op. `multi_teacher_kd_loss` distils from M teachers at once
through `kdfast::multi_teacher_kd_forward` (CPU, and CUDA when built with CUDA kernels;
`kdfast.methods.multi_teacher_kd_loss` elsewhere).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdfast import _checks
from kdfast.ops import kd_loss as _kd_ops
from kdfast.ops._native import has_cuda_kernels

__all__ = ["fused_linear_kd_loss", "kd_loss", "multi_teacher_kd_loss", "sparse_kd_loss"]


def _as_rows(logits: Tensor, vocab: int) -> Tensor:
    """[..., V] -> [rows, V] with a contiguous last dimension (a view whenever possible)."""
    rows = logits.reshape(-1, vocab)
    if rows.stride(-1) != 1 and vocab > 1:
        rows = rows.contiguous()
    return rows


def _stand_in(leading_shape, vocab: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A [..., vocab] tensor of one stored element (zero strides): it carries the shape, dtype
    and device the metadata checks need, without allocating a row of logits."""
    shape = tuple(leading_shape) + (vocab,)
    return torch.empty_strided(shape, (0,) * len(shape), dtype=dtype, device=device)


def _uses_kernels(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    return device.type == "cuda" and has_cuda_kernels()


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    t2_scale: bool = True,
    process_group=None,
) -> Tensor:
    """Fused distillation loss α·CE(s, y) + (1−α)·τ·D(softmax(t/T), softmax(s/T)).

    Per row, with p = softmax(t/T) (teacher), q = softmax(s/T), r = softmax(s):
    D is `forward_kl` Σ p(log p − log q), `reverse_kl` Σ q(log q − log p), `jsd`
    β·KL(p‖m) + (1−β)·KL(q‖m) with m = βp + (1−β)q, or `tvd` ½Σ|p − q|;
    CE = −(1−ε)·log r_y − (ε/V)·Σ log r_i; τ = T² when `t2_scale` else 1.
    A term whose weight (α or 1−α) is 0 is not computed at all.

    Args:
        student_logits: [..., V] float32, bfloat16, float16 or float64. Receives the gradient.
        teacher_logits: [..., V], same shape; its dtype may differ from the student's
            (float64 is used for both when either is float64). Treated as a constant.
        labels: [...] int64 class indices in [0, V), or None (then every row is valid and
            `alpha` must be 0). Rows whose label equals `ignore_index` contribute 0 and get
            a zero gradient.
        divergence: "forward_kl" (default), "reverse_kl", "jsd" or "tvd".
        temperature: T > 0 (default 1.0).
        alpha: weight of the hard-label cross-entropy, in [0, 1] (default 0.0).
        beta: JSD mixture weight in (0, 1) (default 0.5); ignored by other divergences.
        ignore_index: label value of rows to skip (default -100).
        reduction: "mean" (default: sum over valid rows / number of valid rows, 0 when no
            row is valid), "sum", "batchmean" (sum / number of rows) or "none" (per-row
            losses with the leading shape [...]).
        label_smoothing: ε in [0, 1) for the cross-entropy term (default 0.0).
        t2_scale: scale the divergence by T² (default True), keeping gradient magnitudes
            comparable across temperatures.
        process_group: None, or the torch.distributed group the vocabulary is sharded over
            (tensor-parallel lm_head): each rank passes its logits shard [..., V_r] of student
            and teacher (slices in rank order) and the global labels; the exact full-vocabulary
            loss is computed by all-reducing row statistics (`kdfast.vocab_parallel`).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [...] for reduction="none".
        The student gradient has the student's dtype.

    Raises:
        TypeError: logits not floating, labels not int64.
        ValueError: mismatched shapes or vocabularies, bad options (T ≤ 0, α outside [0, 1],
            α > 0 without labels, unknown divergence or reduction, …), mixed devices, or
            labels outside [0, V) that are not `ignore_index` (CPU). On CUDA tensors such
            labels do not raise, because checking would need a device-to-host
            synchronisation: their rows get a NaN loss and gradient, so "mean", "sum" and
            "batchmean" are NaN. Check labels beforehand where an error is needed.
    """
    _checks.check_kd_inputs(
        student_logits, teacher_logits, labels, divergence=divergence, temperature=temperature, alpha=alpha,
        beta=beta, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )
    if process_group is not None:
        from kdfast import vocab_parallel

        vocab = student_logits.shape[-1]
        return vocab_parallel.kd_loss(
            _as_rows(student_logits, vocab), _as_rows(teacher_logits, vocab),
            labels.reshape(-1) if labels is not None else None, process_group, soft=False,
            options=(divergence, "bucket", reduction, float(temperature), float(alpha), float(beta),
                     float(label_smoothing), bool(t2_scale), int(ignore_index)),
            leading_shape=student_logits.shape[:-1],
        )
    if not _uses_kernels(student_logits.device):
        from kdfast import reference

        return reference.kd_loss(
            student_logits, teacher_logits, labels, divergence=divergence, temperature=temperature, alpha=alpha,
            beta=beta, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            t2_scale=t2_scale,
        )
    if student_logits.dtype == torch.float64 or teacher_logits.dtype == torch.float64:
        student_logits = student_logits.to(torch.float64)
        teacher_logits = teacher_logits.to(torch.float64)
    vocab = student_logits.shape[-1]
    leading_shape = student_logits.shape[:-1]
    student_rows = _as_rows(student_logits, vocab)
    teacher_rows = _as_rows(teacher_logits.detach(), vocab)
    label_rows = labels.reshape(-1).contiguous() if labels is not None else None
    options = (divergence, reduction, float(temperature), float(alpha), float(beta), float(label_smoothing),
               bool(t2_scale), int(ignore_index))
    if torch.compiler.is_compiling():
        loss, _, _ = _kd_ops.kd_loss_forward(student_rows, teacher_rows, label_rows, *options)
    else:  # same kernels, without the custom-op dispatch cost
        loss, _, _ = _kd_ops.EagerKDLoss.apply(student_rows, teacher_rows, label_rows, *options)
    if reduction == "none":
        loss = loss.reshape(leading_shape)
    return loss


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
    from kdfast import softlabels as _softlabels
    from kdfast.ops import sparse as _sparse_ops

    checked = student_logits
    if process_group is not None and isinstance(student_logits, Tensor) and isinstance(soft_labels, _softlabels.SoftLabels):
        # a shard has fewer columns than the soft labels' vocabulary: check a full-width stand-in
        checked = _stand_in(student_logits.shape[:-1], soft_labels.vocab_size, student_logits.dtype,
                            student_logits.device)
    temperature = _softlabels.check_sparse_kd_inputs(
        checked, soft_labels, labels, divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
        tail=tail, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )
    if process_group is not None:
        from kdfast import vocab_parallel

        flat = soft_labels.flatten()
        return vocab_parallel.kd_loss(
            _as_rows(student_logits, student_logits.shape[-1]),
            (flat.indices, flat.logprobs.detach(), flat.tail_logprob.detach()),
            labels.reshape(-1) if labels is not None else None, process_group, soft=True,
            options=(divergence, tail, reduction, float(temperature), float(alpha), float(beta),
                     float(label_smoothing), bool(t2_scale), int(ignore_index)),
            leading_shape=student_logits.shape[:-1], vocab_size=soft_labels.vocab_size,
        )
    if not _sparse_ops.uses_kernels(student_logits.device):
        from kdfast import reference

        return reference.sparse_kd_loss(
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
    student_rows = _as_rows(student_logits, vocab)
    label_rows = labels.reshape(-1).contiguous() if labels is not None else None
    options = (divergence, tail, reduction, float(temperature), float(alpha), float(beta), float(label_smoothing),
               bool(t2_scale), int(ignore_index))
    loss = _sparse_ops.sparse_kd_loss(
        student_rows, flat.indices.contiguous(), teacher_logprobs.contiguous(), teacher_tail.contiguous(), label_rows,
        *options,
    )
    if reduction == "none":
        loss = loss.reshape(leading_shape)
    return loss


def _unchecked_teacher_weights(weights, num_teachers: int, leading_shape: torch.Size, dtype: torch.dtype,
                               device: torch.device) -> Tensor:
    """Teacher weights as `[M, rows]` (possibly expanded) normalised to sum 1 per row, traceable.

    The value checks (finite, non-negative, positive sums on valid rows) read tensor data;
    eager calls make them through `kdfast.methods.multi_teacher._normalised_weights`, and
    this metadata-only version serves `torch.compile`.
    """
    rows = leading_shape.numel()
    if weights is None:
        return torch.full((num_teachers, 1), 1.0 / num_teachers, dtype=dtype, device=device).expand(num_teachers, rows)
    if isinstance(weights, Tensor):
        weight_tensor = weights.detach().to(device=device, dtype=dtype)
    else:
        weight_tensor = torch.tensor([float(w) for w in weights], dtype=dtype, device=device)
    per_row_shape = (num_teachers,) + tuple(leading_shape)
    if tuple(weight_tensor.shape) == (num_teachers,):
        weight_tensor = weight_tensor.reshape(num_teachers, 1)
    elif tuple(weight_tensor.shape) == per_row_shape:
        weight_tensor = weight_tensor.reshape(num_teachers, rows)
    else:
        raise ValueError(f"weights must have shape [M] = ({num_teachers},) (per teacher) or [M, *leading shape] = "
                         f"{per_row_shape} (per row), got {tuple(weight_tensor.shape)}")
    totals = weight_tensor.sum(dim=0, keepdim=True)
    normalised = torch.where(totals > 0, weight_tensor / totals.clamp_min(torch.finfo(dtype).tiny),
                             torch.full_like(weight_tensor, 1.0 / num_teachers))
    return normalised.expand(num_teachers, rows)


def _multi_teacher_count(teacher_logits) -> int:
    if isinstance(teacher_logits, Tensor):
        return teacher_logits.shape[0] if teacher_logits.dim() > 0 else 0
    return len(teacher_logits) if isinstance(teacher_logits, (list, tuple)) else 0


def _is_soft_label_sequence(teacher_logits) -> bool:
    from kdfast.softlabels import SoftLabels

    return isinstance(teacher_logits, (list, tuple)) and any(isinstance(t, SoftLabels) for t in teacher_logits)


def _multi_teacher_soft_labels(student_logits: Tensor, teachers, labels: Optional[Tensor], *, weights, combine: str,
                               divergence: str, temperature: float, alpha: float, beta: float, tail: str,
                               ignore_index: int, reduction: str, label_smoothing: float, t2_scale: bool) -> Tensor:
    """`multi_teacher_kd_loss` with M `SoftLabels` teachers (see its docstring).

    "sum": Σ_m w̄_m·ℓ_m with ℓ_m the per-row `sparse_kd_loss` against teacher m (its α·CE part
    is the same for every m and the weights sum to 1, so the CE is counted once), then
    reduced. "mixture": the teachers' top-k distributions are mixed into one SoftLabels,
    which is exact only when every teacher keeps the same tokens in every row.
    """
    from kdfast.methods import multi_teacher as _plain
    from kdfast.methods._validation import reduce_rows, require_choice
    from kdfast.softlabels import SoftLabels

    require_choice("combine", combine, _plain.COMBINE_MODES)
    for index, teacher in enumerate(teachers):
        if not isinstance(teacher, SoftLabels):
            raise TypeError(f"teacher_logits[{index}] is a {type(teacher).__name__}; a sequence of teachers must be "
                            f"all tensors or all kdfast.SoftLabels")
    if not isinstance(student_logits, Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}")
    leading_shape = student_logits.shape[:-1]
    compute_dtype = torch.float64 if student_logits.dtype == torch.float64 or any(
        t.logprobs.dtype == torch.float64 for t in teachers) else torch.float32
    label_rows = None if labels is None else labels.reshape(-1)
    valid_rows = None if label_rows is None else label_rows != ignore_index
    weight_rows = _plain._normalised_weights(weights, len(teachers), leading_shape, valid_rows, compute_dtype,
                                             student_logits.device)
    sparse_options = dict(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta, tail=tail,
                          ignore_index=ignore_index, label_smoothing=label_smoothing, t2_scale=t2_scale)
    if combine == "sum":
        row_loss = None
        for teacher, teacher_weight in zip(teachers, weight_rows):
            term = sparse_kd_loss(student_logits, teacher, labels, reduction="none", **sparse_options).reshape(-1)
            term = teacher_weight * term.to(compute_dtype)
            row_loss = term if row_loss is None else row_loss + term
        return reduce_rows(row_loss.reshape(leading_shape), reduction, valid_rows)
    first = teachers[0]
    for index, teacher in enumerate(teachers[1:], start=1):
        if teacher.indices.shape != first.indices.shape or not torch.equal(teacher.indices, first.indices):
            raise ValueError(
                f'multi_teacher_kd_loss: combine="mixture" with SoftLabels needs every teacher to keep the same '
                f"tokens (equal indices) in every row, but teacher_logits[{index}] differs from teacher_logits[0]. "
                "A token kept by one teacher lies in another's tail, whose mass is not split over tokens, so the "
                'mixture distribution is not known there. Use combine="sum", or compress every teacher over '
                "shared indices.")
        if teacher.temperature != first.temperature or teacher.vocab_size != first.vocab_size:
            raise ValueError("multi_teacher_kd_loss: every SoftLabels teacher must have the same temperature and "
                             "vocab_size")
    flat_shape = (leading_shape.numel(), first.indices.shape[-1])
    log_weights = weight_rows.log()  # [M, rows]; -inf for a zero weight
    mixed_logprobs = torch.stack([t.logprobs.detach().reshape(flat_shape).to(compute_dtype) + lw[:, None]
                                  for t, lw in zip(teachers, log_weights)]).logsumexp(0)
    mixed_tail = torch.stack([t.tail_logprob.detach().reshape(-1).to(compute_dtype) + lw
                              for t, lw in zip(teachers, log_weights)]).logsumexp(0)
    mixture = SoftLabels(indices=first.indices, logprobs=mixed_logprobs.reshape(first.indices.shape),
                         tail_logprob=mixed_tail.reshape(first.tail_logprob.shape), temperature=first.temperature,
                         vocab_size=first.vocab_size)
    return sparse_kd_loss(student_logits, mixture, labels, reduction=reduction, **sparse_options)


def multi_teacher_kd_loss(
    student_logits: Tensor,
    teacher_logits,
    labels: Optional[Tensor] = None,
    *,
    weights=None,
    combine: str = "sum",
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 0.0,
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    t2_scale: bool = True,
    tail: str = "bucket",
) -> Tensor:
    """Fused multi-teacher distillation loss: one student, M teachers, one kernel.

    Per row, with p_m = softmax(t_m/T), q = softmax(s/T), r = softmax(s) and weights w̄_m
    normalised to sum 1 over the teachers (per row for per-row weights):
    `combine="sum"` gives D = Σ_m w̄_m·D(p_m, q), `combine="mixture"` gives
    D = D(Σ_m w̄_m·p_m, q); the row loss is α·CE(s, y) + (1−α)·τ·D with τ = T² when
    `t2_scale` else 1 and CE = −(1−ε)·log r_y − (ε/V)·Σ log r_i. D is `forward_kl`,
    `reverse_kl`, `jsd` (β) or `tvd` exactly as in `kd_loss`; every divergence works with
    both combine modes. The semantics are those of `kdfast.methods.multi_teacher_kd_loss`,
    which is the float64 oracle and the fallback on devices other than the CPU.

    On the CPU, with "forward_kl" (either combine mode) the forward kernel reads every
    teacher row and the student row from memory once, exponentiates each element once, and,
    when the student needs a gradient (eager mode), writes that gradient in the same pass;
    the backward pass only scales it by grad_output. Other divergences read the rows once
    in the forward pass (twice for "mixture", "jsd" and "tvd", which need normalised
    distributions) and once more in the backward pass. Teachers are passed by address, so
    no [M, N, V] stack or per-teacher [N, V] temporary is created: the extra memory is the
    [N, 6 + 3M] per-row statistics, the [N, V] student gradient (float32, float64 for a
    float64 student) and a few rows per thread.

    Args:
        student_logits: [..., V] float32, bfloat16, float16 or float64. Receives the gradient.
        teacher_logits: a sequence of M tensors shaped like the student, or one [M, ..., V]
            tensor (its M slices are used as views). Treated as constants. Teachers may have a
            different dtype from the student; when the teachers' dtypes differ from one
            another they are converted to float32 first (a copy), and a float64 student or
            teacher makes every input float64. Or a sequence of M `kdfast.SoftLabels`
            (top-k teachers, leading shape [...], vocab_size V): each teacher's divergence
            is then the one of `sparse_kd_loss` (per `tail`), and `temperature` must equal
            the soft labels' temperature. "sum" computes Σ_m w̄_m·ℓ_m from M sparse losses
            (not one fused kernel; each reads the student once). "mixture" mixes the
            teachers' kept probabilities and tail masses into one SoftLabels, which is exact
            only when all teachers keep the same indices in every row; otherwise it raises
            ValueError, because a token one teacher keeps sits in another's tail bucket,
            whose mass is not split over tokens.
        labels: [...] int64 class indices in [0, V), or None (every row valid; `alpha` must be
            0). Rows whose label equals `ignore_index` contribute 0 and get a zero gradient.
        weights: None (default: uniform 1/M), M non-negative numbers or a tensor [M] (per
            teacher), or a tensor [M, ...] with the student's leading shape (per row, e.g.
            teacher confidences). Normalised to sum 1 over the teachers; treated as constants.
            Every non-ignored row needs a positive sum (checked in eager mode).
        combine: "sum" (default) or "mixture".
        divergence: "forward_kl" (default), "reverse_kl", "jsd" or "tvd".
        temperature: T > 0 (default 1.0).
        alpha: weight of the hard-label cross-entropy, in [0, 1] (default 0.0).
        beta: JSD mixture weight in (0, 1) (default 0.5); used by "jsd" only.
        ignore_index: label value of rows to skip (default -100).
        reduction: "mean" (default: sum over valid rows / number of valid rows, 0 when no row
            is valid), "sum", "batchmean" (sum / number of rows) or "none" (per-row losses
            with the leading shape [...]).
        label_smoothing: ε in [0, 1) for the cross-entropy term (default 0.0).
        t2_scale: scale the divergence by T² (default True).
        tail: "bucket" (default) or "renormalize", as in `sparse_kd_loss`; used only with
            SoftLabels teachers.

    Returns:
        float32 loss (float64 when the student or a teacher is float64): a scalar, or [...]
        for reduction="none". The student gradient has the student's dtype.

    Raises:
        TypeError: logits not floating, labels not int64, weights of the wrong type.
        ValueError: mismatched shapes or devices, bad options (as `kd_loss`), an unknown
            `combine`, labels outside [0, V) that are not `ignore_index` (CPU; on CUDA
            tensors their rows get a NaN loss and gradient, as in `kd_loss`), and in eager
            mode negative or non-finite weights or a zero weight sum on a non-ignored row.
    """
    from kdfast.methods import multi_teacher as _plain
    from kdfast.methods._validation import require_choice
    from kdfast.ops import multi_teacher as _multi_teacher_ops
    from kdfast.ops._native import native_available

    options = dict(weights=weights, combine=combine, divergence=divergence, temperature=temperature, alpha=alpha,
                   beta=beta, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                   t2_scale=t2_scale)
    if _is_soft_label_sequence(teacher_logits):
        return _multi_teacher_soft_labels(student_logits, list(teacher_logits), labels, tail=tail, **options)
    uses_kernel = isinstance(student_logits, Tensor) and (
        student_logits.device.type == "cpu"
        or (student_logits.device.type == "cuda" and has_cuda_kernels()
            and _multi_teacher_count(teacher_logits) <= _multi_teacher_ops.MAX_CUDA_TEACHERS))
    # Under torch.compile the availability check is not traced; a missing core fails at the op.
    if not uses_kernel or (not torch.compiler.is_compiling() and not native_available()):
        return _plain.multi_teacher_kd_loss(student_logits, teacher_logits, labels, **options)
    require_choice("combine", combine, _plain.COMBINE_MODES)
    teachers = _plain._split_teachers(teacher_logits, student_logits)
    for teacher in teachers:
        _checks.check_kd_inputs(
            student_logits, teacher, labels, divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        )
    teacher_dtypes = {teacher.dtype for teacher in teachers}
    if student_logits.dtype == torch.float64 or torch.float64 in teacher_dtypes:
        student_logits = student_logits.to(torch.float64)
        teachers = [teacher.to(torch.float64) for teacher in teachers]
    elif len(teacher_dtypes) > 1:
        teachers = [teacher.to(torch.float32) for teacher in teachers]
    dtype = _multi_teacher_ops.compute_dtype(student_logits)
    vocab = student_logits.shape[-1]
    leading_shape = student_logits.shape[:-1]
    student_rows = _as_rows(student_logits, vocab)
    teacher_rows = [_as_rows(teacher.detach(), vocab) for teacher in teachers]
    label_rows = labels.reshape(-1).contiguous() if labels is not None else None
    kernel_options = (combine, divergence, reduction, float(temperature), float(alpha), float(beta),
                      float(label_smoothing), bool(t2_scale), int(ignore_index))
    if torch.compiler.is_compiling():
        weight_rows = _unchecked_teacher_weights(weights, len(teachers), leading_shape, dtype, student_logits.device)
        loss, _, _ = _multi_teacher_ops.multi_teacher_kd_forward(student_rows, teacher_rows, weight_rows, label_rows,
                                                                 *kernel_options)
    else:  # validated weights; same kernels without the custom-op dispatch cost
        valid_rows = None if label_rows is None else label_rows != ignore_index
        weight_rows = _plain._normalised_weights(weights, len(teachers), leading_shape, valid_rows, dtype,
                                                 student_logits.device)
        loss, _, _ = _multi_teacher_ops.EagerMultiTeacherKDLoss.apply(student_rows, weight_rows, label_rows,
                                                                      kernel_options, *teacher_rows)
    if reduction == "none":
        loss = loss.reshape(leading_shape)
    return loss


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
    if isinstance(vocab_mapping, str):
        if vocab_mapping != "truncate":
            raise ValueError(f"fused_linear_kd_loss: vocab_mapping must be None, 'truncate' or an int64 tensor, "
                             f"got {vocab_mapping!r}")
        if teacher_vocab < vocab:
            raise ValueError(
                f"fused_linear_kd_loss: vocab_mapping='truncate' needs a teacher vocabulary at least as large as the "
                f"student's, got teacher {teacher_vocab} < student {vocab}; use an index map with -1 for student "
                "tokens the teacher lacks"
            )
        return vocab
    if not isinstance(vocab_mapping, Tensor) or vocab_mapping.dtype != torch.int64:
        raise TypeError("fused_linear_kd_loss: vocab_mapping must be None, 'truncate' or an int64 tensor, got "
                        f"{getattr(vocab_mapping, 'dtype', type(vocab_mapping).__name__)}")
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
    one gradient chunk for soft labels or `softcap`.

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
            logits fit 32 MiB on the CPU or 256 MiB on a GPU (`ops.fused_linear.default_chunk_rows`).
        softcap: None, or c > 0 for Gemma-style logit soft-capping c·tanh(s/c) (with its gradient).
        vocab_mapping: how a teacher vocabulary of another size maps to the student's: None
            (sizes must match), "truncate" (the teacher's columns past V are padding: they are
            dropped, i.e. the teacher's softmax is taken over its first V columns — excluded,
            not given a zero logit), or an int64 tensor [V] giving each student token's teacher
            column (−1: the teacher gives it probability 0). Not available for SoftLabels,
            whose tail mass cannot be split by column.
        divergence, temperature, alpha, beta, ignore_index, reduction, label_smoothing,
        t2_scale: as in `kd_loss` (temperature None means 1.0, or the soft labels' own).
        tail: "bucket" or "renormalize" for SoftLabels, as in `sparse_kd_loss`.
        process_group: a torch.distributed group over which the vocabulary is sharded
            (tensor-parallel lm_head): each rank passes its [V_r, H] weight shard, its teacher
            shard and the global labels; see `kdfast.vocab_parallel`.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [...] for reduction="none".

    Raises:
        TypeError / ValueError: bad dtypes, shapes, devices or options, naming the argument;
            a teacher vocabulary size that differs from V without `vocab_mapping`.
    """
    from kdfast.ops import fused_linear as _fused_ops
    from kdfast.softlabels import SoftLabels

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
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"fused_linear_kd_loss: chunk_size must be None or a positive int, got {chunk_size!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")):
        raise ValueError(f"fused_linear_kd_loss: softcap must be None or a finite number > 0, got {softcap!r}")
    leading_shape = student_hidden.shape[:-1]
    device = student_hidden.device
    stand_in = _stand_in(leading_shape, vocab, student_hidden.dtype, device)

    teacher_logits = teacher_hidden = teacher_weight = teacher_bias = teacher_columns = None
    soft = (None, None, None)
    if isinstance(teacher, SoftLabels):
        if vocab_mapping is not None:
            raise ValueError("fused_linear_kd_loss: vocab_mapping cannot be used with SoftLabels: their tail mass "
                             "is not split by column; compress the teacher's logits after mapping them instead")
        checked = stand_in
        if process_group is not None:  # a shard is narrower than the soft labels' vocabulary
            checked = _stand_in(leading_shape, teacher.vocab_size, student_hidden.dtype, device)
        temperature = _softlabels_temperature(checked, teacher, labels, divergence, temperature, alpha, beta, tail,
                                              ignore_index, reduction, label_smoothing)
        flat = teacher.flatten()
        soft = (flat.indices.contiguous(), flat.logprobs.detach().contiguous(), flat.tail_logprob.detach().contiguous())
        if student_hidden.dtype == torch.float64:
            soft = (soft[0], soft[1].to(torch.float64), soft[2].to(torch.float64))
    else:
        temperature = 1.0 if temperature is None else temperature
        if isinstance(teacher, Tensor):
            if teacher.shape[:-1] != leading_shape:
                raise ValueError(f"fused_linear_kd_loss: teacher logits have leading shape {tuple(teacher.shape[:-1])} "
                                 f"but student_hidden has {tuple(leading_shape)}")
            _checks._check_logits_tensor("teacher logits", teacher)
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
            _checks._check_logits_tensor("teacher_hidden", teacher_hidden)
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
        _checks.check_kd_inputs(
            stand_in, stand_in, labels, divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        )

    hidden_rows = student_hidden.reshape(-1, hidden_size)
    label_rows = labels.reshape(-1).contiguous() if labels is not None else None
    rows = hidden_rows.shape[0]
    chunk_rows = chunk_size or _fused_ops.default_chunk_rows(rows, vocab, student_hidden.dtype, device)
    if process_group is not None:
        from kdfast import vocab_parallel

        return vocab_parallel.fused_linear_kd_loss(
            hidden_rows, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
            teacher_columns, soft, label_rows, chunk_size, float(softcap or 0.0), process_group,
            divergence=divergence, tail_mode=tail, reduction=reduction, temperature=float(temperature),
            alpha=float(alpha), beta=float(beta), label_smoothing=float(label_smoothing), t2_scale=bool(t2_scale),
            ignore_index=int(ignore_index), leading_shape=leading_shape,
            soft_vocab=teacher.vocab_size if isinstance(teacher, SoftLabels) else None,
        )
    if soft[0] is not None:
        from kdfast.ops import sparse as _sparse_ops

        kernels = _sparse_ops.uses_kernels(device) and (soft[1].dtype != torch.float64
                                                        or student_hidden.dtype == torch.float64)
    else:
        kernels = _uses_kernels(device)
        mixed_float64 = teacher_logits is not None and teacher_logits.dtype == torch.float64
        if mixed_float64 and student_hidden.dtype != torch.float64:
            kernels = False  # the kernels take float64 only for both sides; the reference takes any mix
    loss = _fused_ops.fused_linear_kd_loss(
        hidden_rows, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
        teacher_columns, *soft, label_rows, torch.is_grad_enabled(), int(chunk_rows), float(softcap or 0.0), kernels,
        divergence, tail, reduction, float(temperature), float(alpha), float(beta), float(label_smoothing),
        bool(t2_scale), int(ignore_index),
    )
    if reduction == "none":
        loss = loss.reshape(leading_shape)
    return loss


def _softlabels_temperature(stand_in, soft_labels, labels, divergence, temperature, alpha, beta, tail, ignore_index,
                            reduction, label_smoothing) -> float:
    from kdfast import softlabels as _softlabels

    return _softlabels.check_sparse_kd_inputs(
        stand_in, soft_labels, labels, divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
        tail=tail, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
    )
