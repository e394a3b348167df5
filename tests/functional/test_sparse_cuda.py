"""Tests of the CUDA kernels of top-k soft labels: `kdfast.compress_topk` and
`kdfast.functional.sparse_kd_loss` on GPU tensors.

Skipped unless a GPU is visible and kdfast was built with its CUDA top-k kernels
(`kdfast.build_info()["cuda_topk"]`). They mirror tests/test_softlabels.py and
tests/test_sparse_kd_loss.py (same inputs, drawn on the CPU and moved; same float64 oracle,
`kdfast.reference`, and tolerances) and tests/test_kd_loss_cuda.py (launch shapes, unaligned
rows, NaN rows instead of exceptions, CUDA-graph capture, determinism). Compression must pick
exactly the CPU kernel's indices, ties included (equal logits: lower index first); the tail
log-mass must stay exact when tiny; the sparse loss and its gradient must match the oracle in
both tail modes for every divergence, with α/cross-entropy, label smoothing, ignored rows,
every reduction and grad_output ≠ 1.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import kdfast
from kdfast import functional, reference
from kdfast.contract import KDOptions
from kdfast.ops import sparse as sparse_ops
from kdfast.ops._native import facts, has_cuda_kernels, native_available, native_module
from kdfast.softlabels import SoftLabels

CUDA_READY = (
    torch.cuda.is_available()
    and native_available()
    and has_cuda_kernels()
    and bool(native_module().build_info().get("cuda_topk", False))
)
pytestmark = pytest.mark.skipif(
    not CUDA_READY, reason="needs a visible GPU and kdfast built with CUDA kernels (build_info()['cuda_topk'])"
)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "none", "batchmean")
TAILS = ("bucket", "renormalize")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
LOSS_RTOL, LOSS_ATOL = 2e-5, 1e-6
GRAD_RTOL, GRAD_NORM_ATOL = 2e-5, 1e-5


def seed_of(*parts) -> int:
    return zlib.crc32("/".join(str(part) for part in parts).encode()) % 100_000


def random_logits(shape, *, seed: int, scale: float = 3.0, dtype=torch.float32, device="cuda") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * scale).to(dtype).to(device)


# ------------------------------------------------------------------------ compress_topk


def assert_compress_matches(teacher: torch.Tensor, k: int, temperature: float = 1.0, **kwargs) -> SoftLabels:
    """CUDA compress_topk vs the float64 oracle and the CPU kernel: identical indices,
    fp32-close log-probabilities and tail log-mass."""
    assert teacher.is_cuda
    actual = kdfast.compress_topk(teacher, k, temperature=temperature, **kwargs)
    assert actual.indices.is_cuda and actual.logprobs.is_cuda and actual.tail_logprob.is_cuda
    expected = reference.compress_topk(teacher.cpu().double(), k, temperature=temperature, index_dtype=torch.int64)
    on_cpu = kdfast.compress_topk(teacher.cpu(), k, temperature=temperature, index_dtype=torch.int64)
    indices = actual.indices.cpu().to(torch.int64)
    assert torch.equal(indices, on_cpu.indices), "indices differ from the CPU kernel's"
    assert torch.equal(indices, expected.indices), "indices differ from the oracle's"
    value_dtype = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    assert actual.logprobs.dtype == value_dtype and actual.tail_logprob.dtype == value_dtype
    tolerance = 1e-12 if teacher.dtype == torch.float64 else 2e-6
    for got, want in ((actual.logprobs, expected.logprobs), (actual.tail_logprob, expected.tail_logprob)):
        got64 = got.cpu().to(torch.float64)
        assert torch.equal(torch.isneginf(got64), torch.isneginf(want)), "−inf pattern differs"
        finite = torch.isfinite(want)
        error = (got64[finite] - want[finite]).abs()
        bound = tolerance * (1.0 + want[finite].abs())
        assert bool((error <= bound).all()), f"max error {error.max().item():.3g}"
    return actual


@pytest.mark.parametrize("dtype", LOGIT_DTYPES, ids=lambda dtype: DTYPE_IDS[dtype])
@pytest.mark.parametrize(
    "rows, vocab, k",
    [(5, 1, 1), (12, 7, 3), (6, 1271, 1), (6, 1271, 40), (6, 4099, 257), (2, 50257, 64), (3, 128256, 1024),
     (2, 256000, 50), (2, 20000, 4096)],
    ids=lambda value: str(value),
)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_compress_matches_reference_and_cpu(dtype, rows, vocab, k, temperature):
    teacher = random_logits((rows, vocab), seed=seed_of(vocab, k, dtype), dtype=dtype)
    assert_compress_matches(teacher, k, temperature).validate()


@pytest.mark.parametrize("vocab", [7, 300, 2500, 4096])
def test_compress_k_equal_to_vocab(vocab):
    teacher = random_logits((4, vocab), seed=1)
    soft_labels = assert_compress_matches(teacher, vocab, 2.0)
    assert torch.isneginf(soft_labels.tail_logprob).all()


@pytest.mark.parametrize("value_range", [1, 2, 5])
@pytest.mark.parametrize("vocab, k", [(50, 10), (5000, 64), (5000, 1000), (70001, 333), (200000, 4000)])
def test_compress_ties_match_cpu(vocab, k, value_range):
    generator = torch.Generator().manual_seed(vocab + value_range)
    teacher = torch.randint(0, value_range, (4, vocab), generator=generator).float().cuda()
    assert_compress_matches(teacher, k)
    assert_compress_matches(teacher.to(torch.bfloat16), k)


@pytest.mark.parametrize("order", ["ascending", "descending"])
@pytest.mark.parametrize("k", [1, 16, 300, 2048])
def test_compress_sorted_rows(order, k):
    # Ascending rows make every tile's elements hits: the buffer is cut over and over.
    teacher = random_logits((3, 90000), seed=k).sort(-1, descending=order == "descending").values
    assert_compress_matches(teacher, k)


def test_compress_masked_entries_and_fewer_finite_than_k():
    teacher = random_logits((4, 6000), seed=2, device="cpu")
    teacher[:, ::3] = -math.inf
    teacher[1, 5:] = -math.inf
    soft_labels = assert_compress_matches(teacher.cuda(), 8)
    assert torch.isneginf(soft_labels.tail_logprob[1].cpu())


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("gap", [40.0, 80.0, 200.0])
def test_compress_tiny_tail_is_exact(k, gap):
    vocab = 100_000
    teacher = torch.full((3, vocab), -gap)
    teacher[:, [17, 43210, 90000, 99999][:k]] = 0.0
    teacher[1] += 1e4
    soft_labels = kdfast.compress_topk(teacher.cuda(), k)
    others = vocab - k
    expected_tail = math.log(others) - gap - math.log(k + others * math.exp(-gap))
    torch.testing.assert_close(soft_labels.tail_logprob.cpu().double(),
                               torch.full((3,), expected_tail, dtype=torch.float64), rtol=1e-6, atol=0)


def test_compress_tail_dominated_by_one_late_entry():
    teacher = torch.full((2, 200_000), -300.0)
    teacher[:, 3] = 10.0
    teacher[:, 150_000] = -50.0
    soft_labels = kdfast.compress_topk(teacher.cuda(), 1)
    expected = kdfast.compress_topk(teacher, 1)
    torch.testing.assert_close(soft_labels.tail_logprob.cpu().double(), expected.tail_logprob.double(), rtol=1e-6,
                               atol=0)


def test_compress_nan_and_fully_masked_rows_give_nan():
    teacher = random_logits((3, 5000), seed=6, device="cpu")
    teacher[0, 4000] = math.nan
    teacher[1] = -math.inf
    soft_labels = kdfast.compress_topk(teacher.cuda(), 5)
    logprobs, tail = soft_labels.logprobs.cpu(), soft_labels.tail_logprob.cpu()
    assert torch.isnan(logprobs[0]).all() and torch.isnan(tail[0])
    assert torch.isnan(logprobs[1]).all()
    assert torch.isfinite(logprobs[2]).all()


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compress_unaligned_and_strided_rows(dtype, offset):
    base = random_logits((5, 3001 + offset), seed=offset, dtype=dtype)
    assert_compress_matches(base[:, offset:], 17)
    transposed = random_logits((3000, 6), seed=7).t()  # non-unit vocabulary stride: copied
    assert_compress_matches(transposed, 33)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32, torch.int16, torch.uint16])
def test_compress_index_dtypes(index_dtype):
    teacher = random_logits((4, 30_000), seed=9)
    soft_labels = kdfast.compress_topk(teacher, 12, index_dtype=index_dtype)
    assert soft_labels.indices.dtype == index_dtype
    expected = kdfast.compress_topk(teacher.cpu(), 12, index_dtype=torch.int64)
    assert torch.equal(soft_labels.indices.cpu().to(torch.int32).to(torch.int64), expected.indices)


def test_compress_large_k_falls_back_to_reference():
    teacher = random_logits((2, 9000), seed=10)
    k = facts().cuda_max_topk + 1
    assert not sparse_ops.compress_uses_kernels(teacher.device, k)
    soft_labels = kdfast.compress_topk(teacher, k)
    expected = reference.compress_topk(teacher, k)
    assert torch.equal(soft_labels.indices, expected.indices)


def test_compress_deterministic_and_many_rows():
    teacher = random_logits((2048, 32000), seed=12, dtype=torch.bfloat16)
    first = kdfast.compress_topk(teacher, 100)
    second = kdfast.compress_topk(teacher, 100)
    assert torch.equal(first.indices, second.indices) and torch.equal(first.logprobs, second.logprobs)
    assert torch.equal(first.tail_logprob, second.tail_logprob)
    assert_compress_matches(teacher[:64], 100)


def test_opcheck_topk_compress_cuda():
    teacher = random_logits((5, 300), seed=11)
    for logits, index_dtype, temperature in ((teacher, torch.int32, 2.0), (teacher.double(), torch.int64, 0.5)):
        value_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        outputs = (torch.empty(5, 7, dtype=index_dtype, device="cuda"),
                   torch.empty(5, 7, dtype=value_dtype, device="cuda"),
                   torch.empty(5, dtype=value_dtype, device="cuda"))
        torch.library.opcheck(sparse_ops.topk_compress, (logits, *outputs, temperature))


# ---------------------------------------------------------------------------- sparse loss


def make_case(rows, vocab, k, *, seed, dtype=torch.float32, temperature=2.0, ignored_fraction=0.3,
              with_labels=True, scale=3.0):
    """(student, soft_labels, labels) on the GPU; the soft labels come from the CUDA kernel."""
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn((rows, vocab), generator=generator, dtype=torch.float64) * scale).to(dtype)
    teacher = torch.randn((rows, vocab), generator=generator, dtype=torch.float64) * scale
    soft_labels = kdfast.compress_topk(teacher.float().cuda(), k, temperature=temperature)
    labels = None
    if with_labels:
        labels = torch.randint(0, vocab, (rows,), generator=generator)
        ignored = torch.rand((rows,), generator=generator) < ignored_fraction
        labels[ignored] = -100
        labels[-1] = 0 if ignored_fraction < 1 else -100
        labels = labels.cuda()
    return student.cuda(), soft_labels, labels


def loss_and_grad(loss_function, student, soft_labels, labels, seed, **options):
    leaf = student.detach().clone().requires_grad_(True)
    loss = loss_function(leaf, soft_labels, labels, **options)
    generator = torch.Generator().manual_seed(seed)
    grad_output = (torch.rand(loss.shape, generator=generator, dtype=torch.float64) * 1.5 + 0.25).to(loss.dtype)
    loss.backward(grad_output.to(loss.device))
    return loss.detach(), leaf.grad


def assert_sparse_matches(student, soft_labels, labels, *, seed=0, **options):
    loss, grad = loss_and_grad(functional.sparse_kd_loss, student, soft_labels, labels, seed, **options)
    expected_loss, expected_grad = loss_and_grad(
        reference.sparse_kd_loss, student.to(torch.float64), soft_labels, labels, seed, **options
    )
    expected_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype and grad.dtype == student.dtype and grad.is_cuda
    assert loss.shape == expected_loss.shape
    loss, grad, expected_loss, expected_grad = (t.cpu() for t in (loss, grad, expected_loss, expected_grad))
    assert torch.isfinite(expected_loss).all()
    loss_error = (loss.double() - expected_loss).abs()
    assert bool((loss_error <= LOSS_RTOL * expected_loss.abs() + LOSS_ATOL * (1 + expected_loss.abs().max())).all()), (
        f"loss error {loss_error.max().item():.3g} (loss {expected_loss.abs().max().item():.3g})"
    )
    grad_scale = expected_grad.abs().max().item() + 1e-30
    grad_error = (grad.double() - expected_grad).abs()
    allowance = GRAD_RTOL * expected_grad.abs() + GRAD_NORM_ATOL * grad_scale
    if student.dtype in (torch.bfloat16, torch.float16):
        rounding = (expected_grad.to(student.dtype).double() - expected_grad).abs().max()
        allowance = allowance + 2 * rounding
    assert bool((grad_error <= allowance).all()), f"grad error {grad_error.max().item():.3g} (scale {grad_scale:.3g})"
    return loss, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda dtype: DTYPE_IDS[dtype])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_sparse_matches_reference(tail, divergence, reduction, dtype):
    student, soft_labels, labels = make_case(15, 1271, 17, seed=seed_of(tail, divergence), dtype=dtype)
    assert_sparse_matches(student, soft_labels, labels, divergence=divergence, tail=tail, reduction=reduction,
                          alpha=0.3, label_smoothing=0.1, beta=0.3)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("alpha, label_smoothing", [(0.0, 0.0), (0.5, 0.0), (0.5, 0.2), (1.0, 0.1)])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("tail", TAILS)
def test_sparse_alpha_temperature_and_smoothing(tail, divergence, alpha, label_smoothing, temperature):
    student, soft_labels, labels = make_case(7, 3000, 9, seed=3, temperature=temperature)
    assert_sparse_matches(student, soft_labels, labels, divergence=divergence, tail=tail, alpha=alpha,
                          label_smoothing=label_smoothing, reduction="none")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("rows, vocab, k", [(3, 256000, 100), (2, 131077, 1024), (300, 20000, 32), (2000, 33, 5)],
                         ids=["few-long", "long-odd", "many-medium", "many-tiny"])
def test_sparse_launch_shapes(rows, vocab, k, tail, dtype):
    student, soft_labels, labels = make_case(rows, vocab, k, seed=seed_of(rows, vocab, tail), dtype=dtype)
    assert_sparse_matches(student, soft_labels, labels, tail=tail, divergence="forward_kl", alpha=0.5,
                          label_smoothing=0.1, reduction="mean")


@pytest.mark.parametrize("t2_scale", [True, False])
@pytest.mark.parametrize("tail", TAILS)
def test_sparse_labels_none_and_t2_scale(tail, t2_scale):
    student, soft_labels, _ = make_case(12, 500, 6, seed=4, temperature=3.0, with_labels=False)
    assert_sparse_matches(student, soft_labels, None, tail=tail, divergence="reverse_kl", t2_scale=t2_scale)


@pytest.mark.parametrize("tail", TAILS)
def test_sparse_float64_and_16bit_soft_labels(tail):
    student, soft_labels, labels = make_case(6, 2000, 32, seed=5)
    assert_sparse_matches(student.double(), soft_labels, labels, tail=tail, alpha=0.2)
    for logprob_dtype in (torch.float16, torch.bfloat16):
        stored = soft_labels.for_storage(logprob_dtype)
        assert_sparse_matches(student, stored, labels, tail=tail, divergence="jsd")


@pytest.mark.parametrize("offset", [1, 3])
def test_sparse_large_logits_unaligned_and_strided_student(offset):
    student, soft_labels, labels = make_case(4, 3000, 10, seed=6, temperature=1.0)
    student = student + torch.tensor([1e4, -1e4, 0.0, 3e3], device="cuda")[:, None]
    assert_sparse_matches(student, soft_labels, labels, alpha=0.5, label_smoothing=0.1)
    wide = torch.randn(4, 3000 + offset, device="cuda")
    wide[:, offset:] = student
    assert_sparse_matches(wide[:, offset:], soft_labels, labels, divergence="tvd")
    strided = torch.randn(4, 2 * 3000, device="cuda")
    strided[:, ::2] = student
    assert_sparse_matches(strided[:, ::2], soft_labels, labels, divergence="jsd")


@pytest.mark.parametrize("offset", [0, 1, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("vocab", [30522, 50257])
@pytest.mark.parametrize("tail", TAILS)
def test_sparse_odd_vocab_offset_views(tail, vocab, dtype, offset):
    """The kernels see the view itself (scalar head to the 16-byte grid, kept-token bits of the
    head group); the oracle sees a contiguous copy of the same values."""
    student, soft_labels, labels = make_case(3, vocab, 40, seed=seed_of(vocab, offset), dtype=dtype)
    base = torch.zeros(3, vocab + 8, dtype=dtype, device="cuda")
    base[:, offset:offset + vocab] = student
    leaf = base.requires_grad_(True)
    options = dict(tail=tail, divergence="forward_kl", alpha=0.5, label_smoothing=0.1, reduction="none")
    loss = functional.sparse_kd_loss(leaf[:, offset:offset + vocab], soft_labels, labels, **options)
    loss.sum().backward()
    oracle_leaf = student.detach().to(torch.float64).requires_grad_(True)
    expected_loss = reference.sparse_kd_loss(oracle_leaf, soft_labels, labels, **options)
    expected_loss.sum().backward()
    loss, expected_loss = loss.detach().double().cpu(), expected_loss.detach().cpu()
    grad, expected_grad = leaf.grad[:, offset:offset + vocab].double().cpu(), oracle_leaf.grad.cpu()
    assert bool(((loss - expected_loss).abs() <= LOSS_RTOL * expected_loss.abs()
                 + LOSS_ATOL * (1 + expected_loss.abs().max())).all())
    allowance = GRAD_RTOL * expected_grad.abs() + GRAD_NORM_ATOL * (expected_grad.abs().max() + 1e-30)
    if dtype == torch.bfloat16:
        allowance = allowance + 2 * (expected_grad.to(dtype).double() - expected_grad).abs().max()
    assert bool(((grad - expected_grad).abs() <= allowance).all())
    assert torch.equal(leaf.grad[:, :offset], torch.zeros_like(leaf.grad[:, :offset]))


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
@pytest.mark.parametrize("tail", TAILS)
def test_sparse_masked_teacher_entries(tail, divergence):
    generator = torch.Generator().manual_seed(17)
    teacher = torch.randn(4, 300, generator=generator)
    teacher[:, 5:] = -math.inf
    soft_labels = kdfast.compress_topk(teacher.cuda(), 8)
    student = torch.randn(4, 300, generator=generator).cuda()
    loss, grad = assert_sparse_matches(student, soft_labels, None, tail=tail, divergence=divergence, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("alpha, label_smoothing", [(0.0, 0.0), (0.4, 0.1)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_k_equal_to_vocab_matches_dense_loss(divergence, temperature, alpha, label_smoothing):
    generator = torch.Generator().manual_seed(7)
    student = (torch.randn(6, 321, generator=generator) * 3).cuda()
    teacher = (torch.randn(6, 321, generator=generator) * 3).cuda()
    labels = torch.randint(0, 321, (6,), generator=generator).cuda()
    labels[2] = -100
    soft_labels = kdfast.compress_topk(teacher, 321, temperature=temperature)
    options = dict(divergence=divergence, alpha=alpha, label_smoothing=label_smoothing, reduction="none")
    sparse_loss, sparse_grad = loss_and_grad(functional.sparse_kd_loss, student, soft_labels, labels, 1, **options)
    dense_loss, dense_grad = loss_and_grad(
        lambda s, t, y, **o: functional.kd_loss(s, t, y, temperature=temperature, **o), student, teacher, labels, 1,
        **options,
    )
    torch.testing.assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-5 * dense_grad.abs().max().item())


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sparse_tiny_student_tail_is_exact(divergence):
    student, soft_labels, _ = make_case(3, 4000, 8, seed=8, temperature=1.0, with_labels=False)
    student = torch.zeros_like(student)
    student.scatter_(-1, soft_labels.indices.long(), 60.0)
    loss, grad = assert_sparse_matches(student, soft_labels, None, divergence=divergence, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def loss_and_grad_with(loss_function, student, soft_labels, labels, grad_output, **options):
    leaf = student.detach().clone().requires_grad_(True)
    loss = loss_function(leaf, soft_labels, labels, **options)
    loss.backward(grad_output.to(loss.dtype).to(loss.device))
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows, vocab, k", [(600, 20000, 32), (3, 256000, 100), (40, 3000, 9)],
                         ids=["one-pass", "few-long", "few-short"])
def test_sparse_one_pass_gradient_with_unit_grad_output(rows, vocab, k, reduction, tail, dtype):
    """The gradient the forward pass writes (the one-pass kernel, or for few long rows in
    clusters the backward kernel after the forward kernels) is the one loss.backward() returns
    for grad_output 1 (the backward kernel leaves those rows as they are). With reduction "none"
    every other row gets 1.5, so that the backward kernel recomputes those rows."""
    student, soft_labels, labels = make_case(rows, vocab, k, seed=seed_of("unit", rows, tail, reduction), dtype=dtype)
    options = dict(tail=tail, reduction=reduction, divergence="forward_kl", alpha=0.5, label_smoothing=0.1)
    grad_output = torch.ones((rows,) if reduction == "none" else (), dtype=torch.float64)
    if reduction == "none":
        grad_output[1::2] = 1.5
    loss, grad = loss_and_grad_with(functional.sparse_kd_loss, student, soft_labels, labels, grad_output, **options)
    expected_loss, expected_grad = loss_and_grad_with(reference.sparse_kd_loss, student.to(torch.float64),
                                                      soft_labels, labels, grad_output, **options)
    loss, grad, expected_loss, expected_grad = (t.cpu() for t in (loss, grad, expected_loss, expected_grad))
    loss_error = (loss.double() - expected_loss).abs()
    assert bool((loss_error <= LOSS_RTOL * expected_loss.abs() + LOSS_ATOL * (1 + expected_loss.abs().max())).all())
    grad_scale = expected_grad.abs().max().item() + 1e-30
    allowance = GRAD_RTOL * expected_grad.abs() + GRAD_NORM_ATOL * grad_scale
    if dtype == torch.bfloat16:
        allowance = allowance + 2 * (expected_grad.to(dtype).double() - expected_grad).abs().max()
    grad_error = (grad.double() - expected_grad).abs()
    assert bool((grad_error <= allowance).all()), f"grad error {grad_error.max().item():.3g} (scale {grad_scale:.3g})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=["bf16", "fp32", "fp64"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows, vocab", [(300, 20000), (3, 256000)], ids=["one-pass", "few-long"])
def test_sparse_one_pass_equals_two_pass(rows, vocab, reduction, dtype):
    """The forward's gradient (grad_output 1) is bit for bit the two-pass backward kernel's:
    both run the same row gradient on the same statistics."""
    student, soft_labels, labels = make_case(rows, vocab, 40, seed=seed_of("bits", rows, reduction), dtype=dtype)
    options = KDOptions(divergence="jsd", temperature=2.0, alpha=0.3, label_smoothing=0.1, reduction=reduction)
    arguments = (soft_labels.indices, soft_labels.logprobs, soft_labels.tail_logprob, labels, options)
    gradients = []
    for one_pass in (True, False):
        leaf = student.detach().clone().requires_grad_(True)
        loss = sparse_ops.SparseKDLossFunction.apply(leaf, *arguments, one_pass, False)
        loss.backward(torch.ones_like(loss))
        gradients.append(leaf.grad)
    assert torch.equal(gradients[0], gradients[1])


def test_sparse_inplace_gradient_is_refused_on_cuda():
    student, soft_labels, labels = make_case(4, 300, 5, seed=19)
    with pytest.raises(ValueError, match="CPU"):
        functional.sparse_kd_loss(student.clone(), soft_labels, labels, inplace_backward=True)


def test_sparse_gradient_reach():
    student, soft_labels, _ = make_case(4, 700, 5, seed=9, with_labels=False)
    _, bucket_grad = loss_and_grad(functional.sparse_kd_loss, student, soft_labels, None, 0, tail="bucket")
    assert bool((bucket_grad != 0).all()), "the tail bucket reaches every student logit"
    _, renorm_grad = loss_and_grad(functional.sparse_kd_loss, student, soft_labels, None, 0, tail="renormalize")
    kept = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, soft_labels.indices.long(), True)
    assert bool((renorm_grad[~kept] == 0).all()) and bool((renorm_grad[kept] != 0).all())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tail", TAILS)
def test_sparse_all_rows_ignored(tail, reduction):
    student, soft_labels, labels = make_case(5, 300, 4, seed=10, ignored_fraction=1.0)
    loss, grad = loss_and_grad(functional.sparse_kd_loss, student, soft_labels, labels, 0, tail=tail,
                               reduction=reduction, alpha=0.5)
    assert bool((loss == 0).all()) and bool((grad == 0).all())


def test_sparse_bad_rows_are_nan_rows():
    student, soft_labels, labels = make_case(3, 100, 4, seed=14)
    labels = torch.tensor([0, 100, 1], device="cuda")
    loss = functional.sparse_kd_loss(student, soft_labels, labels, reduction="none", alpha=0.5)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    repeated = soft_labels.indices.clone()
    repeated[1, 1] = repeated[1, 0]
    bad = SoftLabels(repeated, soft_labels.logprobs, soft_labels.tail_logprob, soft_labels.temperature, 100)
    leaf = student.clone().requires_grad_(True)
    loss = functional.sparse_kd_loss(leaf, bad, torch.tensor([0, 1, 2], device="cuda"), reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isfinite(leaf.grad[[0, 2]]).all()


def test_sparse_vocabulary_beyond_the_kernel_limit_uses_reference():
    vocab = facts().cuda_max_sparse_vocab + 3
    student, soft_labels, labels = make_case(2, vocab, 8, seed=18, ignored_fraction=0.0)
    assert_sparse_matches(student, soft_labels, labels, alpha=0.3, reduction="mean")


def test_sparse_opcheck():
    student, soft_labels, labels = make_case(5, 60, 6, seed=15)
    options = KDOptions(divergence="jsd", temperature=2.0, alpha=0.5, label_smoothing=0.1)
    student.requires_grad_(True)
    forward_args = (student, soft_labels.indices, soft_labels.logprobs, soft_labels.tail_logprob, labels,
                    *sparse_ops.forward_outputs(student, options), *options.values())
    torch.library.opcheck(sparse_ops.sparse_kd_forward, forward_args)


def test_sparse_deterministic():
    student, soft_labels, labels = make_case(256, 32000, 64, seed=31, dtype=torch.bfloat16)
    results = [loss_and_grad(functional.sparse_kd_loss, student, soft_labels, labels, 0, alpha=0.3) for _ in range(3)]
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("tail", TAILS)
def test_cuda_graph_capture_compress_and_sparse_loss(tail):
    """compress_topk + sparse forward/backward captured once, replayed on new teacher and
    student values copied into the static inputs."""
    rows, vocab, k = 64, 5000, 32
    static_teacher = random_logits((rows, vocab), seed=1)
    static_student = random_logits((rows, vocab), seed=2, dtype=torch.bfloat16)
    static_labels = torch.randint(0, vocab, (rows,), device="cuda")
    static_labels[::4] = -100

    def step():
        soft_labels = kdfast.compress_topk(static_teacher, k, temperature=2.0)
        leaf = static_student.detach().requires_grad_(True)
        loss = functional.sparse_kd_loss(leaf, soft_labels, static_labels, tail=tail, alpha=0.3)
        (gradient,) = torch.autograd.grad(loss, leaf)
        return soft_labels.logprobs, loss, gradient

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logprobs, static_loss, static_gradient = step()

    for seed in (3, 4):
        static_teacher.copy_(random_logits((rows, vocab), seed=seed))
        static_student.copy_(random_logits((rows, vocab), seed=seed + 10, dtype=torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        eager_logprobs, eager_loss, eager_gradient = step()
        assert torch.equal(static_logprobs, eager_logprobs)
        assert torch.equal(static_loss, eager_loss)
        assert torch.equal(static_gradient, eager_gradient)


def test_compile_fullgraph_sparse_loss_cuda():
    torch._dynamo.reset()
    student, soft_labels, labels = make_case(8, 50, 5, seed=16, temperature=2.0)

    def training_step(student_logits, soft, label_tensor):
        return functional.sparse_kd_loss(student_logits * 1.5, soft, label_tensor, alpha=0.3, label_smoothing=0.1) * 2

    compiled = torch.compile(training_step, fullgraph=True, backend="inductor")
    leaf = student.clone().requires_grad_(True)
    loss_compiled = compiled(leaf, soft_labels, labels)
    (grad_compiled,) = torch.autograd.grad(loss_compiled, leaf)
    loss_eager = training_step(leaf, soft_labels, labels)
    (grad_eager,) = torch.autograd.grad(loss_eager, leaf)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-6, atol=1e-7)
