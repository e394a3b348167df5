"""Tests of `kdfast.functional.multi_teacher_kd_loss` with M `kdfast.SoftLabels` teachers.

Oracles, all float64: for combine="sum", Σ_m w̄_m times the per-row
`kdfast.reference.sparse_kd_loss` against each teacher, reduced as asked; with k = V in
bucket mode, the dense `kdfast.methods.multi_teacher_kd_loss` on the raw teacher logits
(both combine modes, teachers sharing indices). For combine="mixture" with shared indices
and k < V: `reference.sparse_kd_loss` against the mixture built in probability space
(p̄_K = Σ w̄_m p_mK, p̄_tail = Σ w̄_m p_m,tail). Also: per-row weights, float32 within
2e-5 of the float64 oracle, grad_output ≠ 1, ignored rows, and the errors (mixture with
different indices, mixed tensor / SoftLabels teachers, temperature mismatch).
"""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast import functional, reference
from kdfast.methods import multi_teacher_kd_loss as plain_loss
from kdfast.softlabels import SoftLabels

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
TAILS = ("bucket", "renormalize")
REDUCTIONS = ("mean", "sum", "none", "batchmean")
TEMPERATURE = 2.0


def make_case(num_teachers, leading_shape, vocab, k, seed, ignored_fraction=0.3):
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(leading_shape) + (vocab,)
    student = 3.0 * torch.randn(shape, generator=generator, dtype=torch.float64)
    teachers = 3.0 * torch.randn((num_teachers,) + shape, generator=generator, dtype=torch.float64)
    soft_labels = [kdfast.compress_topk(t.float(), k, temperature=TEMPERATURE) for t in teachers]
    labels = torch.randint(0, vocab, tuple(leading_shape), generator=generator)
    labels[torch.rand(tuple(leading_shape), generator=generator) < ignored_fraction] = -100
    labels.reshape(-1)[0] = 1
    return student, teachers, soft_labels, labels


def shared_soft_labels(teachers, indices):
    """SoftLabels of every teacher at the same kept `indices` [..., k] (float64, exact tail)."""
    result = []
    for teacher in teachers:
        log_probs = torch.log_softmax(teacher / TEMPERATURE, dim=-1)
        kept = log_probs.gather(-1, indices)
        outside = log_probs.scatter(-1, indices, float("-inf"))
        result.append(SoftLabels(indices=indices, logprobs=kept, tail_logprob=outside.logsumexp(-1),
                                 temperature=TEMPERATURE, vocab_size=teacher.shape[-1]))
    return result


def loss_and_grad(fn, student, teachers, labels, seed, **options):
    leaf = student.detach().clone().requires_grad_(True)
    loss = fn(leaf, teachers, labels, **options)
    generator = torch.Generator().manual_seed(seed)
    grad_output = (torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5).to(loss.dtype)
    loss.backward(grad_output)
    return loss.detach(), leaf.grad


def weighted_sparse_oracle(student, soft_labels, labels, *, weights, reduction, **options):
    """Σ_m w̄_m ℓ_m in float64 from the sparse reference, per row, then reduced."""
    rows = labels.numel()
    valid = labels.reshape(-1) != -100
    weight_rows = torch.as_tensor(weights, dtype=torch.float64).reshape(len(soft_labels), -1).expand(-1, rows)
    weight_rows = weight_rows / weight_rows.sum(0, keepdim=True)
    total = 0.0
    for teacher, weight in zip(soft_labels, weight_rows):
        row_loss = reference.sparse_kd_loss(student, teacher, labels, reduction="none", temperature=TEMPERATURE,
                                            **options)
        total = total + weight * row_loss.reshape(-1).double()
    total = total.reshape(labels.shape)
    if reduction == "none":
        return total
    if reduction == "sum":
        return total.sum()
    if reduction == "batchmean":
        return total.sum() / rows
    return total.sum() / valid.sum().clamp_min(1)


def assert_close_to_oracle(loss, grad, ref_loss, ref_grad, rtol):
    assert (loss.double() - ref_loss).abs().max() <= rtol * ref_loss.abs().max() + 1e-6
    assert (grad.double() - ref_grad).abs().max() <= rtol * ref_grad.abs().max() + 1e-7


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sum_matches_weighted_sparse_reference(divergence, tail, reduction):
    student, _, soft_labels, labels = make_case(3, (2, 5), 301, 17, seed=1)
    options = dict(divergence=divergence, tail=tail, alpha=0.3, label_smoothing=0.1, beta=0.3)
    weights = [1.0, 2.0, 0.5]
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 2e-5)):
        loss, grad = loss_and_grad(functional.multi_teacher_kd_loss, student.to(dtype), soft_labels, labels, seed=2,
                                   weights=weights, reduction=reduction, temperature=TEMPERATURE, **options)
        ref_loss, ref_grad = loss_and_grad(weighted_sparse_oracle, student.to(dtype).double(), soft_labels, labels,
                                           seed=2, weights=weights, reduction=reduction, **options)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert grad.dtype == dtype
        assert_close_to_oracle(loss, grad, ref_loss, ref_grad, rtol)
        assert bool((grad[labels == -100] == 0).all())


@pytest.mark.parametrize("combine", ("sum", "mixture"))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_full_vocabulary_bucket_equals_dense_multi_teacher(divergence, combine):
    student, teachers, _, labels = make_case(3, (7,), 23, 23, seed=3)
    # Shared indices: a random permutation of the vocabulary per row.
    generator = torch.Generator().manual_seed(4)
    indices = torch.stack([torch.randperm(23, generator=generator) for _ in range(7)])
    soft_labels = shared_soft_labels(teachers, indices)
    weights = torch.rand(3, 7, generator=generator, dtype=torch.float64) + 0.1  # per row
    options = dict(combine=combine, divergence=divergence, weights=weights, temperature=TEMPERATURE, alpha=0.2,
                   reduction="none")
    loss, grad = loss_and_grad(functional.multi_teacher_kd_loss, student, soft_labels, labels, seed=5, **options)
    ref_loss, ref_grad = loss_and_grad(plain_loss, student, list(teachers), labels, seed=5, **options)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_mixture_with_shared_indices_matches_probability_space_mixture(divergence, tail):
    student, teachers, _, labels = make_case(3, (3, 4), 401, 9, seed=6)
    indices = torch.topk(teachers[0], 9, dim=-1).indices  # teacher 0's top 9, shared by all
    soft_labels = shared_soft_labels(teachers, indices)
    weights = [0.2, 0.5, 0.3]
    mixed = SoftLabels(
        indices=indices,
        logprobs=sum(w * t.logprobs.exp() for w, t in zip(weights, soft_labels)).log(),
        tail_logprob=sum(w * t.tail_logprob.exp() for w, t in zip(weights, soft_labels)).log(),
        temperature=TEMPERATURE, vocab_size=401)
    options = dict(divergence=divergence, tail=tail, temperature=TEMPERATURE, alpha=0.4, reduction="sum")
    for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 2e-5)):
        loss, grad = loss_and_grad(functional.multi_teacher_kd_loss, student.to(dtype), soft_labels, labels, seed=7,
                                   combine="mixture", weights=weights, **options)
        ref_loss, ref_grad = loss_and_grad(reference.sparse_kd_loss, student.to(dtype).double(), mixed, labels,
                                           seed=7, **options)
        assert_close_to_oracle(loss, grad, ref_loss, ref_grad, rtol)


def test_mixture_with_different_indices_raises():
    student, _, soft_labels, labels = make_case(2, (4,), 50, 5, seed=8)
    with pytest.raises(ValueError, match="same tokens"):
        functional.multi_teacher_kd_loss(student, soft_labels, labels, combine="mixture", temperature=TEMPERATURE)


def test_bad_teacher_sequences_raise():
    student, teachers, soft_labels, labels = make_case(2, (4,), 50, 5, seed=9)
    with pytest.raises(TypeError, match="all tensors or all"):
        functional.multi_teacher_kd_loss(student, [soft_labels[0], teachers[1]], labels, temperature=TEMPERATURE)
    with pytest.raises(ValueError, match="temperature"):
        functional.multi_teacher_kd_loss(student, soft_labels, labels, temperature=1.0)
    with pytest.raises(ValueError, match="tail"):
        functional.multi_teacher_kd_loss(student, soft_labels, labels, temperature=TEMPERATURE, tail="spread")


def test_every_row_ignored_gives_zero():
    student, _, soft_labels, labels = make_case(2, (4,), 50, 5, seed=10)
    labels[:] = -100
    loss, grad = loss_and_grad(functional.multi_teacher_kd_loss, student.float(), soft_labels, labels, seed=11,
                               temperature=TEMPERATURE, alpha=0.5)
    assert float(loss) == 0.0 and bool((grad == 0).all())


def test_module_takes_soft_labels():
    student, _, soft_labels, labels = make_case(2, (4,), 60, 6, seed=12)
    module = kdfast.MultiTeacherKDLoss(weights=[1.0, 3.0], temperature=TEMPERATURE, tail="renormalize", alpha=0.2)
    expected = functional.multi_teacher_kd_loss(student, soft_labels, labels, weights=[1.0, 3.0],
                                                temperature=TEMPERATURE, tail="renormalize", alpha=0.2)
    bucket = functional.multi_teacher_kd_loss(student, soft_labels, labels, weights=[1.0, 3.0],
                                              temperature=TEMPERATURE, alpha=0.2)
    torch.testing.assert_close(module(student, soft_labels, labels), expected, rtol=0, atol=0)
    assert not torch.allclose(expected, bucket)
