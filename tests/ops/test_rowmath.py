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


# ---- exp(x / T) of the CPU kernels' vector lanes (csrc/cpu/exp_scalar.h and exp_lanes.h, ScaledExp) ----

def _supported_variants():
    module = native_module()
    probe = torch.zeros(1)
    return [name for name in module.build_info()["cpu_variants"]
            if module.cpu_scaled_exp(name, probe.data_ptr(), 1, 1.0, True, probe.data_ptr())]


def _scaled_exp(variant, values, temperature, cutoff=True):
    values = values.to(torch.float32).contiguous()
    out = torch.full_like(values, float("nan"))  # poisoned: every entry must be written
    inv_t = float(torch.tensor(1.0 / temperature, dtype=torch.float32))
    assert native_module().cpu_scaled_exp(variant, values.data_ptr(), values.numel(), inv_t, cutoff, out.data_ptr())
    return out, inv_t


VARIANTS = _supported_variants()
TEMPERATURES = [0.7, 1.0, 2.0, 3.0, 20.0]


def test_lanes_exp_covers_baseline_and_the_selected_variant():
    assert "baseline" in VARIANTS
    assert native_module().build_info()["cpu_variant_selected"] in VARIANTS


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_lanes_exp_relative_error_below_stated_bound(variant, temperature):
    # x / T over [-87, 0]; x itself is the float the kernels hold (a logit minus its maximum).
    x = (torch.linspace(-87.0, 0.0, 1_000_003, dtype=torch.float64) * temperature).float()
    out, inv_t = _scaled_exp(variant, x, temperature)
    exact = torch.exp(x.double() * inv_t)
    keep = x.double() * inv_t >= -86.99  # the cutoff itself is compared in float
    relative = ((out.double() - exact).abs() / exact)[keep].max().item()
    assert relative < 2e-7, relative


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_lanes_exp_special_values_and_unchecked_form(variant, temperature):
    cutoff = -87.0 * temperature
    x = torch.tensor([0.0, -0.0, cutoff * 1.001, cutoff * 2, -3.0e38, float("-inf"), float("nan"), -1.0, -5.0,
                      cutoff * 0.999, -1e-30])
    out, _ = _scaled_exp(variant, x, temperature)
    assert out[:2].tolist() == [1.0, 1.0]
    assert torch.equal(out[2:6], torch.zeros(4))
    assert torch.isnan(out[6])
    assert bool((out[7:] > 0).all())
    # Without the cutoff test the result is bitwise the same wherever x / T >= -87.
    in_range = torch.linspace(cutoff * 0.9999, 0.0, 100_003)
    checked, _ = _scaled_exp(variant, in_range, temperature, cutoff=True)
    unchecked, _ = _scaled_exp(variant, in_range, temperature, cutoff=False)
    assert torch.equal(checked, unchecked)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lanes_exp_vector_and_scalar_tail_agree(variant):
    # The same values at every offset modulo 8 pass through the 8-lane body and the scalar tail.
    values = -torch.rand(13, generator=torch.Generator().manual_seed(3)) * 150.0
    results = []
    for offset in range(9):
        padded = torch.cat([torch.zeros(offset), values])
        out, _ = _scaled_exp(variant, padded, 2.0)
        results.append(out[offset:])
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=2.4e-7, atol=0)
