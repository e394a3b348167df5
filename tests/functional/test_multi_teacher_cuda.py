"""Tests of the CUDA kernels of the multi-teacher KD loss (`multi_teacher_kd_loss` on GPU tensors).

Skipped unless a GPU is visible and kdfast was built with its CUDA kernels
(`kdfast.build_info()["cuda"]`). The oracle is `kdfast.methods.multi_teacher_kd_loss` run in
float64 on the CPU on the same (already rounded) inputs. Checked: loss and student gradient
over divergences × combine modes × reductions with α, T, ε and grad_output ≠ 1; float32 /
bfloat16 / float16 students and teachers; vocabularies 1, 7, 1271 and 50257; per-row weights;
ignored and all-ignored rows; logits near ±1e4 and −inf entries; non-contiguous rows; labels
out of range (NaN rows, no exception: the kernels never synchronise); more teachers than the
kernels take (the plain fallback); determinism; a non-default stream; `opcheck` and
`torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import pytest
import torch

from kdfast import functional
from kdfast.contract import KDOptions
from kdfast.methods import multi_teacher_kd_loss as plain_loss
from kdfast.ops import multi_teacher as ops
from kdfast.ops._native import facts, has_cuda_kernels

CUDA_READY = torch.cuda.is_available() and has_cuda_kernels()
pytestmark = pytest.mark.skipif(
    not CUDA_READY, reason="needs a visible GPU and kdfast built with CUDA kernels (kdfast.build_info()['cuda'])"
)

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd"]
COMBINES = ["sum", "mixture"]
REDUCTIONS = ["mean", "sum", "batchmean", "none"]


def make_inputs(num_teachers, shape, seed, *, dtype=torch.float32, teacher_dtype=None, scale=3.0,
                ignore_fraction=0.3):
    """CPU float64 draws rounded to the dtypes, then copied to the GPU: (student, teachers, labels) per device."""
    generator = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    teachers = (scale * torch.randn((num_teachers,) + shape, generator=generator, dtype=torch.float64)).to(
        teacher_dtype or dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    labels[torch.rand(shape[:-1], generator=generator) < ignore_fraction] = -100
    labels.reshape(-1)[0] = 0
    return student, teachers, labels


def run(fn, student, teachers, labels, grad_output, **options):
    leaf = student.detach().clone().requires_grad_(True)
    loss = fn(leaf, teachers, labels, **options)
    loss.backward(grad_output.to(loss.dtype))
    return loss.detach(), leaf.grad


def grad_output_for(reduction, leading_shape, seed):
    if reduction == "none":
        return torch.rand(leading_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    return torch.tensor(1.3, dtype=torch.float64)


def check_cuda_against_oracle(student, teachers, labels, reduction, seed, loss_rtol=2e-5, **options):
    grad_output = grad_output_for(reduction, student.shape[:-1], seed)
    weights = options.get("weights")
    cuda_options = dict(options, weights=weights.cuda() if isinstance(weights, torch.Tensor) else weights)
    loss, grad = run(functional.multi_teacher_kd_loss, student.cuda(), list(teachers.cuda()), labels.cuda(),
                     grad_output.cuda(), reduction=reduction, **cuda_options)
    ref_loss, ref_grad = run(plain_loss, student.double(), list(teachers.double()), labels, grad_output,
                             reduction=reduction, **options)
    assert loss.device.type == "cuda" and grad.dtype == student.dtype
    loss, grad = loss.cpu().double(), grad.cpu().double()
    assert (loss - ref_loss).abs().max() <= loss_rtol * ref_loss.abs().max() + 1e-6
    if student.dtype == torch.float32:
        assert (grad - ref_grad).abs().max() <= 2e-5 * ref_grad.abs().max() + 1e-7
    else:  # within twice the rounding of the float64 gradient to the student dtype
        rounding = (ref_grad.to(student.dtype).double() - ref_grad).abs().max()
        assert (grad - ref_grad).abs().max() <= 2 * rounding + 1e-6
    assert bool((grad[labels == -100] == 0).all())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_float64_oracle(divergence, combine, reduction):
    student, teachers, labels = make_inputs(3, (4, 5, 1271), seed=1)
    weights = [1.0, 2.0, 0.5]
    check_cuda_against_oracle(student, teachers, labels, reduction, seed=2, combine=combine, divergence=divergence,
                              weights=weights, temperature=2.0, alpha=0.3, label_smoothing=0.1, beta=0.3)


OPTION_SETS = [
    dict(alpha=0.0, temperature=1.0),
    dict(alpha=1.0, temperature=1.0, label_smoothing=0.2),
    dict(alpha=0.25, temperature=4.0, t2_scale=False),
    dict(alpha=0.2, temperature=0.7, label_smoothing=0.05),
]


@pytest.mark.parametrize("option_index", range(len(OPTION_SETS)))
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_options(divergence, combine, option_index):
    student, teachers, labels = make_inputs(4, (6, 700), seed=3 + option_index)
    check_cuda_against_oracle(student, teachers, labels, "sum", seed=4, combine=combine, divergence=divergence,
                              **OPTION_SETS[option_index])


@pytest.mark.parametrize("vocab", [1, 7, 1271, 50257])
@pytest.mark.parametrize("combine", COMBINES)
def test_vocabulary_sizes(vocab, combine):
    student, teachers, labels = make_inputs(2, (3, vocab), seed=5)
    check_cuda_against_oracle(student, teachers, labels, "mean", seed=6, combine=combine, temperature=2.0,
                              alpha=0.5)


@pytest.mark.parametrize("student_dtype,teacher_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float64, torch.float64),
])
@pytest.mark.parametrize("divergence,combine", [("forward_kl", "sum"), ("reverse_kl", "mixture"), ("jsd", "sum")])
def test_dtypes(student_dtype, teacher_dtype, divergence, combine):
    student, teachers, labels = make_inputs(3, (5, 999), seed=7, dtype=student_dtype, teacher_dtype=teacher_dtype)
    check_cuda_against_oracle(student, teachers, labels, "mean", seed=8, loss_rtol=1e-5, combine=combine,
                              divergence=divergence, temperature=2.0, alpha=0.3)


@pytest.mark.parametrize("combine", COMBINES)
def test_per_row_weights_and_all_ignored(combine):
    student, teachers, labels = make_inputs(3, (4, 5, 300), seed=9)
    weights = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    weights[0, 0, 0] = 0.0
    weights[:, labels == -100] = 0.0
    check_cuda_against_oracle(student, teachers, labels, "none", seed=11, combine=combine, divergence="reverse_kl",
                              weights=weights, temperature=1.5)
    labels[:] = -100
    for reduction in REDUCTIONS:
        loss, grad = run(functional.multi_teacher_kd_loss, student.cuda(), teachers.cuda(), labels.cuda(),
                         grad_output_for(reduction, (4, 5), 12).cuda(), combine=combine, reduction=reduction,
                         alpha=0.5)
        assert bool((loss == 0).all()) and bool((grad == 0).all())


def test_extreme_and_masked_logits():
    student, teachers, labels = make_inputs(2, (4, 600), seed=13, scale=1.0)
    student, teachers = student * 1e4, teachers * 1e4
    teachers[0, :, 100:300] = float("-inf")
    check_cuda_against_oracle(student, teachers, labels, "sum", seed=14, loss_rtol=1e-4, temperature=3000.0,
                              alpha=0.5)


def test_non_contiguous_rows_and_stacked_teachers():
    student, teachers, labels = make_inputs(3, (6, 41), seed=15)
    wide = torch.randn(6, 60, device="cuda")
    wide[:, :41] = student.cuda()
    wide_teachers = torch.randn(3, 6, 70, device="cuda")
    wide_teachers[:, :, 5:46] = teachers.cuda()
    strided = functional.multi_teacher_kd_loss(wide[:, :41], wide_teachers[:, :, 5:46], labels.cuda(),
                                               combine="mixture")
    dense = functional.multi_teacher_kd_loss(student.cuda(), teachers.cuda(), labels.cuda(), combine="mixture")
    torch.testing.assert_close(strided, dense)


def test_labels_out_of_range_give_nan_rows():
    student, teachers, labels = make_inputs(2, (4, 9), seed=16, ignore_fraction=0.0)
    labels[1] = 9
    loss = functional.multi_teacher_kd_loss(student.cuda(), teachers.cuda(), labels.cuda(), alpha=0.5,
                                            reduction="none")
    assert bool(torch.isnan(loss[1])) and bool(torch.isfinite(loss[[0, 2, 3]]).all())


def test_more_teachers_than_the_kernel_takes_fall_back():
    student, teachers, labels = make_inputs(facts().cuda_max_teachers + 1, (3, 50), seed=17)
    check_cuda_against_oracle(student, teachers, labels, "mean", seed=18, combine="mixture", temperature=2.0)


def test_deterministic_and_non_default_stream():
    student, teachers, labels = make_inputs(4, (64, 4099), seed=19)
    student, teachers, labels = student.cuda(), teachers.cuda(), labels.cuda()
    first = run(functional.multi_teacher_kd_loss, student, list(teachers), labels, torch.tensor(1.0, device="cuda"),
                combine="mixture", divergence="jsd")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = run(functional.multi_teacher_kd_loss, student, list(teachers), labels,
                     torch.tensor(1.0, device="cuda"), combine="mixture", divergence="jsd")
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_opcheck_and_torch_compile():
    student, teachers, labels = make_inputs(2, (5, 23), seed=20)
    weights = torch.tensor([[0.25] * 5, [0.75] * 5], dtype=torch.float32, device="cuda")
    options = KDOptions(combine="mixture", divergence="jsd", reduction="none", temperature=2.0, alpha=0.5,
                        label_smoothing=0.1)
    outputs = ops.forward_outputs(student.cuda(), 2, options)
    args = (student.cuda().requires_grad_(True), list(teachers.cuda()), weights, labels.cuda(), *outputs, None,
            *options.values())
    torch.library.opcheck(ops.multi_teacher_kd_forward, args)
    torch._dynamo.reset()

    def step(s, t, y):
        return functional.multi_teacher_kd_loss(s, t, y, divergence="reverse_kl", alpha=0.2, temperature=2.0)

    compiled = torch.compile(step, fullgraph=True)
    s1 = student.cuda().requires_grad_(True)
    s2 = student.cuda().requires_grad_(True)
    loss = compiled(s1, teachers.cuda(), labels.cuda())
    (3.0 * loss).backward()
    ref = step(s2, teachers.cuda(), labels.cuda())
    (3.0 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(s1.grad, s2.grad)
