"""Vocabulary-parallel KD losses: logits sharded over the vocabulary across a process group.

With a tensor-parallel lm_head each rank r holds the logits of a contiguous slice
[start_r, start_r + V_r) of the vocabulary for every row. The losses here are exactly those
of `kdfast.functional` on the full vocabulary, computed the Megatron way: never gathering
logits, only all-reducing per-row statistics — the maxima (MAX), then the sums of
exponentials and of the divergence / cross-entropy terms (SUM) — so each rank moves O(rows)
numbers, not O(rows·V). Every rank gets the same (replicated) loss; each rank's backward
produces the gradient of its own shard, and `fused_linear_kd_loss` all-reduces grad_hidden.

Contract: call on every rank of `group` with the same rows, the same (global) labels and
options, and each rank's shard (shard sizes may differ; their sum is V; shards follow rank
order). Labels are global vocabulary ids; SoftLabels hold global ids and are replicated.
The arithmetic runs in float32 (float64 for float64 logits) with plain PyTorch operations
on row chunks of the shard (so it works on any device and backend: gloo, NCCL); each
gradient is rounded once to the logits' dtype. The number of collectives per call is the
same on every rank. Row chunking keeps temporaries to a few [chunk, V_r] buffers.
Second-order gradients (a backward pass with create_graph=True) are not available here: such
a backward raises RuntimeError instead of returning a gradient without a graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from kdfast.contract.options import KDOptions, compute_dtype
from kdfast.contract.reductions import reduction_scale
from kdfast.ops import fused_linear as fused_linear_ops
from kdfast.reference import dense as reference

# Rows per chunk are chosen so a chunk holds about this many elements of the *average* shard
# (the same value on every rank, so all ranks issue the same collectives).
_CHUNK_ELEMENTS = 1 << 22


def shard_layout(local_vocab: int, group, device: torch.device) -> tuple[int, int]:
    """(start of this rank's vocabulary slice, global vocabulary size) from every rank's size."""
    world = dist.get_world_size(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[dist.get_rank(group)] = local_vocab
    dist.all_reduce(sizes, group=group)
    sizes = sizes.tolist()
    if min(sizes) < 1:
        raise ValueError(f"vocab-parallel KD: every rank needs at least one vocabulary column, got shard sizes {sizes}")
    rank = dist.get_rank(group)
    return int(sum(sizes[:rank])), int(sum(sizes))


def _chunk_rows(rows: int, global_vocab: int, group) -> int:
    per_rank = max(1, global_vocab // dist.get_world_size(group))
    return max(1, min(rows, _CHUNK_ELEMENTS // per_rank))


def _check_labels(labels: Optional[Tensor], global_vocab: int, ignore_index: int) -> None:
    if labels is None or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= global_vocab))
    if bool(bad.any()):
        raise ValueError(f"vocab-parallel KD: labels out of range: {int(bad.sum())} label(s) outside [0, "
                         f"{global_vocab}) that are not ignore_index={ignore_index}, e.g. "
                         f"{labels[bad][:5].tolist()}")


def _check_vocab(vocab_size: Optional[int], global_vocab: int) -> None:
    if vocab_size is not None and vocab_size != global_vocab:
        raise ValueError(f"vocab-parallel KD: the soft labels were made for V={vocab_size} but the shards add up to "
                         f"{global_vocab} columns")


def _safe(maxima: Tensor) -> Tensor:
    return torch.where(torch.isfinite(maxima), maxima, torch.zeros_like(maxima))


def _log_sum_exp(values: list, group) -> list:
    """Global row log-sum-exp of each [rows, V_r] tensor in `values` with two collectives."""
    maxima = torch.stack([v.amax(-1) for v in values], 1)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    shift = _safe(maxima)
    sums = torch.stack([torch.exp(v - shift[:, i:i + 1]).sum(-1) for i, v in enumerate(values)], 1)
    dist.all_reduce(sums, group=group)
    return list((shift + torch.log(sums)).unbind(1))


class _Options:
    def __init__(self, options: KDOptions, group, vocab_start: int, global_vocab: int):
        self.options = options
        (self.divergence, self.tail_mode, self.reduction, self.temperature, self.alpha, self.beta,
         self.label_smoothing, self.t2_scale, self.ignore_index) = (
            options.divergence, options.tail, options.reduction, options.temperature, options.alpha, options.beta,
            options.label_smoothing, options.t2_scale, options.ignore_index)
        self.group, self.vocab_start, self.global_vocab = group, vocab_start, global_vocab
        self.need_kd, self.need_ce = self.alpha != 1, self.alpha != 0
        self.kd_weight = (1.0 - self.alpha) * (self.temperature ** 2 if self.t2_scale else 1.0)

    def local_labels(self, labels: Optional[Tensor], width: int):
        """(valid rows [R] bool, label column in this shard or -1 [R])."""
        if labels is None:
            return None, None
        valid = labels != self.ignore_index
        local = labels - self.vocab_start
        owned = valid & (local >= 0) & (local < width)
        return valid, torch.where(owned, local, torch.full_like(local, -1))

    def cross_entropy_sums(self, x: Tensor, label_column: Tensor) -> Tensor:
        """[R, 2] local (s_y, Σ s) to be all-reduced."""
        picked = x.gather(1, label_column.clamp(min=0)[:, None]).squeeze(1)
        picked = torch.where(label_column >= 0, picked, torch.zeros_like(picked))
        return torch.stack([picked, x.sum(-1)], 1)

    def cross_entropy(self, sums: Tensor, lse: Tensor) -> Tensor:
        eps = self.label_smoothing
        ce = -(1.0 - eps) * (sums[:, 0] - lse)
        if eps:
            ce = ce - eps * (sums[:, 1] / self.global_vocab - lse)
        return ce

    def reduce(self, row_loss: Tensor, reduction: str) -> Tensor:
        return row_loss if reduction == "none" else row_loss.sum()


class DenseShardLoss:
    """The dense KD loss of one row chunk whose logits are this rank's vocabulary shard.

    Same interface as `kdfast.ops.fused_linear.ChunkLoss`. Statistics per row (kept for the
    gradient): the global log-sum-exps of t/T, s/T and s, the divergence D and the
    divergence's gradient constant G (Σ_i q_i ∂D/∂q_i, a global row sum).
    """

    gradient_in_place = False

    @property
    def options(self) -> KDOptions:
        return self.o.options

    def __init__(self, options: _Options):
        self.o = options

    def _prepare(self, logits: Tensor, teacher: Tensor, labels: Optional[Tensor]):
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x, t = logits.to(dtype), teacher.to(dtype)
        valid, label_column = self.o.local_labels(labels, x.shape[1])
        if valid is not None:  # ignored rows may hold anything: compute them on zeros, then drop them
            x = torch.where(valid[:, None], x, torch.zeros((), dtype=dtype, device=x.device))
            t = torch.where(valid[:, None], t, torch.zeros((), dtype=dtype, device=x.device))
        return x, t, valid, label_column

    def _probabilities(self, x: Tensor, t: Tensor, lse_t: Tensor, lse_s: Tensor):
        inv_t = 1.0 / self.o.temperature
        return t * inv_t - lse_t[:, None], x * inv_t - lse_s[:, None]

    def forward(self, logits: Tensor, teacher: Tensor, labels: Optional[Tensor], reduction: str):
        o = self.o
        x, t, valid, label_column = self._prepare(logits, teacher, labels)
        rows = x.shape[0]
        zeros = x.new_zeros(rows)
        scaled = [t / o.temperature, x / o.temperature] if o.need_kd else []
        lse = _log_sum_exp(scaled + ([x] if o.need_ce else []), o.group)
        lse_t, lse_q = (lse[0], lse[1]) if o.need_kd else (zeros, zeros)
        lse_r = lse[-1] if o.need_ce else zeros
        row_loss = zeros.clone()
        divergence = constant = zeros
        if o.need_kd:
            log_p, log_q = self._probabilities(x, t, lse_t, lse_q)
            partial = torch.stack([reference.divergence_from_log_probs(log_p, log_q, o.divergence, o.beta),
                                   self._gradient_constant(log_p, log_q)], 1)
        if o.need_ce:
            ce_sums = o.cross_entropy_sums(x, label_column)
            partial = torch.cat([partial, ce_sums], 1) if o.need_kd else ce_sums
        dist.all_reduce(partial, group=o.group)
        if o.need_kd:
            divergence, constant = partial[:, 0], partial[:, 1]
            row_loss = row_loss + o.kd_weight * divergence
        if o.need_ce:
            row_loss = row_loss + o.alpha * o.cross_entropy(partial[:, -2:], lse_r)
        if valid is not None:
            row_loss = torch.where(valid, row_loss, zeros)
        stats = torch.stack([lse_t, lse_q, lse_r, divergence, constant], 1)
        return o.reduce(row_loss, reduction), stats

    def _gradient_constant(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        o = self.o
        q = log_q.exp()
        if o.divergence == "jsd":
            log_m = self._log_mixture(log_p, log_q)
            return torch.where(q > 0, q * (log_q - log_m), torch.zeros_like(q)).sum(-1)
        if o.divergence == "tvd":
            return (q * 0.5 * torch.sign(q - log_p.exp())).sum(-1)
        return q.new_zeros(q.shape[0])  # forward KL needs none; reverse KL uses D itself

    def _log_mixture(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        beta = self.o.beta
        return torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))

    def gradient(self, logits: Tensor, teacher: Tensor, labels: Optional[Tensor], stats: Tensor, grad_output: Tensor,
                 reduction: str, out: Tensor) -> Tensor:
        o = self.o
        x, t, valid, label_column = self._prepare(logits, teacher, labels)
        lse_t, lse_q, lse_r, divergence, constant = stats.to(x.dtype).unbind(1)
        g = grad_output.to(x.dtype).expand(x.shape[0])[:, None]
        grad = torch.zeros_like(x)
        if o.need_kd:
            log_p, log_q = self._probabilities(x, t, lse_t, lse_q)
            q = log_q.exp()
            if o.divergence == "forward_kl":
                d = q - log_p.exp()
            elif o.divergence == "reverse_kl":
                d = torch.where(q > 0, q * (log_q - log_p - divergence[:, None]), torch.zeros_like(q))
            elif o.divergence == "jsd":
                log_m = self._log_mixture(log_p, log_q)
                d = torch.where(q > 0, (1.0 - o.beta) * q * (log_q - log_m - constant[:, None]), torch.zeros_like(q))
            else:
                d = q * (0.5 * torch.sign(q - log_p.exp()) - constant[:, None])
            grad = grad + (o.kd_weight / o.temperature) * d
        if o.need_ce:
            ce = torch.exp(x - lse_r[:, None]) - o.label_smoothing / o.global_vocab
            owned = label_column >= 0
            rows = torch.nonzero(owned).squeeze(1)
            ce[rows, label_column[rows]] -= 1.0 - o.label_smoothing
            grad = grad + o.alpha * ce
        grad = grad * g
        if valid is not None:
            grad = torch.where(valid[:, None], grad, torch.zeros_like(grad))
        return out.copy_(grad)


class SparseShardLoss:
    """The top-k (SoftLabels) KD loss of one row chunk whose student logits are a shard.

    Every quantity the loss needs from the student is a global row sum of per-shard terms:
    the kept logits s_K (each owned by one rank), the log-sum-exp of the non-kept s/T (the
    tail bucket), and for the cross-entropy the log-sum-exp of s, s_y and Σ s. They are
    all-reduced; the remaining (k+1)-bucket math is the same on every rank and is
    differentiated with autograd on those small [rows, k+4] statistics, then mapped back to
    the shard's logits.
    """

    gradient_in_place = False

    @property
    def options(self) -> KDOptions:
        return self.o.options

    def __init__(self, options: _Options):
        self.o = options

    def _prepare(self, logits: Tensor, soft, labels: Optional[Tensor]):
        indices, logprobs, tail = soft
        dtype = torch.float64 if (logits.dtype == torch.float64 or logprobs.dtype == torch.float64) else torch.float32
        x = logits.to(dtype)
        valid, label_column = self.o.local_labels(labels, x.shape[1])
        if valid is not None:
            x = torch.where(valid[:, None], x, torch.zeros((), dtype=dtype, device=x.device))
        indices = indices.to(torch.int32).to(torch.int64) if indices.dtype == torch.uint16 else indices.to(torch.int64)
        local = indices - self.o.vocab_start
        owned = (local >= 0) & (local < x.shape[1])
        return x, local.clamp(0, x.shape[1] - 1), owned, valid, label_column

    def forward(self, logits: Tensor, soft, labels: Optional[Tensor], reduction: str):
        o = self.o
        x, local, owned, valid, label_column = self._prepare(logits, soft, labels)
        k = local.shape[1]
        scaled = x / o.temperature
        gathered = torch.where(owned, scaled.gather(1, local), torch.zeros((), dtype=x.dtype, device=x.device))
        not_kept = torch.ones_like(x, dtype=torch.bool)
        not_kept[torch.nonzero(owned, as_tuple=True)[0], local[owned]] = False
        values = [scaled.masked_fill(~not_kept, -math.inf)] + ([x] if o.need_ce else [])
        lse = _log_sum_exp(values, o.group)
        sums = [gathered]
        if o.need_ce:
            sums.append(o.cross_entropy_sums(x, label_column))
        partial = torch.cat(sums, 1)
        dist.all_reduce(partial, group=o.group)
        stats = torch.cat([partial[:, :k], lse[0][:, None], (lse[1] if o.need_ce else lse[0])[:, None],
                           partial[:, k:] if o.need_ce else x.new_zeros(x.shape[0], 2)], 1)
        row_loss = self._replicated_loss(stats, soft, valid)
        return o.reduce(row_loss, reduction), stats

    def _replicated_loss(self, stats: Tensor, soft, valid: Optional[Tensor]) -> Tensor:
        """Row losses from the all-reduced statistics [b_K, lse_tail, lse_1, s_y, Σ s] (differentiable)."""
        o = self.o
        _, logprobs, tail = soft
        k = logprobs.shape[1]
        kept, student_tail, lse_r, ce_sums = stats[:, :k], stats[:, k], stats[:, k + 1], stats[:, k + 2:]
        row_loss = stats.new_zeros(stats.shape[0])
        if o.need_kd:
            teacher_kept = logprobs.to(stats.dtype)
            if valid is not None:
                teacher_kept = torch.where(valid[:, None], teacher_kept, torch.zeros_like(teacher_kept))
            if o.tail_mode == "bucket" and k < o.global_vocab:
                teacher_tail = tail.to(stats.dtype)
                if valid is not None:
                    teacher_tail = torch.where(valid, teacher_tail, torch.zeros_like(teacher_tail))
                teacher_buckets = torch.cat([teacher_kept, teacher_tail[:, None]], 1)
                student_buckets = torch.cat([kept, student_tail[:, None]], 1)
            else:
                teacher_buckets, student_buckets = teacher_kept, kept
            log_p = teacher_buckets - torch.logsumexp(teacher_buckets, -1, keepdim=True)
            log_q = student_buckets - torch.logsumexp(student_buckets, -1, keepdim=True)
            row_loss = row_loss + o.kd_weight * reference.divergence_from_log_probs(log_p, log_q, o.divergence, o.beta)
        if o.need_ce:
            row_loss = row_loss + o.alpha * o.cross_entropy(ce_sums, lse_r)
        if valid is not None:
            row_loss = torch.where(valid, row_loss, torch.zeros_like(row_loss))
        return row_loss

    def gradient(self, logits: Tensor, soft, labels: Optional[Tensor], stats: Tensor, grad_output: Tensor,
                 reduction: str, out: Tensor) -> Tensor:
        o = self.o
        x, local, owned, valid, label_column = self._prepare(logits, soft, labels)
        k = local.shape[1]
        with torch.enable_grad():
            leaf = stats.detach().to(x.dtype).requires_grad_(True)
            row_loss = self._replicated_loss(leaf, soft, valid)
            (grad_stats,) = torch.autograd.grad(row_loss, leaf, grad_output.to(x.dtype).expand_as(row_loss))
        grad_kept, grad_tail, grad_lse_r = grad_stats[:, :k], grad_stats[:, k], grad_stats[:, k + 1]
        grad_label, grad_sum = grad_stats[:, k + 2], grad_stats[:, k + 3]
        scaled = x / o.temperature
        grad = torch.zeros_like(x)
        student_tail, lse_r = stats[:, k].to(x.dtype), stats[:, k + 1].to(x.dtype)
        kept_rows, kept_columns = torch.nonzero(owned, as_tuple=True)[0], local[owned]
        if o.need_kd and o.tail_mode == "bucket" and k < o.global_vocab:
            tail_share = torch.exp(scaled - torch.where(torch.isfinite(student_tail), student_tail,
                                                        torch.zeros_like(student_tail))[:, None])
            grad = grad + (grad_tail[:, None] / o.temperature) * tail_share
            grad[kept_rows, kept_columns] = 0.0  # kept entries are not in the tail bucket
        grad.index_put_((kept_rows, kept_columns), grad_kept[owned] / o.temperature, accumulate=True)
        if o.need_ce:
            grad = grad + grad_lse_r[:, None] * torch.exp(x - lse_r[:, None]) + grad_sum[:, None]
            label_rows = torch.nonzero(label_column >= 0).squeeze(1)
            grad[label_rows, label_column[label_rows]] += grad_label[label_rows]
        if valid is not None:
            grad = torch.where(valid[:, None], grad, torch.zeros_like(grad))
        return out.copy_(grad)


def _refuse_second_order(function: str) -> None:
    """Raises RuntimeError in a backward pass that records a graph (create_graph=True), eager mode."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{function} with process_group does not support second-order gradients (a backward pass with "
            f"create_graph=True): its gradient is computed from all-reduced row statistics without a graph. "
            f"Call {function} without process_group (on gathered logits) where a gradient of the gradient is needed."
        )


def _shard_loss(soft: bool, options: KDOptions, group, vocab_start: int, global_vocab: int):
    o = _Options(options, group, vocab_start, global_vocab)
    return SparseShardLoss(o) if soft else DenseShardLoss(o)


class _ShardRows(torch.autograd.Function):
    """Per-row losses of vocabulary-sharded logits; backward gives this shard's gradient."""

    @staticmethod
    def forward(ctx, student, teacher_tensors, labels, loss_fn, chunk_rows):
        soft = isinstance(loss_fn, SparseShardLoss)
        teacher = teacher_tensors if soft else teacher_tensors[0]
        losses, stats = [], []
        for start in range(0, student.shape[0], chunk_rows):
            stop = start + chunk_rows
            part = tuple(t[start:stop] for t in teacher) if soft else teacher[start:stop]
            loss, stat = loss_fn.forward(student[start:stop], part, labels[start:stop] if labels is not None else None,
                                         "none")
            losses.append(loss)
            stats.append(stat)
        ctx.save_for_backward(student, labels, torch.cat(stats) if stats else student.new_empty((0, 5)),
                              *(teacher if soft else (teacher,)))
        ctx.loss_fn, ctx.chunk_rows, ctx.soft = loss_fn, chunk_rows, soft
        return torch.cat(losses) if losses else student.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_rows):
        _refuse_second_order("sparse_kd_loss" if ctx.soft else "kd_loss")
        student, labels, stats, *teacher = ctx.saved_tensors
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.chunk_rows):
            stop = start + ctx.chunk_rows
            part = tuple(t[start:stop] for t in teacher) if ctx.soft else teacher[0][start:stop]
            ctx.loss_fn.gradient(student[start:stop], part, labels[start:stop] if labels is not None else None,
                                 stats[start:stop], grad_rows[start:stop], "none", grad[start:stop])
        return grad, None, None, None, None


def _reduce(row_loss: Tensor, labels: Optional[Tensor], reduction: str, ignore_index: int) -> Tensor:
    if reduction == "none":
        return row_loss
    return row_loss.sum() * reduction_scale(labels, row_loss.shape[0], reduction, ignore_index, row_loss.dtype,
                                            row_loss.device)


def kd_loss(student_rows: Tensor, teacher_rows, labels: Optional[Tensor], group, *, soft: bool, options: KDOptions,
            leading_shape, vocab_size: Optional[int] = None) -> Tensor:
    """Vocabulary-parallel `kd_loss` / `sparse_kd_loss` on flattened rows (validated by the caller).

    `teacher_rows` is the teacher's logits shard [rows, V_r] or, with `soft`, the replicated
    (indices, logprobs, tail) of SoftLabels holding global ids.
    """
    reduction, ignore_index = options.reduction, options.ignore_index
    vocab_start, global_vocab = shard_layout(student_rows.shape[1], group, student_rows.device)
    _check_vocab(vocab_size, global_vocab)
    _check_labels(labels, global_vocab, ignore_index)
    loss_fn = _shard_loss(soft, options, group, vocab_start, global_vocab)
    teacher_tensors = tuple(teacher_rows) if soft else (teacher_rows.detach(),)
    row_loss = _ShardRows.apply(student_rows, teacher_tensors, labels, loss_fn,
                                _chunk_rows(student_rows.shape[0], global_vocab, group))
    loss = _reduce(row_loss, labels, reduction, ignore_index)
    return loss.reshape(leading_shape) if reduction == "none" else loss


def _teacher_and_labels(tensors) -> tuple:
    """The chunk loops' teacher arguments and labels from `tensors` (teacher logits, hidden, weight,
    bias, columns, soft indices, logprobs, tail, labels): the soft-label triple becomes one argument."""
    soft = tuple(tensors[5:8]) if tensors[5] is not None else None
    return tuple(tensors[:5]) + (soft, tensors[8])


class _FusedLinearShard(torch.autograd.Function):
    """`fused_linear_kd_loss` with a vocabulary-sharded lm_head; grad_hidden is all-reduced."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tensors, loss_fn, chunk_rows, softcap, compute_grads):
        options = loss_fn.options
        # no kernels here, so forward_outputs allocates no statistics: run_forward sizes them for the shard loss
        loss, _, grad_hidden, grad_weight, grad_bias = fused_linear_ops.forward_outputs(
            hidden, weight, bias, tensors[5] is not None, compute_grads, False, options)
        per_row = options.reduction == "none"
        grads = (grad_hidden, grad_weight, grad_bias if bias is not None else None)
        row_stats = fused_linear_ops.run_forward(hidden, weight, bias, *_teacher_and_labels(tensors), loss, None,
                                                 grads if compute_grads and not per_row else None, chunk_rows,
                                                 softcap, loss_fn)
        if per_row:
            ctx.save_for_backward(row_stats, hidden, weight, bias, *tensors)
        else:
            dist.all_reduce(grad_hidden, group=loss_fn.o.group)
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.loss_fn, ctx.chunk_rows, ctx.softcap = loss_fn, chunk_rows, softcap
        ctx.has_bias = bias is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        _refuse_second_order("fused_linear_kd_loss")
        if ctx.loss_fn.options.reduction != "none":
            grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
            g = grad_loss.to(compute_dtype(grad_weight))  # one rounding: the products are computed in this dtype
            return (grad_hidden * g, grad_weight * g, grad_bias * g if ctx.has_bias else None) + (None,) * 5
        row_stats, hidden, weight, bias, *tensors = ctx.saved_tensors
        grads = (torch.empty_like(hidden), torch.empty_like(weight), torch.empty_like(bias) if ctx.has_bias else None)
        fused_linear_ops.run_backward(grad_loss, row_stats, hidden, weight, bias, *_teacher_and_labels(tensors), grads,
                                      ctx.chunk_rows, ctx.softcap, ctx.loss_fn)
        dist.all_reduce(grads[0], group=ctx.loss_fn.o.group)
        return grads + (None,) * 5


def fused_linear_kd_loss(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                         teacher_columns, soft, labels, chunk_size, softcap, group, *, divergence, tail_mode, reduction,
                         temperature, alpha, beta, label_smoothing, t2_scale, ignore_index, leading_shape,
                         soft_vocab: Optional[int] = None) -> Tensor:
    """Vocabulary-parallel `fused_linear_kd_loss` on flattened rows (validated by the caller).

    `weight` is this rank's [V_r, H] shard of the lm_head (and `bias` its [V_r] slice); the
    teacher is its logits shard [rows, V_r], its hidden states with the matching [V_r, H_t]
    weight shard, or replicated SoftLabels with global ids. `hidden` is replicated.
    """
    if teacher_columns is not None:
        raise ValueError("fused_linear_kd_loss: vocab_mapping is not supported with process_group; shard the "
                         "teacher's vocabulary like the student's instead")
    options = KDOptions(divergence=divergence, tail=tail_mode, reduction=reduction, temperature=temperature,
                        alpha=alpha, beta=beta, label_smoothing=label_smoothing, t2_scale=t2_scale,
                        ignore_index=ignore_index)
    vocab_start, global_vocab = shard_layout(weight.shape[0], group, hidden.device)
    _check_vocab(soft_vocab, global_vocab)
    _check_labels(labels, global_vocab, ignore_index)
    loss_fn = _shard_loss(soft[0] is not None, options, group, vocab_start, global_vocab)
    # every rank must run the same number of chunks (one set of collectives per chunk): sized
    # from the global vocabulary, never from this rank's shard
    world = dist.get_world_size(group)
    logits_dtype = compute_dtype(hidden) if softcap > 0 else hidden.dtype  # soft-capped logits: compute dtype
    chunk_rows = chunk_size or fused_linear_ops.default_chunk_rows(hidden.shape[0], -(-global_vocab // world),
                                                                   logits_dtype, hidden.device)
    tensors = (teacher_logits, teacher_hidden, teacher_weight, teacher_bias, None, *soft, labels)
    loss = _FusedLinearShard.apply(hidden, weight, bias, tensors, loss_fn, chunk_rows, softcap, torch.is_grad_enabled())
    return loss.reshape(leading_shape) if reduction == "none" else loss
