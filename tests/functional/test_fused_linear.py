"""fused_linear_kd_loss against the float64 reference: lm_head in float64, then reference KD.

Covers the three teacher kinds (logits, hidden states + weight, top-k SoftLabels), every
reduction with grad_output ≠ 1, softcap, chunk sizes that do and do not divide the rows,
bf16 (with a softcap computed in float32), vocabulary mapping (truncate / index map) and the
errors, torch.compile and opcheck.
"""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast import reference
from kdfast.contract import KDOptions
from kdfast.functional import fused_linear_kd_loss

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "none", "batchmean")


def _make(rows=37, hidden=24, vocab=131, teacher_hidden=20, dtype=torch.float32, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    h = (torch.randn(rows, hidden, generator=generator) / hidden**0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=generator) * 2).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=generator) * 0.5).to(dtype).requires_grad_() if bias else None
    th = torch.randn(rows, teacher_hidden, generator=generator) / teacher_hidden**0.5
    tw = torch.randn(vocab, teacher_hidden, generator=generator) * 3
    tb = torch.randn(vocab, generator=generator)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[::5] = -100
    return h, w, b, th, tw, tb, labels


def _reference(h, w, b, teacher, labels, softcap=None, sparse=False, **options):
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    logits = h64 @ w64.t() + (b64 if b64 is not None else 0)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if sparse:
        loss = reference.sparse_kd_loss(logits, teacher, labels, **options)
    else:
        loss = reference.kd_loss(logits, teacher.double(), labels, **options)
    return loss, [x for x in (h64, w64, b64) if x is not None]


def _check(loss, ref_loss, inputs, ref_inputs, rtol, grad_output=None):
    if grad_output is None:
        grad_output = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7)) + 1.5
    grads = torch.autograd.grad(loss, inputs, grad_output.to(loss.dtype))
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs, grad_output.double())
    scale = ref_loss.abs().max().clamp(min=1e-6)
    assert (loss.double() - ref_loss).abs().max() <= rtol * scale
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == ref_inputs[0].dtype or grad.dtype == inputs[0].dtype
        assert torch.isfinite(grad).all()
        assert (grad.double() - ref).abs().max() <= rtol * ref.abs().max().clamp(min=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden"])
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_dense_teacher_matches_reference(divergence, reduction, teacher_kind, chunk_size):
    h, w, b, th, tw, tb, labels = _make(seed=hash((divergence, reduction)) % 1000)
    options = dict(divergence=divergence, temperature=2.0, alpha=0.25, reduction=reduction, label_smoothing=0.1)
    teacher_logits = th @ tw.t() + tb
    teacher = teacher_logits if teacher_kind == "logits" else (th, tw, tb)
    loss = fused_linear_kd_loss(h, w, teacher, labels, student_bias=b, chunk_size=chunk_size, **options)
    ref_loss, ref_inputs = _reference(h, w, b, teacher_logits, labels, **options)
    _check(loss, ref_loss, [h, w, b], ref_inputs, rtol=2e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_label_teacher_matches_reference(divergence, tail, reduction):
    h, w, b, th, tw, tb, labels = _make(seed=3)
    soft = kdfast.compress_topk(th @ tw.t() + tb, 9, temperature=1.5)
    options = dict(divergence=divergence, alpha=0.2, reduction=reduction, tail=tail)
    loss = fused_linear_kd_loss(h, w, soft, labels, student_bias=b, chunk_size=10, **options)
    ref_loss, ref_inputs = _reference(h, w, b, soft, labels, sparse=True, temperature=1.5, **options)
    _check(loss, ref_loss, [h, w, b], ref_inputs, rtol=2e-5)


@pytest.mark.parametrize("softcap", [3.0, 30.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap(softcap, reduction):
    h, w, b, th, tw, tb, labels = _make(seed=5)
    options = dict(divergence="forward_kl", temperature=1.0, alpha=0.5, reduction=reduction)
    loss = fused_linear_kd_loss(h, w, (th, tw, tb), labels, student_bias=b, chunk_size=16, softcap=softcap, **options)
    ref_loss, ref_inputs = _reference(h, w, b, th @ tw.t() + tb, labels, softcap=softcap, **options)
    _check(loss, ref_loss, [h, w, b], ref_inputs, rtol=2e-5)


def test_no_bias_three_dimensional_inputs_and_default_chunk():
    h, w, _, th, tw, tb, labels = _make(rows=24, seed=11, bias=False)
    h3 = h.detach().reshape(4, 6, -1).requires_grad_()
    teacher = (th @ tw.t()).reshape(4, 6, -1)
    loss = fused_linear_kd_loss(h3, w, teacher, labels.reshape(4, 6), reduction="none", alpha=0.1, temperature=3.0)
    assert loss.shape == (4, 6)
    ref_loss, ref_inputs = _reference(h3, w, None, teacher, labels.reshape(4, 6), reduction="none", alpha=0.1,
                                      temperature=3.0)
    _check(loss, ref_loss, [h3, w], ref_inputs, rtol=2e-5)


def test_bfloat16_within_twice_the_same_precision_reference():
    h, w, b, th, tw, tb, labels = _make(rows=64, vocab=257, dtype=torch.bfloat16, seed=2)
    teacher = (th @ tw.t() + tb).to(torch.bfloat16)
    options = dict(divergence="forward_kl", temperature=2.0, alpha=0.5)
    loss = fused_linear_kd_loss(h, w, teacher, labels, student_bias=b, chunk_size=16, **options)
    ref_loss, ref_inputs = _reference(h, w, b, teacher, labels, **options)
    # the same-precision reference: bf16 matmul, then the loss in float32
    lowp = reference.kd_loss((h @ w.t() + b).float(), teacher.float(), labels, **options)
    grads = torch.autograd.grad(loss, [h, w, b])
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs)
    lowp_grads = torch.autograd.grad(lowp, [h, w, b])
    assert abs(loss.double() - ref_loss) <= 2 * abs(lowp.double() - ref_loss) + 1e-3 * abs(ref_loss)
    for grad, ref, low in zip(grads, ref_grads, lowp_grads):
        assert grad.dtype == torch.bfloat16
        error, low_error = (grad.double() - ref).abs().max(), (low.double() - ref).abs().max()
        assert error <= 2 * low_error + 1e-2 * ref.abs().max()


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("teacher_kind", ["logits", "soft"])
def test_bfloat16_softcap_is_computed_in_float32(reduction, teacher_kind):
    """The cap c·tanh(s/c) and its derivative run in float32 on the bf16 logits h·Wᵀ + b: the loss is
    within one bf16 rounding (2^-8 relative, per row) of the float64 reference on those logits, and
    the gradients within the rounding of the logit gradient and of the bf16 matmuls."""
    rows, softcap = 32, 30.0
    generator = torch.Generator().manual_seed(21)
    h = (torch.randn(rows, 64, generator=generator) / 8).bfloat16().requires_grad_()
    w = (torch.randn(257, 64, generator=generator) * 20).bfloat16().requires_grad_()
    b = torch.randn(257, generator=generator).bfloat16().requires_grad_()
    teacher_logits = torch.randn(rows, 257, generator=generator) * 10
    labels = torch.randint(0, 257, (rows,), generator=generator)
    labels[::7] = -100
    soft = teacher_kind == "soft"
    teacher = kdfast.compress_topk(teacher_logits, 16) if soft else teacher_logits
    options = dict(divergence="forward_kl", alpha=0.5, reduction=reduction)
    loss = fused_linear_kd_loss(h, w, teacher, labels, student_bias=b, softcap=softcap, chunk_size=rows, **options)
    logits = (h @ w.t() + b).detach().double().requires_grad_()  # the bf16 logits, exactly
    capped = softcap * torch.tanh(logits / softcap)
    ref_loss = (reference.sparse_kd_loss(capped, teacher, labels, **options) if soft
                else reference.kd_loss(capped, teacher.double(), labels, **options))
    assert loss.dtype == torch.float32
    assert bool(((loss.double() - ref_loss).abs() <= 2.0**-8 * ref_loss.abs() + 1e-6).all())
    grad_output = torch.rand(loss.shape, generator=generator) + 0.5
    grads = torch.autograd.grad(loss, [h, w, b], grad_output)
    (grad_logits,) = torch.autograd.grad(ref_loss, logits, grad_output.double())
    for grad, ref in zip(grads, (grad_logits @ w.double(), grad_logits.t() @ h.double(), grad_logits.sum(0))):
        assert grad.dtype == torch.bfloat16
        assert bool(((grad.double() - ref).abs() <= 2.0**-8 * (ref.abs() + ref.abs().max())).all())


def test_vocab_truncate_excludes_padding_columns():
    h, w, b, th, tw, tb, labels = _make(vocab=131, seed=4)
    padded_w = torch.cat([tw, torch.randn(13, tw.shape[1]) * 5])  # padded teacher embeddings
    padded_b = torch.cat([tb, torch.full((13,), 9.0)])
    with pytest.raises(ValueError, match="144.*131|131.*144"):
        fused_linear_kd_loss(h, w, (th, padded_w, padded_b), labels, student_bias=b)
    loss = fused_linear_kd_loss(h, w, (th, padded_w, padded_b), labels, student_bias=b, vocab_mapping="truncate",
                                temperature=2.0)
    ref_loss, ref_inputs = _reference(h, w, b, th @ tw.t() + tb, labels, temperature=2.0)
    _check(loss, ref_loss, [h, w, b], ref_inputs, rtol=2e-5)
    padded_logits = th @ padded_w.t() + padded_b
    loss = fused_linear_kd_loss(h, w, padded_logits, labels, student_bias=b, vocab_mapping="truncate", temperature=2.0)
    assert (loss.double() - ref_loss).abs() <= 2e-5 * ref_loss.abs()


def test_vocab_index_map_with_missing_tokens():
    h, w, b, th, tw, tb, labels = _make(vocab=50, seed=6)
    teacher_logits = torch.randn(h.shape[0], 70)
    mapping = torch.randperm(70)[:50]
    mapping[[3, 17]] = -1  # student tokens the teacher does not have: probability 0
    loss = fused_linear_kd_loss(h, w, teacher_logits, labels, student_bias=b, vocab_mapping=mapping,
                                divergence="jsd", chunk_size=7)
    mapped = teacher_logits[:, mapping.clamp(min=0)].masked_fill(mapping < 0, float("-inf"))
    ref_loss, ref_inputs = _reference(h, w, b, mapped, labels, divergence="jsd")
    _check(loss, ref_loss, [h, w, b], ref_inputs, rtol=2e-5)
    with pytest.raises(ValueError, match="vocab_mapping values"):
        fused_linear_kd_loss(h, w, teacher_logits, labels, vocab_mapping=torch.full((50,), 70))


def test_errors_name_the_argument():
    h, w, b, th, tw, tb, labels = _make()
    with pytest.raises(ValueError, match="student_weight"):
        fused_linear_kd_loss(h, w[:, :5], th @ tw.t(), labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_kd_loss(h, w, th @ tw.t(), labels, chunk_size=0)
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_kd_loss(h, w, th @ tw.t(), labels, softcap=-1.0)
    with pytest.raises(ValueError, match="leading shape"):
        fused_linear_kd_loss(h, w, (th @ tw.t())[:-1], labels)
    with pytest.raises(TypeError, match="teacher must be"):
        fused_linear_kd_loss(h, w, "teacher", labels)
    with pytest.raises(ValueError, match="alpha"):
        fused_linear_kd_loss(h, w, th @ tw.t(), None, alpha=0.5)
    soft = kdfast.compress_topk(th @ tw.t(), 4)
    with pytest.raises(ValueError, match="SoftLabels"):
        fused_linear_kd_loss(h, w, soft, labels, vocab_mapping="truncate")
    with pytest.raises(ValueError, match="labels out of range"):
        fused_linear_kd_loss(h, w, th @ tw.t(), torch.full_like(labels, 10_000), alpha=0.5)


def test_no_grad_call_and_all_rows_ignored():
    h, w, b, th, tw, tb, labels = _make()
    with torch.no_grad():
        loss = fused_linear_kd_loss(h, w, th @ tw.t(), labels, student_bias=b)
    ref_loss, _ = _reference(h, w, b, th @ tw.t(), labels)
    assert (loss.double() - ref_loss).abs() <= 2e-5 * ref_loss.abs()
    ignored = torch.full_like(labels, -100)
    loss = fused_linear_kd_loss(h, w, th @ tw.t(), ignored, student_bias=b, alpha=0.5)
    grads = torch.autograd.grad(loss, [h, w, b])
    assert loss.item() == 0.0 and all(bool((g == 0).all()) for g in grads)


def test_float64_gradcheck():
    h, w, b, th, tw, tb, labels = _make(rows=6, hidden=5, vocab=11, teacher_hidden=4, dtype=torch.float64)
    teacher = (th @ tw.t()).double()

    def loss_fn(hh, ww, bb):
        return fused_linear_kd_loss(hh, ww, teacher, labels, student_bias=bb, chunk_size=4, divergence="jsd",
                                    alpha=0.3, temperature=2.0, softcap=4.0)

    assert torch.autograd.gradcheck(loss_fn, (h, w, b))


def test_torch_compile_fullgraph_forward_and_backward():
    h, w, b, th, tw, tb, labels = _make(seed=9)
    teacher = th @ tw.t()

    def step(hh, ww, bb):
        return fused_linear_kd_loss(hh, ww, teacher, labels, student_bias=bb, chunk_size=16, temperature=2.0,
                                    alpha=0.5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(h, w, b)
    ref_loss, ref_inputs = _reference(h, w, b, teacher, labels, temperature=2.0, alpha=0.5)
    _check(loss, ref_loss, [h, w, b], ref_inputs, rtol=2e-5, grad_output=torch.tensor(1.0))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("rows", [12, 0])
def test_opcheck(reduction, rows):
    """Fake and real kernels agree, also with no rows (the outputs are allocated by the caller)."""
    from kdfast.ops import fused_linear as ops

    h, w, b, th, tw, tb, labels = _make(rows=12, vocab=17)
    h, th, labels = h[:rows], th[:rows], labels[:rows]
    options = KDOptions(reduction=reduction, temperature=2.0, alpha=0.5)
    outputs = ops.forward_outputs(h, w, b, False, True, True, options)
    args = (h.detach(), w.detach(), b.detach(), th @ tw.t(), None, None, None, None, None, None, None, labels,
            *outputs, True, 5, 0.0, True, *options.values())
    torch.library.opcheck(ops.fused_linear_kd_forward, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("soft", [False, True])
def test_zero_rows_reduction_none_compiles_with_matching_shapes(soft):
    """No rows with reduction "none": the compiled (fake-traced) and eager results agree in shape."""
    torch._dynamo.reset()
    h, w, b, th, tw, tb, labels = _make(rows=12, vocab=17)
    h, labels = h[:0].detach().requires_grad_(True), labels[:0]
    teacher = kdfast.compress_topk((th @ tw.t())[:0], 5) if soft else (th @ tw.t())[:0]

    def step(hidden):
        return fused_linear_kd_loss(hidden, w, teacher, labels, reduction="none", chunk_size=4)

    eager = step(h)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(h)
    assert eager.shape == compiled.shape == (0,)


def test_module_matches_functional():
    h, w, b, th, tw, tb, labels = _make(seed=12)
    module = kdfast.FusedLinearKDLoss(chunk_size=8, divergence="reverse_kl", temperature=2.0, alpha=0.4)
    assert "reverse_kl" in repr(module)
    loss = module(h, w, (th, tw), labels, student_bias=b)
    expected = fused_linear_kd_loss(h, w, (th, tw), labels, student_bias=b, chunk_size=8, divergence="reverse_kl",
                                    temperature=2.0, alpha=0.4)
    assert torch.equal(loss, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(teacher_kind, dtype):
    h, w, b, th, tw, tb, labels = _make(rows=300, vocab=1271, seed=13)
    teacher_logits = th @ tw.t() + tb
    teacher = {"logits": teacher_logits, "hidden": (th, tw, tb),
               "soft": kdfast.compress_topk(teacher_logits, 16)}[teacher_kind]

    def to_cuda(x):
        return (x.cuda() if isinstance(x, torch.Tensor) else
                (tuple(t.cuda() for t in x) if isinstance(x, tuple) else
                 kdfast.SoftLabels(x.indices.cuda(), x.logprobs.cuda(), x.tail_logprob.cuda(), x.temperature,
                                   x.vocab_size)))

    hc, wc, bc = (x.detach().cuda().to(dtype).requires_grad_() for x in (h, w, b))
    options = dict(divergence="jsd", alpha=0.3, reduction="mean")
    loss = fused_linear_kd_loss(hc, wc, to_cuda(teacher), labels.cuda(), student_bias=bc, chunk_size=64, **options)
    ref_loss, ref_inputs = _reference(hc.cpu().float(), wc.cpu().float(), bc.cpu().float(),
                                      teacher if teacher_kind == "soft" else teacher_logits, labels,
                                      sparse=teacher_kind == "soft", **options)
    grads = torch.autograd.grad(loss, [hc, wc, bc])
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs)
    rtol = 2e-5 if dtype == torch.float32 else 3e-2
    assert abs(loss.double().cpu() - ref_loss) <= rtol * abs(ref_loss)
    for grad, ref in zip(grads, ref_grads):
        assert (grad.double().cpu() - ref).abs().max() <= rtol * ref.abs().max()
