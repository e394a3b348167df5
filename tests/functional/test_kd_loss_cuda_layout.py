"""CUDA kd_loss on the row layouts and leading groups the kernels split on (GPU only).

The dense kernels read a row as a scalar head up to its first 16-byte boundary, a 16-byte
vector body and a scalar tail, and keep per-thread running maxima over groups of 8 elements
(csrc/cuda/kd_loss_cuda_layout.cuh; the host replay is test_cuda_indexing.py). These cases
put the inputs where that split and those maxima matter, and compare every row's loss and
gradient with the float64 oracle (`kdfast.reference`) under the rule of tests/fp32_rows.py:

- odd vocabularies (30522, 50257, 131077) with offset views of the student and the teacher
  (equal offsets: vector path with a head; different offsets: element by element), bfloat16,
  float16 and float32, mixed dtypes;
- a row whose leading groups (the head group and the first full groups) are all NaN or all
  −inf while the rest is finite: the NaN must reach the loss with reverse_kl and α = 1 (the
  first thread's maximum stays −inf over such groups), the −inf must keep the smoothed
  cross-entropy at +inf;
- rows long enough for large teams, so that the leading groups belong to one thread of many;
- ±0.0 ties in long rows of `compress_topk` (one key for both zeros, lower index first).
Skipped unless a GPU is visible and kdfast was built with its CUDA kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdfast
from fp32_rows import assert_rows_match, finite_spread, row_tolerances
from kd_checks import make_grad_output, stable_seed
from kdfast import functional, reference
from kdfast.ops._native import has_cuda_kernels

CUDA_READY = torch.cuda.is_available() and has_cuda_kernels()
pytestmark = pytest.mark.skipif(
    not CUDA_READY, reason="needs a visible GPU and kdfast built with CUDA kernels (kdfast.build_info()['cuda'])"
)

TEMPERATURE = 2.0
ODD_VOCABS = [30522, 50257, 131077]


def make_rows(rows, vocab, *, seed, spare):
    """Seeded float32 student/teacher logits [rows, vocab + spare] (CPU) and labels [rows]."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab + spare, generator=generator) * 3.0
    teacher = torch.randn(rows, vocab + spare, generator=generator) * 3.0
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[-1] = -100
    return student, teacher, labels


def run_cuda_view(student_base, teacher_view, labels, offset, vocab, dtype, grad_output, options):
    """Row losses and gradient of kd_loss(student_base[:, offset:offset+vocab] in `dtype` on the GPU)."""
    leaf = student_base.to(device="cuda", dtype=dtype).requires_grad_(True)
    loss = functional.kd_loss(leaf[:, offset:offset + vocab], teacher_view, labels.cuda(), reduction="none",
                              **options)
    loss.backward(grad_output.cuda().to(loss.dtype))
    return loss.detach().cpu(), leaf.grad[:, offset:offset + vocab].cpu()


def run_oracle(student, teacher, labels, grad_output, options):
    leaf = student.double().requires_grad_(True)
    loss = reference.kd_loss(leaf, teacher.double(), labels, reduction="none", **options)
    loss.backward(grad_output.double())
    return loss.detach(), leaf.grad


def compare(student, teacher, labels, *, student_offset, teacher_offset, vocab, dtype, teacher_dtype, context,
            **options):
    """Runs the CUDA loss on offset views and the oracle on the same (rounded) values."""
    options = dict(temperature=TEMPERATURE, **options)
    teacher_gpu = teacher.to(device="cuda", dtype=teacher_dtype)[:, teacher_offset:teacher_offset + vocab]
    student_rounded = student.to(dtype).float()[:, student_offset:student_offset + vocab]
    teacher_rounded = teacher.to(teacher_dtype).float()[:, teacher_offset:teacher_offset + vocab]
    grad_output = make_grad_output((student.shape[0],), stable_seed(context, "grad"), "cpu")
    loss, grad = run_cuda_view(student, teacher_gpu, labels, student_offset, vocab, dtype, grad_output, options)
    expected, expected_grad = run_oracle(student_rounded, teacher_rounded, labels, grad_output, options)
    loss_atol, grad_atol = row_tolerances(
        student_rounded, finite_spread(teacher_rounded) / TEMPERATURE, temperature=TEMPERATURE,
        alpha=options.get("alpha", 0.0), t2_scale=True, divergence=options.get("divergence", "forward_kl"),
        grad_weights=grad_output,
    )
    out_dtype = torch.float32 if dtype == torch.float32 else dtype
    assert_rows_match(loss, expected, grad.float(), expected_grad, loss_atol, grad_atol, context,
                      out_dtype=out_dtype)
    return loss, expected


@pytest.mark.parametrize("offsets", [(0, 0), (1, 1), (3, 3), (7, 7), (1, 4)], ids=lambda o: f"s{o[0]}t{o[1]}")
@pytest.mark.parametrize(
    "dtype, teacher_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32),
     (torch.float32, torch.bfloat16)],
    ids=["bf16", "fp16", "fp32", "fp32-bf16"],
)
@pytest.mark.parametrize("vocab", ODD_VOCABS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_odd_vocab_offset_views(divergence, vocab, dtype, teacher_dtype, offsets):
    student_offset, teacher_offset = offsets
    context = f"layout/{divergence}/{vocab}/{dtype}/{teacher_dtype}/{offsets}"
    student, teacher, labels = make_rows(4, vocab, seed=stable_seed(context), spare=8)
    compare(student, teacher, labels, student_offset=student_offset, teacher_offset=teacher_offset, vocab=vocab,
            dtype=dtype, teacher_dtype=teacher_dtype, context=context, divergence=divergence, alpha=0.3,
            label_smoothing=0.1)


@pytest.mark.parametrize("leading", [1, 8, 9, 16, 40])
@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize(
    "divergence, alpha, target",
    [("reverse_kl", 0.0, "student"), ("reverse_kl", 0.0, "teacher"), ("forward_kl", 0.0, "teacher"),
     ("forward_kl", 1.0, "student"), ("jsd", 0.5, "student")],
)
@pytest.mark.parametrize("vocab", [4099, 131077])
def test_leading_nan_groups_reach_the_loss(vocab, divergence, alpha, target, offset, leading):
    """A row whose first `leading` elements are NaN: the row's loss and gradient are NaN."""
    context = f"leading-nan/{vocab}/{divergence}/{alpha}/{target}/{offset}/{leading}"
    student, teacher, labels = make_rows(3, vocab, seed=stable_seed(context), spare=8)
    (student if target == "student" else teacher)[1, offset:offset + leading] = math.nan
    loss, expected = compare(student, teacher, labels, student_offset=offset, teacher_offset=offset, vocab=vocab,
                             dtype=torch.float32, teacher_dtype=torch.float32, context=context,
                             divergence=divergence, alpha=alpha, label_smoothing=0.0)
    assert math.isnan(float(expected[1])) and math.isnan(float(loss[1])), f"{context}: {float(loss[1])}"


@pytest.mark.parametrize("leading", [8, 9, 16, 40])
@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_leading_masked_groups_keep_smoothed_ce_infinite(dtype, offset, leading):
    """A row whose first `leading` student logits are −inf: with label smoothing the CE is +inf."""
    context = f"leading-ninf/{dtype}/{offset}/{leading}"
    vocab = 50257
    student, teacher, labels = make_rows(3, vocab, seed=stable_seed(context), spare=8)
    student[1, offset:offset + leading] = -math.inf
    labels[1] = leading + 3
    loss, expected = compare(student, teacher, labels, student_offset=offset, teacher_offset=offset, vocab=vocab,
                             dtype=dtype, teacher_dtype=dtype, context=context, divergence="forward_kl", alpha=0.5,
                             label_smoothing=0.1)
    assert float(expected[1]) == math.inf and float(loss[1]) == math.inf, f"{context}: {float(loss[1])}"


@pytest.mark.parametrize("k", [1, 64, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("vocab", [4099, 50257])
def test_topk_signed_zeros_tie_in_long_rows(vocab, dtype, k):
    """Rows of negative logits with ±0.0 scattered among them (more zeros than k): −0.0 and +0.0
    are one value, so the top k are the lowest-indexed zeros, as in the oracle."""
    generator = torch.Generator().manual_seed(stable_seed("topk-zeros", vocab, str(dtype), k))
    teacher = -1.0 - torch.rand(3, vocab, generator=generator, dtype=torch.float64)
    zeros = torch.rand(3, vocab, generator=generator) < 0.05
    signs = torch.rand(3, vocab, generator=generator) < 0.5
    teacher[zeros & signs] = -0.0
    teacher[zeros & ~signs] = 0.0
    teacher = teacher.to(dtype)
    result = kdfast.compress_topk(teacher.cuda(), k, temperature=TEMPERATURE)
    expected = reference.compress_topk(teacher.double(), k, temperature=TEMPERATURE)
    assert torch.equal(result.indices.cpu().long(), expected.indices.long()), f"{vocab}/{dtype}/{k}"
