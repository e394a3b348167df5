"""Tests of `kdfast.functional.sparse_kd_loss` (and `kdfast.SparseKDLoss`) against the float64
oracle `kdfast.reference.sparse_kd_loss`.

Each case compresses a random teacher with `compress_topk`, runs the fused loss on the
student in its dtype and the oracle on a float64 copy of the same (already rounded) student
with the same soft labels, backpropagates a grad_output that is not 1, and compares the loss
and the student gradient: float32 to ≲ 2e-5 relative (plus a small allowance relative to
the largest value), 16-bit gradients within twice the error of the float64 gradient rounded
to that dtype. Also: k = V in bucket mode equals the dense `kd_loss`, tiny student tails stay
exact, gradcheck in float64, opcheck, torch.compile(fullgraph=True), and the error messages.
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
from kdfast.softlabels import SoftLabels

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "none", "batchmean")
TAILS = ("bucket", "renormalize")
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
LOSS_RTOL, LOSS_ATOL = 2e-5, 1e-6
GRAD_RTOL, GRAD_NORM_ATOL = 2e-5, 1e-5


def make_case(leading_shape, vocab_size, k, *, seed, dtype=torch.float32, temperature=2.0, ignored_fraction=0.3,
              with_labels=True, scale=3.0):
    """(student, soft_labels, labels): seeded random logits, about `ignored_fraction` rows ignored."""
    generator = torch.Generator().manual_seed(seed)
    shape = tuple(leading_shape) + (vocab_size,)
    student = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
    teacher = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    soft_labels = kdfast.compress_topk(teacher.float(), k, temperature=temperature)
    labels = None
    if with_labels:
        labels = torch.randint(0, vocab_size, tuple(leading_shape), generator=generator)
        ignored = torch.rand(tuple(leading_shape), generator=generator) < ignored_fraction
        labels[ignored] = -100
        labels.reshape(-1)[-1] = 0 if ignored_fraction < 1 else -100
    return student, soft_labels, labels


def grad_output_for(loss: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(loss.shape, generator=generator, dtype=torch.float64) * 1.5 + 0.25).to(loss.dtype)


def loss_and_grad(loss_function, student, soft_labels, labels, seed, **options):
    leaf = student.detach().clone().requires_grad_(True)
    loss = loss_function(leaf, soft_labels, labels, **options)
    loss.backward(grad_output_for(loss, seed))
    return loss.detach(), leaf.grad


def assert_close_to_reference(student, soft_labels, labels, *, seed=0, **options):
    loss, grad = loss_and_grad(functional.sparse_kd_loss, student, soft_labels, labels, seed, **options)
    expected_loss, expected_grad = loss_and_grad(
        reference.sparse_kd_loss, student.to(torch.float64), soft_labels, labels, seed, **options
    )
    expected_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype and grad.dtype == student.dtype
    assert loss.shape == expected_loss.shape
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


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda dtype: DTYPE_IDS[dtype])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_matches_reference(tail, divergence, reduction, dtype):
    student, soft_labels, labels = make_case((3, 5), 1271, 17, seed=zlib.crc32(f"{tail}/{divergence}".encode()) % 1000,
                                             dtype=dtype)
    assert_close_to_reference(
        student, soft_labels, labels, divergence=divergence, tail=tail, reduction=reduction, alpha=0.3,
        label_smoothing=0.1, beta=0.3,
    )


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha, label_smoothing", [(0.0, 0.0), (0.5, 0.0), (0.5, 0.2), (1.0, 0.1)])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("tail", TAILS)
def test_alpha_temperature_and_smoothing(tail, divergence, alpha, label_smoothing, temperature):
    student, soft_labels, labels = make_case((7,), 3000, 9, seed=3, temperature=temperature)
    assert_close_to_reference(
        student, soft_labels, labels, divergence=divergence, tail=tail, alpha=alpha,
        label_smoothing=label_smoothing, reduction="none",
    )


@pytest.mark.parametrize("t2_scale", [True, False])
@pytest.mark.parametrize("tail", TAILS)
def test_labels_none_and_t2_scale(tail, t2_scale):
    student, soft_labels, _ = make_case((4, 3), 500, 6, seed=4, temperature=3.0, with_labels=False)
    assert_close_to_reference(student, soft_labels, None, tail=tail, divergence="reverse_kl", t2_scale=t2_scale)


@pytest.mark.parametrize("tail", TAILS)
def test_float64_and_16bit_soft_labels(tail):
    student, soft_labels, labels = make_case((6,), 2000, 32, seed=5)
    assert_close_to_reference(student.double(), soft_labels, labels, tail=tail, alpha=0.2)
    for logprob_dtype in (torch.float16, torch.bfloat16):
        stored = soft_labels.for_storage(logprob_dtype)
        assert stored.indices.dtype == torch.uint16
        assert_close_to_reference(student, stored, labels, tail=tail, divergence="jsd")
        full = functional.sparse_kd_loss(student, soft_labels, labels, tail=tail, divergence="jsd")
        compact = functional.sparse_kd_loss(student, stored, labels, tail=tail, divergence="jsd")
        torch.testing.assert_close(compact, full, rtol=2e-2, atol=1e-3)


def test_large_logits_and_non_contiguous_student():
    student, soft_labels, labels = make_case((4,), 3000, 10, seed=6, temperature=1.0)
    student = student + torch.tensor([1e4, -1e4, 0.0, 3e3])[:, None]
    assert_close_to_reference(student, soft_labels, labels, alpha=0.5, label_smoothing=0.1)
    wide = torch.randn(4, 2 * 3000)
    wide[:, ::2] = student
    assert_close_to_reference(wide[:, ::2], soft_labels, labels, divergence="tvd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda dtype: DTYPE_IDS[dtype])
def test_large_forward_call_prefetching_equals_small_calls(dtype):
    # Above 64 MiB of student logits the forward's tail sums ask for lines ahead as they go;
    # without grad, for the thread's next row in several streams (past the call's last row too).
    # An odd V puts most rows off a 64-byte boundary; a NaN row and ignored rows ride along.
    vocab_size, k = 120_001, 16
    rows = 10 * math.ceil(70 * 2**20 / (vocab_size * torch.tensor([], dtype=dtype).element_size()) / 10)
    generator = torch.Generator().manual_seed(41)
    student = (torch.randn(rows, vocab_size, generator=generator) * 3).to(dtype)
    soft_labels = kdfast.compress_topk(torch.randn(rows, vocab_size, generator=generator) * 3, k, temperature=2.0)
    labels = torch.randint(0, vocab_size, (rows,), generator=generator)
    labels[::7] = -100
    student[3, 777] = math.nan
    assert student.numel() * student.element_size() > 64 * 2**20
    options = dict(reduction="none", alpha=0.5, label_smoothing=0.1)
    with torch.no_grad():
        whole = functional.sparse_kd_loss(student, soft_labels, labels, **options)
        parts = torch.cat([functional.sparse_kd_loss(student[i:i + 10], soft_labels[i:i + 10], labels[i:i + 10],
                                                     **options) for i in range(0, rows, 10)])
    assert torch.equal(whole.isnan(), parts.isnan()) and bool(whole[3].isnan())
    assert torch.equal(whole.nan_to_num(), parts.nan_to_num())
    for row in (0, 5, rows - 1):
        assert_close_to_reference(student[row:row + 1], soft_labels[row:row + 1], labels[row:row + 1], **options)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
@pytest.mark.parametrize("tail", TAILS)
def test_soft_labels_with_masked_teacher_entries(tail, divergence):
    # A teacher with fewer than k finite logits keeps −inf entries (zero probability) among
    # its top k and has no tail mass: those buckets contribute exactly 0.
    generator = torch.Generator().manual_seed(17)
    teacher = torch.randn(4, 300, generator=generator)
    teacher[:, 5:] = -math.inf
    soft_labels = kdfast.compress_topk(teacher, 8)
    assert torch.isneginf(soft_labels.logprobs[:, 5:]).all() and torch.isneginf(soft_labels.tail_logprob).all()
    student = torch.randn(4, 300, generator=generator)
    loss, grad = assert_close_to_reference(student, soft_labels, None, tail=tail, divergence=divergence,
                                           reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("alpha, label_smoothing", [(0.0, 0.0), (0.4, 0.1)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_k_equal_to_vocab_matches_dense_loss(divergence, temperature, alpha, label_smoothing):
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(6, 321, generator=generator) * 3
    teacher = torch.randn(6, 321, generator=generator) * 3
    labels = torch.randint(0, 321, (6,), generator=generator)
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
def test_tiny_student_tail_is_exact(divergence):
    # The student puts ~e^-60 on the non-kept tokens while the teacher's tail holds ~1e-3:
    # 1 − Σ q over the kept tokens would round to 0 (log q_tail = −inf); the kernel's
    # log-sum-exp over the non-kept logits keeps it at ≈ −60 + log(V − k).
    student, soft_labels, labels = make_case((3,), 4000, 8, seed=8, temperature=1.0, with_labels=False)
    student = torch.zeros_like(student)
    student.scatter_(-1, soft_labels.indices.long(), 60.0)
    loss, grad = assert_close_to_reference(student, soft_labels, None, divergence=divergence, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    if divergence == "forward_kl":
        tail_mass = soft_labels.tail_logprob.double().exp()
        assert bool((loss.double() > 0.9 * tail_mass * 50).all()), "the tail term dominates and is resolved"


def test_gradient_reach():
    student, soft_labels, labels = make_case((4,), 700, 5, seed=9, with_labels=False)
    _, bucket_grad = loss_and_grad(functional.sparse_kd_loss, student, soft_labels, None, 0, tail="bucket")
    assert bool((bucket_grad != 0).all()), "the tail bucket reaches every student logit"
    _, renorm_grad = loss_and_grad(functional.sparse_kd_loss, student, soft_labels, None, 0, tail="renormalize")
    kept = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, soft_labels.indices.long(), True)
    assert bool((renorm_grad[~kept] == 0).all()) and bool((renorm_grad[kept] != 0).all())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tail", TAILS)
def test_all_rows_ignored(tail, reduction):
    student, soft_labels, labels = make_case((5,), 300, 4, seed=10, ignored_fraction=1.0)
    loss, grad = loss_and_grad(functional.sparse_kd_loss, student, soft_labels, labels, 0, tail=tail,
                               reduction=reduction, alpha=0.5)
    assert bool((loss == 0).all()) and bool((grad == 0).all())


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_gradcheck_float64(tail, divergence):
    generator = torch.Generator().manual_seed(11)
    teacher = torch.randn(4, 13, generator=generator, dtype=torch.float64) * 2
    student = (torch.randn(4, 13, generator=generator, dtype=torch.float64) * 2).requires_grad_(True)
    labels = torch.tensor([3, -100, 12, 0])
    soft_labels = reference.compress_topk(teacher, 4, temperature=1.5)

    def loss_of(student_logits):
        return functional.sparse_kd_loss(student_logits, soft_labels, labels, divergence=divergence, tail=tail,
                                         alpha=0.3, label_smoothing=0.1, reduction="none")

    assert torch.autograd.gradcheck(loss_of, (student,), eps=1e-6, atol=1e-7)


def test_module_equals_functional():
    student, soft_labels, labels = make_case((2, 3), 200, 7, seed=12, temperature=2.0)
    module = kdfast.SparseKDLoss(divergence="jsd", alpha=0.2, beta=0.4, tail="renormalize", reduction="sum",
                                 label_smoothing=0.05)
    expected = functional.sparse_kd_loss(student, soft_labels, labels, divergence="jsd", alpha=0.2, beta=0.4,
                                         tail="renormalize", reduction="sum", label_smoothing=0.05)
    assert torch.equal(module(student, soft_labels, labels), expected)
    assert "tail='renormalize'" in repr(module)


# --------------------------------------------------------------------------- errors


def test_temperature_must_match_soft_labels():
    student, soft_labels, labels = make_case((3,), 100, 4, seed=13, temperature=2.0)
    functional.sparse_kd_loss(student, soft_labels, labels, temperature=2.0)
    with pytest.raises(ValueError, match="raw logits"):
        functional.sparse_kd_loss(student, soft_labels, labels, temperature=1.0)
    with pytest.raises(ValueError, match="raw logits"):
        reference.sparse_kd_loss(student, soft_labels, labels, temperature=4.0)


def test_bad_inputs():
    student, soft_labels, labels = make_case((3,), 100, 4, seed=14)
    with pytest.raises(ValueError, match="vocab size 99.*V=100"):
        functional.sparse_kd_loss(student[:, :99], soft_labels, labels)
    with pytest.raises(ValueError, match="leading"):
        functional.sparse_kd_loss(student[:2], soft_labels, labels[:2])
    with pytest.raises(ValueError, match="tail must be one of"):
        functional.sparse_kd_loss(student, soft_labels, labels, tail="drop")
    with pytest.raises(TypeError, match="SoftLabels"):
        functional.sparse_kd_loss(student, soft_labels.logprobs, labels)
    with pytest.raises(ValueError, match="alpha"):
        functional.sparse_kd_loss(student, soft_labels, None, alpha=0.5)
    with pytest.raises(ValueError, match="labels out of range"):
        functional.sparse_kd_loss(student, soft_labels, torch.tensor([0, 100, 1]))
    for loss_function in (functional.sparse_kd_loss, reference.sparse_kd_loss):
        repeated = soft_labels.indices.clone()
        repeated[1, 1] = repeated[1, 0]
        bad = SoftLabels(repeated, soft_labels.logprobs, soft_labels.tail_logprob, soft_labels.temperature, 100)
        if loss_function is functional.sparse_kd_loss:
            with pytest.raises(ValueError, match="repeat"):
                loss_function(student, bad, labels)
        out_of_range = soft_labels.indices.clone()
        out_of_range[0, 2] = -1
        bad = SoftLabels(out_of_range, soft_labels.logprobs, soft_labels.tail_logprob, soft_labels.temperature, 100)
        with pytest.raises(ValueError, match=r"\[0, 100\)"):
            loss_function(student, bad, labels)


# --------------------------------------------------------------------------- op contract


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda dtype: DTYPE_IDS[dtype])
def test_opcheck(tail, reduction, dtype):
    student, soft_labels, labels = make_case((5,), 60, 6, seed=15, dtype=dtype)
    logprobs, tail_logprob = soft_labels.logprobs, soft_labels.tail_logprob
    options = KDOptions(divergence="jsd", tail=tail, reduction=reduction, temperature=2.0, alpha=0.5,
                        label_smoothing=0.1)
    student.requires_grad_(True)
    outputs = sparse_ops.forward_outputs(student, options)
    forward_args = (student, soft_labels.indices, logprobs, tail_logprob, labels, *outputs, *options.values())
    torch.library.opcheck(sparse_ops.sparse_kd_forward, forward_args)
    _, row_stats, valid_rows = outputs
    grad_output = torch.rand(5) + 0.5 if reduction == "none" else torch.tensor(0.75)
    grad_output = grad_output.to(torch.float64 if dtype == torch.float64 else torch.float32)
    backward_args = (grad_output, student.detach(), soft_labels.indices, logprobs, tail_logprob, labels,
                     row_stats.detach(), valid_rows.detach(), torch.empty_like(student.detach()), *options.values())
    torch.library.opcheck(sparse_ops.sparse_kd_backward, backward_args)


@pytest.mark.parametrize("tail", TAILS)
def test_compile_fullgraph_forward_backward(tail):
    torch._dynamo.reset()
    student, soft_labels, labels = make_case((2, 4), 50, 5, seed=16, temperature=2.0)

    def training_step(student_logits, soft, label_tensor):
        loss = functional.sparse_kd_loss(student_logits * 1.5, soft, label_tensor, divergence="forward_kl",
                                         alpha=0.3, label_smoothing=0.1, tail=tail)
        return loss * 2.0

    compiled = torch.compile(training_step, fullgraph=True, backend="inductor")
    leaf = student.clone().requires_grad_(True)
    loss_compiled = compiled(leaf, soft_labels, labels)
    (grad_compiled,) = torch.autograd.grad(loss_compiled, leaf)
    loss_eager = training_step(leaf, soft_labels, labels)
    (grad_eager,) = torch.autograd.grad(loss_eager, leaf)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(grad_compiled) > 0
