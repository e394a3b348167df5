"""The elementary functions of the shared per-row math (csrc/include/kdfast/rowmath.h):
`exp_f32` and `log_f32`, which every CPU and CUDA kernel uses, held to the accuracy their
comments state, against float64, through the test hook `kdfast._C.rowmath_exp_log`.
"""

import pytest
import torch

from kdfast.ops._native import native_module


def _exp_log(values: torch.Tensor):
    values = values.to(torch.float32).contiguous()
    exp_out = torch.full_like(values, float("nan"))  # poisoned: every entry must be written
    log_out = torch.full_like(values, float("nan"))
    native_module().rowmath_exp_log(values.data_ptr(), values.numel(), exp_out.data_ptr(), log_out.data_ptr())
    return exp_out, log_out


def test_exp_relative_error_below_stated_bound():
    x = torch.linspace(-87.0, 0.0, 2_000_001, dtype=torch.float32)
    exp_out, _ = _exp_log(x)
    exact = torch.exp(x.double())
    relative = ((exp_out.double() - exact).abs() / exact).max().item()
    assert relative < 3e-7, relative
    # and close to the float32 rounding limit near 0, where the sums are dominated
    near_zero = x > -1.0
    assert ((exp_out.double() - exact).abs() / exact)[near_zero].max().item() < 3e-7


def test_exp_is_exactly_zero_below_minus_87_and_for_minus_inf():
    x = torch.tensor([-87.5, -100.0, -1e4, -3.0e38, float("-inf")])
    exp_out, _ = _exp_log(x)
    assert torch.equal(exp_out, torch.zeros_like(x))
    assert torch.isnan(_exp_log(torch.tensor([float("nan")]))[0]).all()


def test_exp_of_zero_is_one():
    assert _exp_log(torch.zeros(3))[0].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("low_exponent, high_exponent", [(-149, -126), (-126, -1), (-1, 1), (1, 127)])
def test_log_error_below_stated_bound(low_exponent, high_exponent):
    exponents = torch.linspace(low_exponent, high_exponent, 500_001, dtype=torch.float64)
    x = torch.exp2(exponents).to(torch.float32)
    x = x[x > 0]
    _, log_out = _exp_log(x)
    exact = torch.log(x.double())
    error = (log_out.double() - exact).abs() / exact.abs().clamp(min=1.0)  # absolute below |log| = 1
    assert error.max().item() < 1.2e-7, error.max().item()


def test_log_special_values():
    _, log_out = _exp_log(torch.tensor([0.0, 1.0, float("inf"), -1.0]))
    assert log_out[0].item() == float("-inf")
    assert log_out[1].item() == 0.0
    assert torch.isnan(log_out[3])
