"""bfloat16/float16 inputs of the method family: float32 math, one rounding of each gradient.

When a loss is a sum of terms that each read the same low-precision student tensor, the
terms' gradients must add up in float32 and be rounded to the student's dtype once: the
error against the float64 oracle (the same loss on float64 copies of the inputs) must stay
within one rounding of the result, 2^-8 relative for bfloat16 (2^-11 for float16), plus a
float32-sized term. Covers relational KD (distance + angle parts) and the registry methods
whose terms read the logits separately (α·CE with `mse` or `dkd`, the adversarial term).
Also: `DistillationMethod` validates its options when built, like `build_method`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdfast.methods import MethodSpec, build_method, relational_kd_loss
from kdfast.methods.registry import DistillationMethod

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FLOAT32_SLACK = 1e-5


def _assert_within_one_rounding(actual: torch.Tensor, exact: torch.Tensor) -> None:
    assert actual.dtype in UNIT_ROUNDOFF
    difference = (actual.double() - exact).abs()
    allowed = UNIT_ROUNDOFF[actual.dtype] * exact.abs() + FLOAT32_SLACK * exact.abs().max()
    worst = float(((difference - allowed) / exact.abs().max()).max())
    assert bool((difference <= allowed).all()), f"error exceeds one {actual.dtype} rounding by {worst:.3g} of max"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relational_gradient_is_rounded_once(dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(12, 16, generator=generator).to(dtype).requires_grad_()
    teacher = torch.randn(12, 24, generator=generator).to(dtype)
    loss = relational_kd_loss(student, teacher, distance_weight=1.0, angle_weight=2.0)
    (grad,) = torch.autograd.grad(loss, student)
    exact_student = student.detach().double().requires_grad_()
    exact_loss = relational_kd_loss(exact_student, teacher.double(), distance_weight=1.0, angle_weight=2.0)
    (exact_grad,) = torch.autograd.grad(exact_loss, exact_student)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert abs(float(loss.detach()) - float(exact_loss.detach())) <= 1e-5 * abs(float(exact_loss.detach()))
    _assert_within_one_rounding(grad, exact_grad)


@pytest.mark.parametrize("name, options", [
    ("mse", dict(alpha=0.5)),
    ("dkd", dict(alpha=0.5)),
    ("adversarial", dict(alpha=0.3, num_classes=40, weight=1.0)),
    ("kd", dict(alpha=0.5)),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_method_logit_gradient_is_rounded_once(name, options, dtype):
    torch.manual_seed(0)
    method = build_method(name, temperature=2.0, **options).eval()  # eval: no discriminator step
    oracle = copy.deepcopy(method).double()
    generator = torch.Generator().manual_seed(1)
    student = (torch.randn(16, 40, generator=generator) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(16, 40, generator=generator) * 3).to(dtype)
    labels = torch.randint(0, 40, (16,), generator=generator)
    labels[3] = -100
    (grad,) = torch.autograd.grad(method(student, teacher, labels), student)
    exact_student = student.detach().double().requires_grad_()
    (exact_grad,) = torch.autograd.grad(oracle(exact_student, teacher.double(), labels), exact_student)
    assert grad.dtype == dtype
    _assert_within_one_rounding(grad, exact_grad)


@pytest.mark.parametrize("options, error", [
    (dict(temperature=0.0), ValueError),
    (dict(temperature=float("inf")), ValueError),
    (dict(alpha=-0.5), ValueError),
    (dict(weight=-1.0), ValueError),
    (dict(ignore_index=0.5), TypeError),
])
def test_distillation_method_validates_at_construction(options, error):
    spec = MethodSpec("mse", None, 0.0, "logit MSE")
    arguments = dict(temperature=2.0, alpha=0.5, weight=0.0, ignore_index=-100) | options
    option = next(iter(options))
    with pytest.raises(error, match=option) as built:
        DistillationMethod("mse", spec, **arguments)
    with pytest.raises(error, match=option) as from_registry:
        build_method("mse", **options)
    assert str(built.value) == str(from_registry.value)
