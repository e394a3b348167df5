"""The custom-op contract of the dense KD loss: `torch.library.opcheck` on its ops (the
two-pass forward and backward, the one-pass forward with and without the in-place gradient,
the gradient scaling; schema, fake kernel, autograd registration, dispatcher behaviour) and
`torch.compile(fullgraph=True)` of code that calls `kdfast.functional.kd_loss`, forward
and backward (also one-pass and in place), with no graph break and the same values as eager
execution.
"""

import pytest
import torch

import kdfast
from kdfast.contract import KDOptions
from kdfast.ops import kd_loss as kd_ops

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd"]


def _sample(rows=5, vocab=37, dtype=torch.float32, teacher_dtype=None, labels=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator).to(dtype)
    teacher = torch.randn(rows, vocab, generator=generator).to(teacher_dtype or dtype)
    label_rows = torch.randint(0, vocab, (rows,), generator=generator) if labels else None
    if label_rows is not None:
        label_rows[1] = -100
    return student, teacher, label_rows


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_forward(divergence, reduction, dtype):
    student, teacher, labels = _sample(dtype=dtype)
    student.requires_grad_(True)
    options = KDOptions(divergence=divergence, reduction=reduction, temperature=2.0, alpha=0.5, label_smoothing=0.1)
    args = (student, teacher, labels, *kd_ops.forward_outputs(student, options), *options.values())
    torch.library.opcheck(kd_ops.kd_loss_forward, args)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_opcheck_backward(divergence, reduction):
    student, teacher, labels = _sample(teacher_dtype=torch.bfloat16)
    options = KDOptions(divergence=divergence, reduction=reduction, temperature=2.0, alpha=0.5)
    loss, row_stats, valid_rows = kd_ops.forward_outputs(student, options)
    kd_ops.kd_loss_forward(student, teacher, labels, loss, row_stats, valid_rows, *options.values())
    grad_output = torch.rand(student.shape[0]) + 0.5 if reduction == "none" else torch.tensor(0.75)
    args = (grad_output, student, teacher, labels, row_stats, valid_rows, torch.empty_like(student), *options.values())
    torch.library.opcheck(kd_ops.kd_loss_backward, args)


def test_opcheck_without_labels():
    student, teacher, _ = _sample(labels=False)
    student.requires_grad_(True)
    options = KDOptions(reduction="batchmean")
    args = (student, teacher, None, *kd_ops.forward_outputs(student, options), *options.values())
    torch.library.opcheck(kd_ops.kd_loss_forward, args)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_forward_backward(divergence, dtype):
    torch._dynamo.reset()

    def training_step(student, teacher, labels):
        # Shaping and arithmetic around the loss must trace into the same graph.
        loss = kdfast.functional.kd_loss(
            student * 1.5, teacher, labels, divergence=divergence, temperature=2.0, alpha=0.3, label_smoothing=0.1
        )
        return loss * 2.0

    student, teacher, labels = _sample(rows=8, vocab=50, dtype=dtype, seed=3)
    student_3d = student.reshape(2, 4, 50).requires_grad_(True)
    teacher_3d = teacher.reshape(2, 4, 50)
    labels_2d = labels.reshape(2, 4)

    compiled = torch.compile(training_step, fullgraph=True, backend="inductor")
    loss_compiled = compiled(student_3d, teacher_3d, labels_2d)
    (grad_compiled,) = torch.autograd.grad(loss_compiled, student_3d)

    loss_eager = training_step(student_3d, teacher_3d, labels_2d)
    (grad_eager,) = torch.autograd.grad(loss_eager, student_3d)

    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=1e-6)
    assert grad_compiled.dtype == dtype
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    assert torch.count_nonzero(grad_compiled) > 0


def test_compile_module_reduction_none():
    torch._dynamo.reset()
    loss_module = kdfast.KDLoss(divergence="reverse_kl", temperature=4.0, reduction="none")
    student, teacher, labels = _sample(rows=6, vocab=33, seed=5)
    student.requires_grad_(True)

    compiled = torch.compile(lambda s, t, y: loss_module(s, t, y), fullgraph=True)
    per_row = compiled(student, teacher, labels)
    assert per_row.shape == (6,)
    assert per_row[1].item() == 0.0  # ignored row
    weights = torch.arange(1.0, 7.0)
    (grad,) = torch.autograd.grad((per_row * weights).sum(), student)
    expected = loss_module(student, teacher, labels)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), student)
    torch.testing.assert_close(per_row, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_one_pass_ops(divergence, reduction, dtype):
    student, teacher, labels = _sample(dtype=dtype)
    options = KDOptions(divergence=divergence, reduction=reduction, temperature=2.0, alpha=0.5, label_smoothing=0.1)
    outputs = kd_ops.forward_outputs(student, options)
    gradient = torch.empty_like(student)
    torch.library.opcheck(kd_ops.kd_loss_forward_grad,
                          (student, teacher, labels, *outputs, gradient, *options.values()))
    torch.library.opcheck(kd_ops.kd_loss_forward_grad_inplace,
                          (student.clone(), teacher, labels, *kd_ops.forward_outputs(student, options),
                           *options.values()))
    kd_ops.kd_loss_forward_grad(student, teacher, labels, *outputs, gradient, *options.values())
    _, row_stats, valid_rows = outputs
    grad_output = torch.rand(student.shape[0]) + 0.5 if reduction == "none" else torch.tensor(0.75)
    for exact in (False, True):
        torch.library.opcheck(kd_ops.kd_loss_scale_gradient,
                              (grad_output, gradient, student, teacher, labels, row_stats, valid_rows,
                               torch.empty_like(student), exact, *options.values()))


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph_one_pass_matches_eager(inplace):
    torch._dynamo.reset()

    def training_step(hidden, weight, teacher, labels):
        logits = hidden @ weight.t()
        loss = kdfast.functional.kd_loss(logits, teacher, labels, temperature=2.0, alpha=0.3,
                                         inplace_backward=inplace)
        return loss * 3.0

    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(8, 16, generator=generator)
    weight = torch.randn(50, 16, generator=generator).requires_grad_(True)
    teacher = torch.randn(8, 50, generator=generator)
    labels = torch.randint(0, 50, (8,), generator=generator)
    compiled = torch.compile(training_step, fullgraph=True)
    loss_compiled = compiled(hidden, weight, teacher, labels)
    (grad_compiled,) = torch.autograd.grad(loss_compiled, weight)
    loss_eager = training_step(hidden, weight, teacher, labels)
    (grad_eager,) = torch.autograd.grad(loss_eager, weight)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-5, atol=1e-6)
