"""pytest-benchmark suite for the dense KD loss: pass × dtype × provider at N=256.

Run with `pytest benches/ --benchmark-only` (add `--bench-device cuda` on a GPU machine,
`-k "not large"` to leave out V=128256, `-k kdfast` for one provider). Each benchmark times
one call of a provider from `kdfast.benchmark` (kdfast, eager, compile, liger) on the
inputs of `kdfast.benchmark.make_inputs` (forward_kl, T=2, α=0.5, labels with a few rows
ignored); `fwd` is the loss under no_grad, `fwd+bwd` adds the student gradient. Providers
that do not apply (liger off CUDA or not installed) are skipped. The effective GB/s against
`kdfast.benchmark.minimum_bytes` is stored in each benchmark's extra_info. This suite holds
no loss formulas of its own and asserts nothing about speed.
"""

from __future__ import annotations

import pytest

from kdfast.benchmark import (
    DTYPES,
    PASSES,
    PROVIDERS,
    Case,
    ProviderUnavailable,
    make_inputs,
    make_provider,
    make_step,
    minimum_bytes,
    synchronize,
)

ROWS = 256
VOCABS = [
    pytest.param(32000, id="V32000"),
    pytest.param(128256, id="V128256", marks=pytest.mark.large),
]


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("provider_name", PROVIDERS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("pass_name", PASSES)
def test_kd_loss(benchmark, bench_device, bench_rounds, pass_name, dtype_name, provider_name, vocab):
    case = Case(device=bench_device, dtype=DTYPES[dtype_name], rows=ROWS, vocab=vocab)
    try:
        provider = make_provider(provider_name, case)
    except ProviderUnavailable as reason:
        pytest.skip(str(reason))
    student, teacher, labels = make_inputs(case)
    try:
        step = make_step(provider, pass_name, student, teacher, labels)
    except ProviderUnavailable as reason:  # the memory floors time fwd+bwd only
        pytest.skip(str(reason))

    def call():
        step()
        synchronize(bench_device)

    for _ in range(provider.extra_warmup):  # torch.compile compiles on its first call
        call()
    benchmark.group = f"kd_loss {dtype_name} N={ROWS} V={vocab} {pass_name}"
    benchmark.extra_info.update(device=bench_device, dtype=dtype_name, N=ROWS, V=vocab, provider=provider_name,
                                minimum_bytes=minimum_bytes(case, pass_name))
    benchmark.pedantic(call, rounds=bench_rounds, warmup_rounds=1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    median_s = getattr(getattr(stats, "stats", None), "median", None)
    if median_s:
        benchmark.extra_info["gbps"] = round(minimum_bytes(case, pass_name) / median_s / 1e9, 3)
