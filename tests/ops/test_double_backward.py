"""Second-order gradients through every op family's autograd wrapper.

A backward pass with create_graph=True (a gradient penalty, `gradgradcheck`) must return a
gradient that carries a graph, so that its own gradient is the exact second derivative and
never a silent zero. Checked in float64 on small shapes with `gradcheck` and `gradgradcheck`
for the dense, sparse (top-k), multi-teacher and fused linear losses over their options
(divergences, α, label smoothing, ignored rows, reductions, tail and combine modes, softcap,
teacher kinds); a gradient penalty through a small model must match the same penalty
computed through `kdfast.reference`; the first-order gradient of the graph-recording path
must equal the kernels' one; and the vocabulary-parallel path, which has no second-order
gradient, must refuse with RuntimeError rather than return a gradient without a graph.
"""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast import functional, reference

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "none", "batchmean")
ROWS, VOCAB = 4, 6


def _inputs(seed: int, rows: int = ROWS, vocab: int = VOCAB):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 1.5).requires_grad_()
    teacher = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 1.5
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[1] = -100
    return student, teacher, labels


def _check_first_and_second_order(loss_fn, inputs, *, fast_mode=True, nondet_tol=0.0):
    """gradcheck and gradgradcheck; fast mode (random projections of the Jacobians) keeps the
    option sweeps quick, and a few representative cases run the full element-wise check."""
    assert torch.autograd.gradcheck(loss_fn, inputs, fast_mode=fast_mode, nondet_tol=nondet_tol)
    assert torch.autograd.gradgradcheck(loss_fn, inputs, fast_mode=fast_mode, nondet_tol=nondet_tol)


def _graph_gradients_equal_plain_ones(loss_fn, inputs):
    """The create_graph path gives the kernels' first-order gradient, and a gradient with a graph."""
    plain = torch.autograd.grad(loss_fn(*inputs).sum(), inputs)
    recorded = torch.autograd.grad(loss_fn(*inputs).sum(), inputs, create_graph=True)
    for expected, actual in zip(plain, recorded):
        assert actual.requires_grad and actual.grad_fn is not None
        torch.testing.assert_close(actual.detach(), expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- dense
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha, label_smoothing", [(0.0, 0.0), (0.4, 0.1)])
def test_dense_gradgradcheck(divergence, reduction, alpha, label_smoothing):
    student, teacher, labels = _inputs(seed=1)

    def loss_fn(s):
        return functional.kd_loss(s, teacher, labels, divergence=divergence, reduction=reduction, alpha=alpha,
                                  label_smoothing=label_smoothing, temperature=2.0, beta=0.3)

    _check_first_and_second_order(loss_fn, (student,), fast_mode=not (reduction == "none" and alpha > 0))
    _graph_gradients_equal_plain_ones(loss_fn, (student,))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_dense_without_labels_and_single_term(alpha):
    student, teacher, labels = _inputs(seed=2)
    chosen = labels if alpha > 0 else None
    _check_first_and_second_order(
        lambda s: functional.kd_loss(s, teacher, chosen, alpha=alpha, t2_scale=False, temperature=0.7), (student,))


@pytest.mark.parametrize("family", ["dense", "sparse", "multi_teacher", "fused_linear"])
def test_custom_ignore_index(family):
    """Rows labelled with a non-default ignore_index get no first- or second-order gradient."""
    student, teacher, labels = _inputs(seed=13)
    labels[1], labels[2] = 0, 5
    options = dict(ignore_index=5, alpha=0.5, reduction="sum")
    if family == "fused_linear":
        h, w, b, teacher_hidden, teacher_weight, _ = _fused_inputs(seed=13)
        inputs = (h, w, b)

        def loss_fn(hh, ww, bb):
            return functional.fused_linear_kd_loss(hh, ww, teacher_hidden @ teacher_weight.t(), labels,
                                                   student_bias=bb, **options)
    else:
        inputs = (student,)
        soft = kdfast.compress_topk(teacher, 3)
        loss_fn = {"dense": lambda s: functional.kd_loss(s, teacher, labels, **options),
                   "sparse": lambda s: functional.sparse_kd_loss(s, soft, labels, **options),
                   "multi_teacher": lambda s: functional.multi_teacher_kd_loss(s, [teacher, -teacher], labels,
                                                                               **options)}[family]
    _check_first_and_second_order(loss_fn, inputs, nondet_tol=1e-12)
    grads = torch.autograd.grad(loss_fn(*inputs), inputs, create_graph=True)
    (second,) = torch.autograd.grad(grads[0].square().sum(), inputs[0])
    assert float(grads[0][2].detach().abs().max()) == 0.0 and float(second[2].abs().max()) == 0.0


def test_dense_all_rows_ignored_gives_zero_second_order():
    student, teacher, _ = _inputs(seed=3)
    ignored = torch.full((ROWS,), -100)
    (grad,) = torch.autograd.grad(functional.kd_loss(student, teacher, ignored, alpha=0.5), student, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), student, allow_unused=True)
    assert float(grad.detach().abs().max()) == 0.0
    assert second is None or float(second.abs().max()) == 0.0


# ---------------------------------------------------------------------------------- sparse
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sparse_gradgradcheck(divergence, tail, reduction):
    student, teacher, labels = _inputs(seed=4, vocab=9)
    soft = kdfast.compress_topk(teacher, 4, temperature=1.5)

    def loss_fn(s):
        return functional.sparse_kd_loss(s, soft, labels, divergence=divergence, tail=tail, reduction=reduction,
                                         alpha=0.3, label_smoothing=0.05)

    _check_first_and_second_order(loss_fn, (student,))
    _graph_gradients_equal_plain_ones(loss_fn, (student,))


# ---------------------------------------------------------------------------- multi-teacher
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("combine", ["sum", "mixture"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_multi_teacher_gradgradcheck(divergence, combine, reduction):
    student, teacher, labels = _inputs(seed=5)
    teachers = [teacher, teacher.flip(-1) * 0.5]

    def loss_fn(s):
        return functional.multi_teacher_kd_loss(s, teachers, labels, weights=[2.0, 1.0], combine=combine,
                                                divergence=divergence, reduction=reduction, alpha=0.25,
                                                temperature=1.5)

    # forward_kl on the CPU: the first backward uses the gradient the forward kernel wrote, a
    # repeated one the backward kernel, which may differ in the last bits
    _check_first_and_second_order(loss_fn, (student,), nondet_tol=1e-12)
    _graph_gradients_equal_plain_ones(loss_fn, (student,))


# ------------------------------------------------------------------------------ fused linear
def _fused_inputs(seed: int, rows: int = ROWS, hidden: int = 3, vocab: int = VOCAB):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=generator, dtype=torch.float64).requires_grad_()
    w = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64).requires_grad_()
    b = torch.randn(vocab, generator=generator, dtype=torch.float64).requires_grad_()
    teacher_hidden = torch.randn(rows, 2, generator=generator, dtype=torch.float64)
    teacher_weight = torch.randn(vocab, 2, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[2] = -100
    return h, w, b, teacher_hidden, teacher_weight, labels


@pytest.mark.parametrize("teacher_kind", ["logits", "hidden", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_linear_gradgradcheck(teacher_kind, reduction, softcap):
    h, w, b, teacher_hidden, teacher_weight, labels = _fused_inputs(seed=6)
    teacher_logits = teacher_hidden @ teacher_weight.t()
    teacher = {"logits": teacher_logits, "hidden": (teacher_hidden, teacher_weight),
               "soft": kdfast.compress_topk(teacher_logits, 3)}[teacher_kind]

    def loss_fn(hh, ww, bb):
        return functional.fused_linear_kd_loss(hh, ww, teacher, labels, student_bias=bb, chunk_size=3,
                                               softcap=softcap, reduction=reduction, divergence="jsd", alpha=0.3,
                                               label_smoothing=0.1)

    _check_first_and_second_order(loss_fn, (h, w, b), fast_mode=not (teacher_kind == "soft" and softcap))
    _graph_gradients_equal_plain_ones(loss_fn, (h, w, b))


def test_fused_linear_frozen_weight():
    """Only the inputs that need a gradient get one; a frozen lm_head weight is left alone."""
    h, w, b, teacher_hidden, teacher_weight, labels = _fused_inputs(seed=7)
    frozen = w.detach()
    loss = functional.fused_linear_kd_loss(h, frozen, teacher_hidden @ teacher_weight.t(), labels, alpha=0.5)
    (grad,) = torch.autograd.grad(loss, h, create_graph=True)
    assert grad.grad_fn is not None
    assert torch.autograd.gradgradcheck(
        lambda hh: functional.fused_linear_kd_loss(hh, frozen, teacher_hidden @ teacher_weight.t(), labels,
                                                   alpha=0.5), (h,))


# -------------------------------------------------------------------------- gradient penalty
def _penalised_parameter_gradients(loss_fn, seed: int):
    """∂/∂θ of loss + λ·‖∂loss/∂logits‖² for logits = Linear_θ(x): needs the second derivative."""
    generator = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(5, VOCAB, dtype=torch.float64)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(ROWS, 5, generator=generator, dtype=torch.float64)
    logits = model(x)
    loss = loss_fn(logits)
    (grad_logits,) = torch.autograd.grad(loss, logits, create_graph=True)
    penalty = loss + 10.0 * grad_logits.square().sum()
    return torch.autograd.grad(penalty, list(model.parameters()))


def _family_losses(seed: int):
    _, teacher, labels = _inputs(seed=seed)
    soft = kdfast.compress_topk(teacher, 3)
    teachers = [teacher, teacher * 0.5 - 1.0]
    options = dict(alpha=0.3, temperature=2.0, label_smoothing=0.1)
    return {
        "dense": (lambda s: functional.kd_loss(s, teacher, labels, divergence="jsd", **options),
                  lambda s: reference.kd_loss(s, teacher, labels, divergence="jsd", **options)),
        "sparse": (lambda s: functional.sparse_kd_loss(s, soft, labels, divergence="reverse_kl", alpha=0.3),
                   lambda s: reference.sparse_kd_loss(s, soft, labels, divergence="reverse_kl", alpha=0.3)),
        "multi_teacher": (lambda s: functional.multi_teacher_kd_loss(s, teachers, labels, combine="mixture", **options),
                          lambda s: reference.multi_teacher_kd_loss(s, teachers, labels, combine="mixture",
                                                                    **options)),
    }


@pytest.mark.parametrize("family", ["dense", "sparse", "multi_teacher"])
def test_gradient_penalty_matches_reference(family):
    kdfast_loss, reference_loss = _family_losses(seed=8)[family]
    actual = _penalised_parameter_gradients(kdfast_loss, seed=9)
    expected = _penalised_parameter_gradients(reference_loss, seed=9)
    without_penalty = _penalised_parameter_gradients(lambda s: kdfast_loss(s.detach()) + 0.0 * s.sum(), seed=9)
    for got, want, flat in zip(actual, expected, without_penalty):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(got, flat)  # the penalty term is there (not silently zero)


def test_fused_linear_gradient_penalty_matches_reference():
    h, w, b, teacher_hidden, teacher_weight, labels = _fused_inputs(seed=10)
    teacher = teacher_hidden @ teacher_weight.t()
    options = dict(divergence="forward_kl", alpha=0.2, temperature=1.5)

    def penalised(loss_fn):
        loss = loss_fn(h, w, b)
        (grad_hidden,) = torch.autograd.grad(loss, h, create_graph=True)
        return torch.autograd.grad(loss + grad_hidden.square().sum(), [h, w, b])

    actual = penalised(lambda hh, ww, bb: functional.fused_linear_kd_loss(
        hh, ww, teacher, labels, student_bias=bb, softcap=2.5, chunk_size=3, **options))
    expected = penalised(lambda hh, ww, bb: reference.kd_loss(
        2.5 * torch.tanh((hh @ ww.t() + bb) / 2.5), teacher, labels, **options))
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_second_order_matches_float64(dtype):
    """Double backward also works for float32/bfloat16 students: gradients in the student's dtype."""
    student64, teacher, labels = _inputs(seed=11)
    student = student64.detach().to(dtype).requires_grad_()
    (grad,) = torch.autograd.grad(functional.kd_loss(student, teacher.to(dtype), labels, alpha=0.5), student,
                                  create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), student)
    exact = student.detach().double().requires_grad_()
    (grad64,) = torch.autograd.grad(reference.kd_loss(exact, teacher.to(dtype).double(), labels, alpha=0.5), exact,
                                    create_graph=True)
    (second64,) = torch.autograd.grad(grad64.square().sum(), exact)
    assert grad.dtype == second.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2.0**-7
    assert float((second.double() - second64).abs().max()) <= tolerance * float(second64.abs().max())


# ------------------------------------------------------------------------- vocabulary-parallel
@pytest.fixture
def single_process_group():
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed without a default process group")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss_kind", ["kd_loss", "sparse_kd_loss", "fused_linear_kd_loss"])
def test_vocab_parallel_refuses_second_order(single_process_group, loss_kind):
    h, w, b, teacher_hidden, teacher_weight, labels = _fused_inputs(seed=12)
    teacher = teacher_hidden @ teacher_weight.t()
    student = (h @ w.t()).detach().requires_grad_()
    group = single_process_group
    if loss_kind == "kd_loss":
        loss, wrt = functional.kd_loss(student, teacher, labels, process_group=group), student
    elif loss_kind == "sparse_kd_loss":
        soft = kdfast.compress_topk(teacher, 3)
        loss, wrt = functional.sparse_kd_loss(student, soft, labels, process_group=group), student
    else:
        loss, wrt = functional.fused_linear_kd_loss(h, w, teacher, labels, process_group=group), h
    (first,) = torch.autograd.grad(loss, wrt, retain_graph=True)  # first order still works
    assert torch.isfinite(first).all()
    with pytest.raises(RuntimeError, match=rf"{loss_kind} with process_group does not support second-order"):
        torch.autograd.grad(loss, wrt, create_graph=True)
