"""Universal Logit Distillation (`uld_loss`) over each side's sorted top-k.

ULD (Boizard et al., 2024) distils across tokenizers: per row it is the L1 distance between
the student's and the teacher's probability vectors, each sorted in descending order, the
shorter padded with zeros. Here each side's sorted top-k log-probabilities and its remaining
mass come from `compress_topk` (the fused one-read kernel on the CPU), the compared prefix
and the remaining-mass term follow `kdfast.reference.uld.uld_sizes`, and an autograd
Function maps the gradient back through the student's sort permutation: no sorted N×V copy
is built when k < V. With k=None (both vocabularies kept whole) the loss is exact ULD.
Arguments are checked from metadata by `kdfast.reference.uld.check_uld_inputs`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdfast.contract.reductions import reduce_rows
from kdfast.contract.softlabels import SoftLabels
from kdfast.functional._rows import as_rows
from kdfast.functional.sparse import compress_topk
from kdfast.reference.uld import check_uld_inputs, uld_sizes

__all__ = ["uld_loss"]


def _teacher_rows(teacher, k, student_vocab, temperature, dtype):
    """(sizes, b [N, min(k_t, K)] sorted teacher probabilities, B [N] remaining teacher mass)."""
    if isinstance(teacher, SoftLabels):
        sizes = uld_sizes(student_vocab, teacher.vocab_size, k, teacher.k)
        flat = teacher.flatten()
        logprobs, tail = flat.logprobs.detach(), flat.tail_logprob.detach()
    else:
        sizes = uld_sizes(student_vocab, teacher.shape[-1], k)
        logits = teacher.detach().to(torch.float64) if dtype == torch.float64 else teacher.detach()
        compressed = compress_topk(logits, sizes.teacher_k, temperature=temperature)
        logprobs, tail = compressed.logprobs.reshape(-1, sizes.teacher_k), compressed.tail_logprob.reshape(-1)
    b = logprobs.to(dtype).exp()
    rest = tail.to(dtype).exp()
    if b.shape[-1] > sizes.compared:
        rest = rest + b[:, sizes.compared:].sum(-1)
        b = b[:, :sizes.compared]
    return sizes, b, rest


class _ULDRows(torch.autograd.Function):
    """Per-row top-k ULD loss [N] of student rows [N, V_s]; first-order gradient only.

    With a = the student's kept sorted probabilities (indices σ), b̃ the teacher's sorted
    probabilities padded with zeros to a's length (`teacher_head`), A and B the remaining
    masses (B includes teacher entries past the student's kept count, `teacher_extra`):
    loss = Σ|a − b̃| + teacher_extra + |A − B|. As a function of q = softmax(s/T), the loss
    has ∂/∂q_σ(i) = sign(a_i − b̃_i) and ∂/∂q_j = sign(A − B) for every non-kept j, so
    ∂/∂s = q ⊙ (g − Σ q g) / T: a dense term for the non-kept entries plus a scatter at σ.
    """

    @staticmethod
    def forward(ctx, student_rows, student_k, temperature, teacher_head, teacher_extra, teacher_rest):
        compressed = compress_topk(student_rows.detach(), student_k, temperature=temperature)
        dtype = teacher_head.dtype
        a = compressed.logprobs.to(dtype).exp()
        student_rest = compressed.tail_logprob.to(dtype).exp()
        kept_sign = torch.sign(a - teacher_head)
        rest_sign = torch.sign(student_rest - teacher_rest)
        loss = (a - teacher_head).abs().sum(-1) + teacher_extra + (student_rest - teacher_rest).abs()
        ctx.save_for_backward(student_rows, compressed.indices, compressed.logprobs, a, kept_sign, rest_sign,
                              student_rest)
        ctx.temperature = temperature
        ctx.complete = student_k == student_rows.shape[-1]
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        student_rows, indices, logprobs, a, kept_sign, rest_sign, student_rest = ctx.saved_tensors
        temperature = ctx.temperature
        dtype = a.dtype
        mean_slope = (a * kept_sign).sum(-1) + student_rest * rest_sign
        factor = grad_loss.to(dtype) / temperature
        indices = indices.long()
        if ctx.complete:
            kept_grad = a * (kept_sign - mean_slope[:, None]) * factor[:, None]
            grad = torch.zeros(student_rows.shape, dtype=dtype, device=student_rows.device)
            grad.scatter_(1, indices, kept_grad)
        else:
            # log q = s/T − log Z, with log Z read off the largest kept entry
            scaled = student_rows.to(dtype) / temperature
            log_normaliser = scaled.gather(1, indices[:, :1]) - logprobs[:, :1].to(dtype)
            grad = torch.exp(scaled - log_normaliser)
            grad.mul_(((rest_sign - mean_slope) * factor)[:, None])
            grad.scatter_add_(1, indices, a * (kept_sign - rest_sign[:, None]) * factor[:, None])
        # a row without gradient (masked, or grad_output 0) stays 0 even when its logits are not finite
        grad = torch.where((grad_loss == 0)[:, None], torch.zeros((), dtype=dtype, device=grad.device), grad)
        return grad.to(student_rows.dtype), None, None, None, None, None


def uld_loss(
    student_logits: Tensor,
    teacher: Union[Tensor, SoftLabels],
    *,
    k: Optional[int] = None,
    student_temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    mask: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tensor:
    """Universal Logit Distillation loss between vocabularies of different sizes.

    Per row, with a = softmax(s/T_s) and b = softmax(t/T_t) each sorted in descending order
    and the shorter padded with zeros: ULD = Σ_i |a_i − b_i|. With `k`, only each side's K
    largest probabilities are read (K from `kdfast.reference.uld.uld_sizes`: min(k, V) per
    side, the smaller count of the sides that do not keep their whole vocabulary), and the
    remaining masses A = 1 − Σ_{i<K} a_i and B = 1 − Σ_{i<K} b_i (each summed directly, not by
    subtraction) enter as |A − B|:

        loss = Σ_{i<K} |a_i − b_i| + |A − B|,   with   exact − 2·min(A, B) ≤ loss ≤ exact,

    since Σ_{i≥K} |a_i − b_i| lies between |A − B| (triangle inequality) and A + B. k=None
    (or k ≥ both vocabularies) is exact ULD. No T² factor and no cross-entropy term is added.

    Args:
        student_logits: [..., V_s] float32, bfloat16, float16 or float64. Receives the gradient
            (in its dtype; first order only, no `create_graph`).
        teacher: teacher logits [..., V_t] (any floating dtype; V_t may differ from V_s) or
            `SoftLabels` with leading shape [...] (already sorted top-k plus tail; with k=None
            their k is used). Treated as a constant.
        k: None (default: exact) or an int ≥ 1, the sorted entries kept per side.
        student_temperature: T_s in [1e-20, 1e20] (default 1.0).
        teacher_temperature: T_t; None (default) means 1.0 for logits and the soft labels'
            temperature for SoftLabels (any other value must equal it).
        mask: None (every row counts) or a bool [...] tensor; rows where it is False add 0 and
            get a zero gradient whatever they hold.
        reduction: "mean" (default: sum over the rows in the mask / their number, 0 when none),
            "sum", "batchmean" (sum / number of rows) or "none" (per-row losses [...]).

    Returns:
        float32 loss (float64 when the student or the teacher is float64): a scalar, or [...]
        for reduction="none".

    Raises:
        TypeError: wrong types or dtypes (non-floating logits, k not an int, mask not bool).
        ValueError: different leading shapes, k < 1, temperatures out of range, a teacher
            temperature that differs from the soft labels', an unknown reduction, devices.
    """
    teacher_temperature = check_uld_inputs(student_logits, teacher, k=k, student_temperature=student_temperature,
                                           teacher_temperature=teacher_temperature, mask=mask, reduction=reduction)
    leading_shape = student_logits.shape[:-1]
    student_vocab = student_logits.shape[-1]
    teacher_dtype = teacher.logprobs.dtype if isinstance(teacher, SoftLabels) else teacher.dtype
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_dtype) else torch.float32
    sizes, teacher_sorted, teacher_rest = _teacher_rows(teacher, k, student_vocab, teacher_temperature, dtype)
    rows = as_rows(student_logits, student_vocab)
    if dtype == torch.float64:
        rows = rows.to(torch.float64)
    student_k = sizes.student_k
    head = teacher_sorted[:, :student_k]
    teacher_extra = teacher_sorted[:, student_k:].sum(-1)
    if head.shape[-1] < student_k:
        head = torch.nn.functional.pad(head, (0, student_k - head.shape[-1]))
    row_losses = _ULDRows.apply(rows, student_k, float(student_temperature), head.contiguous(), teacher_extra,
                                teacher_rest)
    if mask is not None:
        flat_mask = mask.reshape(-1)
        row_losses = torch.where(flat_mask, row_losses, torch.zeros((), dtype=dtype, device=row_losses.device))
    if reduction == "none":
        return row_losses.reshape(leading_shape)
    return reduce_rows(row_losses, reduction, None if mask is None else mask.reshape(-1))
