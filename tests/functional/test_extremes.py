"""Extreme temperatures and logits at the ends of the float32 range, against the float64 oracle.

Every temperature the contract accepts, from 1e-20 to 1e20, gives a loss and a gradient within
float32 accuracy of `kdfast.reference` (the rule of tests/fp32_rows.py) for the dense, sparse
and multi-teacher losses, and one outside that range raises ValueError in every entry point.
Logits up to ±3.4e38 (finite, opposite signs in one row, so that x − max overflows float) do
the same. The vector lanes' exp(x/T) (csrc/cpu/exp_lanes.h) keeps its stated accuracy for scales
1/T from 1e-30 to 1e30 on every CPU variant. The `cuda` cases run where a GPU is visible.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdfast
from fp32_rows import assert_rows_match, finite_spread, row_tolerances, sparse_tvd_ties, with_grad
from kd_checks import stable_seed
from kdfast import functional, reference
from kdfast.ops._native import native_module
from kdfast.softlabels import SoftLabels

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
TEMPERATURES = (1e-20, 1e-14, 1e-7, 1e-3, 0.7, 3.0, 1e3, 1e7, 1e14, 1e20)
ROWS, VOCAB = 4, 301


def make_rows(seed: int, scale: float, teachers: int = 1):
    generator = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64)).float()
    teacher = (scale * torch.randn(teachers, ROWS, VOCAB, generator=generator, dtype=torch.float64)).float()
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    grad_output = torch.rand(ROWS, generator=generator, dtype=torch.float64) + 0.5
    return student, teacher, labels, grad_output


def check_dense(device, student, teacher, labels, grad_output, context, **options):
    loss, grad = with_grad(functional.kd_loss, student, device, grad_output, teacher.to(device), labels.to(device),
                           **options)
    expected, expected_grad = with_grad(reference.kd_loss, student.double(), "cpu", grad_output, teacher.double(),
                                        labels, **options)
    loss_atol, grad_atol = row_tolerances(student, finite_spread(teacher) / options["temperature"],
                                          temperature=options["temperature"], alpha=options["alpha"], t2_scale=True,
                                          divergence=options["divergence"], grad_weights=grad_output)
    assert_rows_match(loss, expected, grad, expected_grad, loss_atol, grad_atol, context)
    return loss


@pytest.mark.parametrize("temperature", TEMPERATURES, ids=lambda t: f"T={t:g}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kd_loss_every_temperature(device, divergence, temperature):
    context = f"kd_loss/{divergence}/T={temperature:g}"
    student, teachers, labels, grad_output = make_rows(stable_seed(context), 3.0)
    loss = check_dense(device, student, teachers[0], labels, grad_output, context, divergence=divergence,
                       temperature=temperature, alpha=0.5, label_smoothing=0.1)
    assert bool(torch.isfinite(loss).all()), f"{context}: {loss}"


@pytest.mark.parametrize("temperature", TEMPERATURES, ids=lambda t: f"T={t:g}")
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_kd_loss_every_temperature(device, divergence, tail, temperature):
    context = f"sparse/{divergence}/{tail}/T={temperature:g}"
    student, teachers, labels, grad_output = make_rows(stable_seed(context), 3.0)
    soft = kdfast.compress_topk(teachers[0].to(device), 16, temperature=temperature)
    options = dict(divergence=divergence, alpha=0.5, label_smoothing=0.1, tail=tail)
    loss, grad = with_grad(functional.sparse_kd_loss, student, device, grad_output, soft, labels.to(device),
                           **options)
    oracle_soft = SoftLabels(indices=soft.indices.cpu(), logprobs=soft.logprobs.cpu().double(),
                             tail_logprob=soft.tail_logprob.cpu().double(), temperature=temperature,
                             vocab_size=VOCAB)
    expected, expected_grad = with_grad(reference.sparse_kd_loss, student.double(), "cpu", grad_output, oracle_soft,
                                        labels, **options)
    spread = finite_spread(torch.cat([oracle_soft.logprobs, oracle_soft.tail_logprob[:, None]], -1))
    ties = sparse_tvd_ties(student, oracle_soft.indices, oracle_soft.logprobs, oracle_soft.tail_logprob, temperature,
                           tail)
    loss_atol, grad_atol = row_tolerances(student, spread, temperature=temperature, alpha=0.5, t2_scale=True,
                                          divergence=divergence, grad_weights=grad_output, tvd_ties=ties)
    assert_rows_match(loss, expected, grad, expected_grad, loss_atol, grad_atol, context)
    assert bool(torch.isfinite(loss).all()), f"{context}: {loss}"


@pytest.mark.parametrize("temperature", TEMPERATURES, ids=lambda t: f"T={t:g}")
@pytest.mark.parametrize("combine", ["sum", "mixture"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_multi_teacher_every_temperature(device, divergence, combine, temperature):
    context = f"multi/{divergence}/{combine}/T={temperature:g}"
    student, teachers, labels, grad_output = make_rows(stable_seed(context), 3.0, teachers=2)
    options = dict(divergence=divergence, temperature=temperature, alpha=0.5, label_smoothing=0.1, combine=combine)
    loss, grad = with_grad(functional.multi_teacher_kd_loss, student, device, grad_output,
                           [t.to(device) for t in teachers], labels.to(device), **options)
    expected, expected_grad = with_grad(reference.multi_teacher_kd_loss, student.double(), "cpu", grad_output,
                                        [t.double() for t in teachers], labels, **options)
    spread = torch.stack([finite_spread(t) for t in teachers]).amax(0) / temperature
    loss_atol, grad_atol = row_tolerances(student, spread, temperature=temperature, alpha=0.5, t2_scale=True,
                                          divergence=divergence, grad_weights=grad_output)
    assert_rows_match(loss, expected, grad, expected_grad, loss_atol, grad_atol, context)
    assert bool(torch.isfinite(loss).all()), f"{context}: {loss}"


@pytest.mark.parametrize("temperature", [1e-21, 1e21, 0.0, -1.0, math.inf, math.nan], ids=str)
def test_temperature_outside_the_range_raises(temperature):
    student, teachers, labels, _ = make_rows(0, 3.0, teachers=2)
    calls = [
        lambda: functional.kd_loss(student, teachers[0], labels, temperature=temperature),
        lambda: reference.kd_loss(student, teachers[0], labels, temperature=temperature),
        lambda: kdfast.compress_topk(teachers[0], 4, temperature=temperature),
        lambda: functional.multi_teacher_kd_loss(student, list(teachers), labels, temperature=temperature),
        lambda: functional.sparse_kd_loss(student, kdfast.compress_topk(teachers[0], 4), labels,
                                          temperature=temperature),
        lambda: functional.fused_linear_kd_loss(student[:, :8], torch.randn(VOCAB, 8), teachers[0], labels,
                                                temperature=temperature),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="temperature"):
            call()


@pytest.mark.parametrize("temperature", [1e-3, 1.0, 100.0], ids=lambda t: f"T={t:g}")
@pytest.mark.parametrize("alpha,label_smoothing", [(0.0, 0.0), (0.5, 0.1)])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_logits_at_the_ends_of_the_float32_range(device, divergence, alpha, label_smoothing, temperature):
    context = f"range/{divergence}/alpha={alpha}/T={temperature:g}"
    student, teachers, labels, grad_output = make_rows(stable_seed(context), 1e37)
    teacher = teachers[0]
    top = torch.finfo(torch.float32).max
    student[0, 0], student[0, 1], teacher[0, 2] = top, -top, -top  # x − max overflows float in row 0
    teacher[1, 5], teacher[1, 6] = top, -top
    student[2, 4] = -top
    check_dense(device, student, teacher, labels, grad_output, context, divergence=divergence,
                temperature=temperature, alpha=alpha, label_smoothing=label_smoothing)


def _supported_variants():
    module = native_module()
    probe = torch.zeros(1)
    return [name for name in module.build_info()["cpu_variants"]
            if module.cpu_scaled_exp(name, probe.data_ptr(), 1, 1.0, True, probe.data_ptr())]


@pytest.mark.parametrize("inv_t", [1e-30, 1e-12, 1e-3, 0.37, 7.0, 1e6, 1e13, 1e30], ids=lambda v: f"1/T={v:g}")
@pytest.mark.parametrize("variant", _supported_variants())
def test_lanes_exp_every_scale(variant, inv_t):
    """exp(x / T) of the CPU lanes at scales whose powers leave the float range (where the
    polynomial cannot have 1/T folded into its coefficients): relative error below 2e-7 on
    [-87, 0] in x / T, 0 below, NaN for NaN."""
    inv_t = float(torch.tensor(inv_t, dtype=torch.float32))
    x = (torch.linspace(-87.0, 0.0, 200_003, dtype=torch.float64) / inv_t).float()
    x = torch.cat([x, torch.tensor([-88.5 / inv_t, float("-inf"), float("nan")], dtype=torch.float32)])
    out = torch.full_like(x, float("nan"))
    assert native_module().cpu_scaled_exp(variant, x.data_ptr(), x.numel(), inv_t, True, out.data_ptr())
    exact = torch.exp(x.double() * inv_t)
    keep = x.double() * inv_t >= -86.99
    relative = ((out.double() - exact).abs() / exact)[keep].max().item()
    assert relative < 2e-7, relative
    assert out[-3].item() == 0.0 and out[-2].item() == 0.0 and math.isnan(out[-1].item())
