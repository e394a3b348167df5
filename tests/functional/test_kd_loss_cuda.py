"""Tests of the CUDA kernels of the dense KD loss (`kdfast.functional.kd_loss` on GPU tensors).

Skipped unless a GPU is visible and kdfast was built with its CUDA kernels
(`kdfast.build_info()["cuda"]`). Two parts:

- The whole CPU test suite of test_kd_loss.py (divergence × reduction × dtype × T × α ×
  label smoothing, vocabulary sizes 1/7/1271/50257, −inf entries, logits near ±1e4, ignored
  and all-ignored rows, non-contiguous rows, mixed dtypes, grad_output ≠ 1, float64
  gradcheck, ...) runs on "cuda" as well through conftest's `device` fixture: same inputs,
  same float64 oracle, same tolerances (kd_checks.py holds the shared comparison).
- GPU-only cases: the launch configurations of long and short rows (one team per row from a
  warp to 1024 threads, rows cut into chunks in the backward pass), 16-byte-aligned and
  unaligned rows, float64, labels out of range (NaN rows instead of an exception: the kernels
  never synchronise with the host), CUDA-graph capture and replay of forward + backward,
  a non-default stream, determinism, no float32 N×V temporary for bfloat16 inputs, and the
  one-pass gradient (the forward pass's, for grad_output = 1) for many and few rows.
"""

from __future__ import annotations

import math

import pytest
import torch

import kdfast
from kd_checks import (
    DIVERGENCES,
    assert_grad_close,
    assert_loss_close,
    check_against_reference,
    expected_loss_shape,
    make_grad_output,
    natural_scales,
    run_reference_float64,
    run_with_student_grad,
    stable_seed,
)
from kdfast import functional, reference
from kdfast.ops._native import has_cuda_kernels

CUDA_READY = torch.cuda.is_available() and has_cuda_kernels()
pytestmark = pytest.mark.skipif(
    not CUDA_READY, reason="needs a visible GPU and kdfast built with CUDA kernels (kdfast.build_info()['cuda'])"
)

def random_inputs(rows, vocab, *, seed, dtype=torch.float32, teacher_dtype=None, scale=3.0, ignore_every=4):
    """Seeded student/teacher logits [rows, vocab] and labels on the GPU; every `ignore_every`-th row ignored."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=generator, device="cuda") * scale).to(dtype)
    teacher = (torch.randn(rows, vocab, generator=generator, device="cuda") * scale).to(teacher_dtype or dtype)
    labels = torch.randint(0, vocab, (rows,), generator=generator, device="cuda")
    if ignore_every:
        labels[::ignore_every] = -100
    return student, teacher, labels


# --------------------------------------------------------------------------------------
# Launch configurations: long rows (large teams, chunked backward) and many short rows.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize(
    "rows, vocab",
    [(3, 256000), (2, 131072 + 5), (300, 20000), (4096, 1000), (1000, 33)],
    ids=["few-long", "long-odd", "many-medium", "many-short", "many-tiny"],
)
def test_launch_shapes_match_reference(rows, vocab, divergence, dtype):
    context = f"shape/{rows}x{vocab}/{divergence}/{dtype}"
    student, teacher, labels = random_inputs(rows, vocab, seed=stable_seed(context), dtype=dtype)
    check_against_reference(
        student, teacher, labels, reduction="mean", context=context, divergence=divergence, temperature=2.0,
        alpha=0.5, label_smoothing=0.1,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rows, vocab", [(600, 20000), (4096, 1000), (3, 256000), (64, 5000)],
                         ids=["one-pass-medium", "one-pass-short", "few-long", "few-medium"])
def test_one_pass_gradient_with_unit_grad_output(rows, vocab, reduction, divergence, dtype):
    """The gradient the forward pass writes (the one-pass kernel for many rows, the backward
    kernel after the forward kernels for few) is the one loss.backward() returns: grad_output
    1 leaves it as it is. With reduction "none" every other row gets 1.5 instead, so that the
    backward kernel recomputes those rows and leaves the others."""
    context = f"one-pass/{rows}x{vocab}/{reduction}/{divergence}/{dtype}"
    student, teacher, labels = random_inputs(rows, vocab, seed=stable_seed(context), dtype=dtype)
    options = dict(reduction=reduction, divergence=divergence, temperature=2.0, alpha=0.5, label_smoothing=0.1)
    grad_output = torch.ones(expected_loss_shape((rows,), reduction), dtype=torch.float64, device="cuda")
    if reduction == "none":
        grad_output[1::2] = 1.5
    loss, gradient = run_with_student_grad(functional.kd_loss, student, teacher, labels, grad_output, **options)
    expected_loss, expected_gradient = run_reference_float64(student, teacher, labels, grad_output, **options)
    loss_scale, grad_scale = natural_scales(temperature=2.0, alpha=0.5, reduction=reduction, labels=labels,
                                            row_count=rows, grad_output=grad_output)
    assert_loss_close(loss, expected_loss, loss_scale=loss_scale, context=context)
    assert_grad_close(gradient, expected_gradient, grad_scale=grad_scale, context=context)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_benchmark_shapes_forward_backward(reduction):
    """The benchmark's few-long (64 × 256000) and many-short (65536 × 1000) bfloat16 shapes."""
    for rows, vocab in [(64, 256000), (65536, 1000)]:
        context = f"bench-shape/{rows}x{vocab}/{reduction}"
        student, teacher, labels = random_inputs(rows, vocab, seed=stable_seed(context), dtype=torch.bfloat16)
        check_against_reference(
            student, teacher, labels, reduction=reduction, context=context, divergence="forward_kl", temperature=2.0,
            alpha=0.5,
        )


def check_view_against_reference(base_student, make_view, teacher, labels, *, reduction, context, **options):
    """Like check_against_reference, but the student is `make_view(leaf)` for a leaf copy of
    `base_student`, so that the kernels see the view's layout (a clone of the view itself would
    be made contiguous); the gradient is read back through the same view of leaf.grad."""
    leaf = base_student.detach().clone().requires_grad_(True)
    student = make_view(leaf)
    loss = functional.kd_loss(student, teacher, labels, reduction=reduction, **options)
    grad_output = make_grad_output(expected_loss_shape(student.shape[:-1], reduction), stable_seed(context, "grad"),
                                   student.device)
    loss.backward(grad_output.to(loss.dtype))
    gradient = make_view(leaf.grad)
    expected_loss, expected_gradient = run_reference_float64(student.detach(), teacher, labels, grad_output,
                                                             reduction=reduction, **options)
    loss_scale, grad_scale = natural_scales(
        temperature=options.get("temperature", 1.0), alpha=options.get("alpha", 0.0), reduction=reduction,
        labels=labels, row_count=student.shape[0], grad_output=grad_output,
    )
    assert_loss_close(loss.detach(), expected_loss, loss_scale=loss_scale, context=context)
    assert_grad_close(gradient, expected_gradient, grad_scale=grad_scale, context=context)
    return student


@pytest.mark.parametrize("offset", [1, 3, 8], ids=lambda offset: f"offset{offset}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_unaligned_rows(dtype, offset):
    """Student and teacher rows at different offsets from the 16-byte grid (student `offset`,
    teacher 8 - offset) take the element-by-element loads; with offset 8 (16 or 32 bytes) both
    views are aligned and take the 16-byte loads. Equal offsets (vector path with a scalar head)
    are test_kd_loss_cuda_layout.py's."""
    context = f"unaligned/{dtype}/{offset}"
    rows, vocab = 5, 4096
    base_student, base_teacher, labels = random_inputs(rows, vocab + 8, seed=stable_seed(context), dtype=dtype)
    teacher_offset = 8 - offset % 8
    teacher = base_teacher[:, teacher_offset:teacher_offset + vocab]
    labels = labels.clamp(max=vocab - 1)
    student = check_view_against_reference(
        base_student, lambda tensor: tensor[:, offset:offset + vocab], teacher, labels, reduction="sum",
        context=context, divergence="reverse_kl", temperature=2.0, alpha=0.3, label_smoothing=0.1,
    )
    misaligned = student.data_ptr() % 16 != 0
    assert misaligned == (offset * student.element_size() % 16 != 0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_aligned_row_stride_with_odd_vocab(divergence):
    """Rows 16-byte aligned (row stride padded to 1008 elements) while V = 1003 is not a multiple
    of the vector width: 16-byte loads and stores plus an element-by-element tail per row."""
    rows, vocab, padded = 6, 1003, 1008
    context = f"padded-stride/{divergence}"
    base_student, base_teacher, labels = random_inputs(rows, padded, seed=stable_seed(context), dtype=torch.bfloat16)
    labels = labels.clamp(max=vocab - 1)
    check_view_against_reference(
        base_student, lambda tensor: tensor[:, :vocab], base_teacher[:, :vocab], labels, reduction="none",
        context=context, divergence=divergence, temperature=4.0, alpha=0.5, label_smoothing=0.1,
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_float64_matches_reference(divergence, reduction):
    context = f"float64/{divergence}/{reduction}"
    student, teacher, labels = random_inputs(7, 301, seed=stable_seed(context), dtype=torch.float64)
    check_against_reference(
        student, teacher, labels, reduction=reduction, context=context, divergence=divergence, temperature=1.5,
        alpha=0.4, beta=0.3, label_smoothing=0.1,
    )


def test_mixed_dtypes_long_rows():
    context = "mixed-long"
    student, teacher, labels = random_inputs(4, 50000, seed=stable_seed(context), dtype=torch.float32,
                                             teacher_dtype=torch.bfloat16)
    check_against_reference(student, teacher, labels, reduction="mean", context=context, divergence="forward_kl",
                            temperature=2.0, alpha=0.5)


# --------------------------------------------------------------------------------------
# Labels out of range: no exception on CUDA (that would need a host synchronisation).


@pytest.mark.parametrize("bad_label", [-1, 12, 1000])
def test_out_of_range_label_gives_nan_row(bad_label):
    student, teacher, labels = random_inputs(4, 12, seed=5, ignore_every=0)
    labels[2] = bad_label
    student.requires_grad_(True)
    loss = functional.kd_loss(student, teacher, labels, reduction="none", alpha=0.5, temperature=2.0)
    assert torch.isnan(loss[2]), f"row with label {bad_label} should have a NaN loss, got {loss}"
    assert torch.isfinite(loss[[0, 1, 3]]).all()
    loss.sum().backward()
    assert torch.isnan(student.grad[2]).all()
    assert torch.isfinite(student.grad[[0, 1, 3]]).all()
    mean_loss = functional.kd_loss(student.detach(), teacher, labels, reduction="mean", alpha=0.5)
    assert torch.isnan(mean_loss)


# --------------------------------------------------------------------------------------
# CUDA graphs, streams, determinism, memory.


def _options(reduction="mean"):
    return dict(divergence="forward_kl", temperature=2.0, alpha=0.5, label_smoothing=0.1, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_graph_capture_and_replay(reduction):
    """Forward + backward captured once, replayed on new values copied into the static inputs
    (including a different set of ignored rows: the mean's denominator is read on the device)."""
    rows, vocab = 64, 5000
    first = random_inputs(rows, vocab, seed=11, dtype=torch.bfloat16, ignore_every=4)
    second = random_inputs(rows, vocab, seed=12, dtype=torch.bfloat16, ignore_every=3)
    static_student, static_teacher, static_labels = (tensor.clone() for tensor in first)
    grad_output_shape = expected_loss_shape((rows,), reduction)
    static_grad_output = make_grad_output(grad_output_shape, 3, "cuda").float()

    def step():
        leaf = static_student.detach().requires_grad_(True)
        loss = functional.kd_loss(leaf, static_teacher, static_labels, **_options(reduction))
        (gradient,) = torch.autograd.grad(loss, leaf, grad_outputs=static_grad_output)
        return loss, gradient

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_gradient = step()

    for student, teacher, labels in (second, first):
        static_student.copy_(student)
        static_teacher.copy_(teacher)
        static_labels.copy_(labels)
        graph.replay()
        torch.cuda.synchronize()
        eager_loss, eager_gradient = run_with_student_grad(
            functional.kd_loss, student, teacher, labels, static_grad_output, **_options(reduction)
        )
        assert torch.equal(static_loss, eager_loss), f"replayed loss {static_loss} != eager {eager_loss}"
        assert torch.equal(static_gradient, eager_gradient), "replayed gradient differs from eager"


def test_runs_on_the_current_stream():
    """Work is enqueued on torch's current stream: inputs written on a side stream behind a
    long sleep are seen by the loss computed on that stream."""
    rows, vocab = 256, 8192
    old = random_inputs(rows, vocab, seed=21, dtype=torch.bfloat16)
    new = random_inputs(rows, vocab, seed=22, dtype=torch.bfloat16)
    student, teacher, labels = (tensor.clone() for tensor in old)
    grad_output = make_grad_output((rows,), 4, "cuda").float()
    expected_loss, expected_gradient = run_with_student_grad(functional.kd_loss, *new, grad_output,
                                                             **_options("none"))
    torch.cuda.synchronize()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time before the inputs change
        student.copy_(new[0])
        teacher.copy_(new[1])
        labels.copy_(new[2])
        leaf = student.detach().requires_grad_(True)
        loss = functional.kd_loss(leaf, teacher, labels, **_options("none"))
        (gradient,) = torch.autograd.grad(loss, leaf, grad_outputs=grad_output)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(loss, expected_loss)
    assert torch.equal(gradient, expected_gradient)


def test_deterministic():
    student, teacher, labels = random_inputs(512, 32000, seed=31, dtype=torch.bfloat16)
    results = []
    for _ in range(3):
        leaf = student.detach().requires_grad_(True)
        loss = functional.kd_loss(leaf, teacher, labels, **_options("mean"))
        loss.backward()
        results.append((loss.detach().clone(), leaf.grad.clone()))
    for loss, gradient in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert torch.equal(gradient, results[0][1])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_no_float32_temporary_for_bfloat16(divergence):
    """Peak memory of forward + backward above the inputs: the bf16 gradient and O(rows) buffers."""
    rows, vocab = 2048, 32768
    student, teacher, labels = random_inputs(rows, vocab, seed=41, dtype=torch.bfloat16)
    leaf = student.detach().requires_grad_(True)
    options = dict(_options("mean"), divergence=divergence)
    functional.kd_loss(leaf, teacher, labels, **options).backward()  # warm up
    leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = functional.kd_loss(leaf, teacher, labels, **options)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    gradient_bytes = rows * vocab * 2
    float32_bytes = rows * vocab * 4
    assert extra <= gradient_bytes + 4 * 2**20, (
        f"peak {extra / 2**20:.1f} MiB above the inputs; the bf16 gradient is {gradient_bytes / 2**20:.1f} MiB "
        f"(a float32 N×V temporary would be {float32_bytes / 2**20:.1f} MiB)"
    )


def test_build_info_lists_cuda():
    info = kdfast.build_info()
    assert info["cuda"] is True
    assert info["cuda_version"] and info["cuda_architectures"]
    major, minor = torch.cuda.get_device_capability()

    def runs_here(arch: str) -> bool:  # e.g. "80", "90a", "native"
        digits = "".join(character for character in arch if character.isdigit())
        return not digits or int(digits) <= 10 * major + minor

    assert any(runs_here(arch) for arch in info["cuda_architectures"]), (
        f"compiled for {info['cuda_architectures']}, device is sm_{major}{minor}"
    )


def test_module_on_cuda_matches_functional():
    student, teacher, labels = random_inputs(16, 777, seed=51, dtype=torch.float16)
    module = kdfast.KDLoss(divergence="tvd", temperature=3.0, alpha=0.2, reduction="batchmean")
    grad_output = make_grad_output((), 6, "cuda")
    module_loss, module_grad = run_with_student_grad(module, student, teacher, labels, grad_output)
    functional_loss, functional_grad = run_with_student_grad(
        functional.kd_loss, student, teacher, labels, grad_output, divergence="tvd", temperature=3.0, alpha=0.2,
        reduction="batchmean",
    )
    assert torch.equal(module_loss, functional_loss) and torch.equal(module_grad, functional_grad)
    assert math.isfinite(float(module_loss))
    expected = reference.kd_loss(student.double(), teacher.double(), labels, divergence="tvd", temperature=3.0,
                                 alpha=0.2, reduction="batchmean")
    assert abs(float(module_loss) - float(expected)) <= 1e-4 * max(1.0, abs(float(expected)))
