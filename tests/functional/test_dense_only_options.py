"""The dense loss's options that only `kdfast.compat` sets: `teacher_entropy` (forward_kl as the
soft-target cross-entropy −Σ p·log q) and `divergence_weight` (a factor folded into τ).

Loss and gradient of `kdfast.functional.dense.kd_loss_with_options` against the float64
reference on every path the kernels take (forward only, one-pass, two-pass, in-place), over
shapes × dtypes × reductions, with masked (−inf) vocabulary entries; the reference itself
against KL(p‖q) + H(p); and the other losses' refusal of these options.
"""

from __future__ import annotations

import math

import pytest
import torch

from kd_checks import DTYPE_IDS, check_against_reference, stable_seed
from kd_inputs import build_kd_inputs
from kdfast import reference
from kdfast.contract.options import KDOptions
from kdfast.functional.dense import kd_loss_with_options
from kdfast.ops import kd_loss as kd_ops
from kdfast.ops import multi_teacher as multi_teacher_ops
from kdfast.ops import sparse as sparse_ops

SHAPES = [(3, 17), (4, 1000), (2, 4099)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
REDUCTIONS = ["sum", "mean", "none"]


def _inputs(rows, vocab, dtype, seed):
    student, teacher, labels = build_kd_inputs((rows,), vocab, seed=seed, student_dtype=dtype,
                                               ignored_fraction=0.25)
    # Masked vocabulary entries: −inf in both models, and −inf in the teacher only.
    student[:, 1] = -math.inf
    teacher[:, 1] = -math.inf
    teacher[0, 2:5] = -math.inf
    labels = torch.where(labels == 1, 0, labels)  # no label on the masked entry (CE would be inf)
    return student, teacher, labels


def _loss(path):
    def run(student, teacher, labels, **options):
        opts = KDOptions.of(**options)
        if path == "two_pass":
            return kd_ops.kd_loss(student, teacher, labels, opts, one_pass=False)
        if path == "inplace":
            return kd_loss_with_options(student * 1.0, teacher, labels, opts, inplace_backward=True)
        return kd_loss_with_options(student, teacher, labels, opts)
    return run


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("rows, vocab", SHAPES)
@pytest.mark.parametrize("path", ["one_pass", "two_pass", "inplace"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_soft_cross_entropy_matches_reference(path, rows, vocab, dtype, reduction, alpha):
    if path == "inplace" and dtype != torch.float32:
        # a 16-bit in-place gradient is scaled where it lies for grad_output != 1 (rounded twice,
        # as test_one_pass checks); float64 takes float32's route
        pytest.skip("in place: float32 only here")
    context = f"{path}-{rows}x{vocab}-{dtype}-{reduction}-a{alpha}"
    student, teacher, labels = _inputs(rows, vocab, dtype, stable_seed(context))
    if path == "two_pass":
        # the ops layer takes [rows, V] rows; labels must be contiguous int64 (the functional layer's job)
        labels = labels.contiguous()
    check_against_reference(student, teacher, labels, reduction=reduction, context=context,
                            loss_function=_loss(path), divergence="forward_kl", temperature=2.0, alpha=alpha,
                            teacher_entropy=True, divergence_weight=0.37)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_divergence_weight_scales_loss_and_gradient(divergence, dtype):
    context = f"weight-{divergence}-{dtype}"
    student, teacher, labels = _inputs(5, 300, dtype, stable_seed(context))
    check_against_reference(student, teacher, labels, reduction="mean", context=context,
                            loss_function=_loss("one_pass"), divergence=divergence, temperature=1.5, alpha=0.0,
                            divergence_weight=2.5)


def test_forward_loss_without_grad_equals_cross_entropy():
    student, teacher, labels = _inputs(4, 1000, torch.float32, 7)
    options = KDOptions.of(reduction="none", temperature=1.0, teacher_entropy=True)
    with torch.no_grad():
        loss = kd_loss_with_options(student, teacher, labels, options)
    p = torch.softmax(teacher.double(), -1)
    log_q = torch.log_softmax(student.double(), -1)
    expected = -(p * torch.where(p > 0, log_q, 0.0)).sum(-1)
    expected = torch.where(labels != -100, expected, 0.0)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=1e-6)


def test_reference_soft_cross_entropy_is_kl_plus_teacher_entropy():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(6, 50, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(6, 50, generator=generator, dtype=torch.float64) * 3
    teacher[:, :4] = -math.inf
    kl = reference.kd_loss(student, teacher, reduction="none", temperature=2.0)
    soft_ce = reference.kd_loss(student, teacher, reduction="none", temperature=2.0, teacher_entropy=True)
    p = torch.softmax(teacher / 2.0, -1)
    entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)
    torch.testing.assert_close(soft_ce, kl + 4.0 * entropy, rtol=1e-12, atol=1e-12)


def test_other_losses_refuse_dense_only_options():
    student = torch.randn(2, 10)
    for options in (KDOptions(teacher_entropy=True), KDOptions(divergence_weight=0.5)):
        with pytest.raises(ValueError, match="dense loss only"):
            sparse_ops.sparse_kd_loss(student, torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1),
                                      torch.zeros(2), None, options)
        with pytest.raises(ValueError, match="dense loss only"):
            multi_teacher_ops.multi_teacher_kd_loss(student, [torch.randn(2, 10)], torch.ones(1, 2), None, options)
