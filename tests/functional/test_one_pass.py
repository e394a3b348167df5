"""One-pass training on the CPU: the forward pass of `kd_loss` that also writes the gradient.

- the gradient the forward pass writes (grad_output = 1, the reduction's scale folded in)
  against the two-pass kernels (forward, then backward with grad_output = 1): within 2 ulp of
  the student dtype, for every divergence, α / CE with label smoothing, ignore_index and
  reduction;
- the plain `loss.backward()` (no scaling pass), `loss * 3` and per-row weights through
  reduction="none" against the float64 oracle (`tests/kd_checks.py`); a second backward pass
  through the same graph (retain_graph=True) after the first one's result was changed;
- `inplace_backward=True`: the same gradient, written over the student's storage, and its
  refusals (a leaf or a view of one, create_graph, a second backward, another saved use of the
  logits, process_group);
- the one-pass / two-pass agreement again on every other CPU variant the machine has.
"""

import pytest
import torch

import kdfast
from cpu_variants import other_cpu_variants, run_on_cpu_variant
from kd_checks import DTYPE_IDS, assert_grad_close, assert_loss_close, natural_scales, run_reference_float64
from kdfast.contract import KDOptions
from kdfast.ops import kd_loss as kd_ops
from kdfast.softlabels import SoftLabels

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tvd"]
REDUCTIONS = ["mean", "sum", "none", "batchmean"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (temperature, alpha, label_smoothing): KD only, CE at T = 1, T = 2 and 4 (CE from powers of
# exp(s/T)), another T (CE with its own exp), CE only.
OPTION_SETS = [(2.0, 0.0, 0.0), (1.0, 0.5, 0.1), (2.0, 0.3, 0.0), (4.0, 0.5, 0.2), (1.7, 0.6, 0.1), (3.0, 1.0, 0.1)]
UNSIGNED = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}


def _inputs(rows, vocab, dtype, seed, masked=False):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3).to(dtype)
    teacher = (torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[1] = -100
    if masked:
        student[0, ::5] = float("-inf")
        teacher[2, 1::7] = float("-inf")
    return student, teacher, labels


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of a's dtype (the ordered-integer view of the bits)."""
    def ordered(x):
        bits = x.contiguous().view(UNSIGNED[x.dtype]).to(torch.int64)
        sign_bit = 1 << (8 * x.element_size() - 1)
        return torch.where(bits < 0, -(bits + sign_bit), bits)
    return (ordered(a) - ordered(b)).abs()


def _two_pass(student, teacher, labels, options):
    loss, row_stats, valid_rows = kd_ops.forward_outputs(student, options)
    kd_ops.forward_body(student, teacher, labels, loss, row_stats, valid_rows, options)
    grad = torch.empty_like(student)
    grad_output = torch.ones(student.shape[0] if options.reduction == "none" else (), dtype=row_stats.dtype)
    kd_ops.backward_body(grad_output, student, teacher, labels, row_stats, valid_rows, grad, options)
    return loss, row_stats, grad


def _one_pass(student, teacher, labels, options):
    loss, row_stats, valid_rows = kd_ops.forward_outputs(student, options)
    grad = torch.empty_like(student)
    kd_ops.forward_grad_body(student, teacher, labels, loss, row_stats, valid_rows, grad, options)
    return loss, row_stats, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("option_set", OPTION_SETS, ids=lambda o: f"T{o[0]}-a{o[1]}-eps{o[2]}")
def test_one_pass_gradient_matches_two_pass(divergence, reduction, dtype, option_set):
    temperature, alpha, smoothing = option_set
    options = KDOptions.of(divergence=divergence, reduction=reduction, temperature=temperature, alpha=alpha,
                           label_smoothing=smoothing)
    for vocab, masked in ((1271, False), (2053, True)):
        student, teacher, labels = _inputs(6, vocab, dtype, seed=vocab, masked=masked)
        loss2, stats2, grad2 = _two_pass(student, teacher, labels, options)
        loss1, stats1, grad1 = _one_pass(student, teacher, labels, options)
        assert torch.equal(stats1.nan_to_num(), stats2.nan_to_num()), f"{options}: row statistics differ"
        assert torch.equal(loss1.nan_to_num(), loss2.nan_to_num())
        assert torch.equal(grad1.isnan(), grad2.isnan())
        distance = _ulp_distance(grad1.nan_to_num(), grad2.nan_to_num())
        assert int(distance.max()) <= 2, f"{options} V={vocab}: {int(distance.max())} ulp apart"
        assert not bool(grad1[1].any()), "an ignored row gets a zero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_long_rows_write_their_gradient_while_the_next_row_streams(divergence, dtype):
    """Rows whose logits and kept exponentials outgrow a core's L2 (V = 90000 here) write
    their gradient while the thread streams its next row, across ignored and NaN rows and at
    the end of each thread's rows: the same statistics, loss and gradient (2 ulp) as the
    two-pass kernels."""
    student, teacher, labels = _inputs(7, 90000, dtype, seed=31)
    student[4, 123] = float("nan")
    for settings in (dict(temperature=2.0, alpha=0.5, label_smoothing=0.1), dict(temperature=1.0, alpha=0.0)):
        options = KDOptions.of(divergence=divergence, reduction="mean", **settings)
        loss2, stats2, grad2 = _two_pass(student, teacher, labels, options)
        loss1, stats1, grad1 = _one_pass(student, teacher, labels, options)
        assert torch.equal(stats1.nan_to_num(), stats2.nan_to_num()), f"{options}: row statistics differ"
        assert torch.equal(loss1.nan_to_num(), loss2.nan_to_num())
        assert torch.equal(grad1.isnan(), grad2.isnan()) and bool(grad1[4].isnan().all())
        assert int(_ulp_distance(grad1.nan_to_num(), grad2.nan_to_num()).max()) <= 2, f"{options}: gradients differ"
        assert not bool(grad1[1].any()), "an ignored row gets a zero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_large_calls_prefetch_and_stream_their_gradient(divergence, dtype):
    """A call large enough for the memory policy (70 x 120001: float32 logits above 64 MB, so
    the sweeps prefetch ahead; a gradient above 4 MB, written with streaming stores, and an odd
    V, so that most rows start off a 64-byte boundary): the same statistics, loss and gradient
    (2 ulp) as the two-pass kernels, NaN and ignored rows included; with inplace_backward's
    storage (no streaming stores) the same gradient again."""
    student, teacher, labels = _inputs(70, 120001, dtype, seed=37)
    student[5, 777] = float("nan")
    options = KDOptions.of(divergence=divergence, reduction="mean", temperature=2.0, alpha=0.5,
                           label_smoothing=0.1)
    loss2, stats2, grad2 = _two_pass(student, teacher, labels, options)
    loss1, stats1, grad1 = _one_pass(student, teacher, labels, options)
    assert torch.equal(stats1.nan_to_num(), stats2.nan_to_num()) and torch.equal(loss1.nan_to_num(), loss2.nan_to_num())
    assert torch.equal(grad1.isnan(), grad2.isnan()) and bool(grad1[5].isnan().all())
    assert int(_ulp_distance(grad1.nan_to_num(), grad2.nan_to_num()).max()) <= 2
    assert not bool(grad1[1].any()), "an ignored row gets a zero gradient"
    own = student.clone()
    loss3, stats3, _ = kd_ops.forward_outputs(own, options)
    kd_ops.forward_grad_body(own, teacher, labels, loss3, stats3, _, own, options)
    assert torch.equal(own.nan_to_num(), grad1.nan_to_num()), "in place and fresh gradients differ"


def _rising_rows(dtype, *, rise, head_masked=False):
    """6 rows of V = 2053 whose logits after the first 600 sit near the first 600's maximum,
    except for rows 0 and 3, which rise `rise` logits above it at index 2000 (the student) and
    1800 (the teacher); with `head_masked`, row 4's first 600 logits are -inf (student and
    teacher)."""
    student, teacher, labels = _inputs(6, 2053, torch.float64, seed=29)
    for x, at in ((student, 2000), (teacher, 1800)):
        x[[0, 3], at] = x[[0, 3], :600].max(dim=1).values + rise
    if head_masked:
        student[4, :600] = float("-inf")
        teacher[4, :600] = float("-inf")
    labels[0], labels[4] = 2000, 1000
    return student.to(dtype), teacher.to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("rise, head_masked", [(12.0, False), (29.0, False), (45.0, True), (400.0, False)])
def test_rows_that_rise_far_above_their_first_chunk(divergence, dtype, rise, head_masked):
    """The forward pass streams a row once, with its exponentials taken from the maxima of the
    row's first chunk, unless the row rises too far above them (or that chunk is masked): then
    it streams the row again from its maxima. Rises on both sides of that limit (30 e-folds; CE
    at T = 2 counts exp(s - max), so 29 fits and 45 does not) and a masked head: the one-pass
    and two-pass kernels agree (statistics and loss exactly, the gradient within 2 ulp) and
    both match the float64 oracle."""
    student, teacher, labels = _rising_rows(dtype, rise=rise, head_masked=head_masked)
    smoothing = 0.0 if head_masked else 0.1  # smoothing over -inf logits makes the loss inf
    option_sets = [dict(temperature=2.0, alpha=0.5, label_smoothing=smoothing), dict(temperature=1.0, alpha=0.0)]
    for settings in option_sets:
        options = KDOptions.of(divergence=divergence, reduction="sum", **settings)
        loss2, stats2, grad2 = _two_pass(student, teacher, labels, options)
        loss1, stats1, grad1 = _one_pass(student, teacher, labels, options)
        assert torch.equal(stats1, stats2) and torch.equal(loss1, loss2), f"{options}: statistics differ"
        assert int(_ulp_distance(grad1, grad2).max()) <= 2, f"{options}: gradients differ"
        one = torch.ones((), dtype=torch.float32)
        _check_against_oracle(student, teacher, labels, one, lambda loss: loss, reduction="sum",
                              divergence=divergence, context=f"{divergence} rise {rise} {settings}", **settings)


@pytest.mark.parametrize("variant", other_cpu_variants())
def test_one_pass_matches_two_pass_on_other_cpu_variants(variant):
    """The kept-exponential paths (and their scalar tails) exist per CPU variant: the one-pass
    and two-pass kernels agree there too, for every divergence and dtype, two option sets."""
    run_on_cpu_variant(variant, (
        "import itertools\n"
        "import test_one_pass as t\n"
        "for d, dt, o in itertools.product(t.DIVERGENCES, t.DTYPES, [(2.0, 0.3, 0.0), (1.7, 0.6, 0.1)]):\n"
        "    t.test_one_pass_gradient_matches_two_pass(d, 'mean', dt, o)\n"
    ))


def test_one_pass_writes_nan_rows_and_reports_bad_labels():
    student, teacher, labels = _inputs(4, 300, torch.float32, seed=5)
    student[2, 7] = float("nan")
    options = KDOptions.of(alpha=0.5, temperature=2.0)
    loss, row_stats, grad = _one_pass(student, teacher, labels, options)
    assert bool(grad[2].isnan().all()) and bool(torch.isfinite(grad[[0, 3]]).all())
    labels[0] = 300
    with pytest.raises(ValueError, match="labels out of range"):
        _one_pass(student, teacher, labels, options)


def _check_against_oracle(student, teacher, labels, grad_output, loss_of, *, context, **options):
    """loss_of(loss) is what is differentiated (e.g. loss * 3); grad_output seeds its backward."""
    leaf = student.clone().requires_grad_(True)
    loss = kdfast.functional.kd_loss(leaf, teacher, labels, **options)
    loss_of(loss).backward(grad_output)
    expected_loss, expected_grad = run_reference_float64(
        student, teacher, labels, torch.ones(loss.shape, dtype=torch.float64), **options)
    reference_leaf = student.detach().to(torch.float64).requires_grad_(True)
    reference_loss = kdfast.reference.kd_loss(reference_leaf, teacher.to(torch.float64), labels, **options)
    loss_of(reference_loss).backward(grad_output.to(torch.float64))
    loss_scale, grad_scale = natural_scales(temperature=options["temperature"], alpha=options["alpha"],
                                            reduction=options["reduction"], labels=labels,
                                            row_count=student.shape[0], grad_output=torch.tensor(3.0))
    assert_loss_close(loss.detach(), expected_loss, loss_scale=loss_scale, context=context)
    assert_grad_close(leaf.grad, reference_leaf.grad, grad_scale=grad_scale, context=context)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_plain_backward_loss_times_three_and_row_weights(divergence, dtype):
    student, teacher, labels = _inputs(8, 1000, dtype, seed=11)
    options = dict(divergence=divergence, temperature=2.0, alpha=0.4, label_smoothing=0.1)
    for reduction in REDUCTIONS:
        one = torch.ones(8 if reduction == "none" else (), dtype=torch.float32)
        _check_against_oracle(student, teacher, labels, one, lambda loss: loss, reduction=reduction,
                              context=f"{divergence} {reduction} backward()", **options)
        _check_against_oracle(student, teacher, labels, one, lambda loss: loss * 3, reduction=reduction,
                              context=f"{divergence} {reduction} loss*3", **options)
    weights = torch.linspace(0.25, 2.0, 8)
    _check_against_oracle(student, teacher, labels, torch.ones(()), lambda loss: (loss * weights).sum(),
                          reduction="none", context=f"{divergence} none per-row weights", **options)


def test_plain_backward_returns_the_forward_gradient_without_a_pass():
    student, teacher, labels = _inputs(4, 500, torch.float32, seed=2)
    leaf = student.clone().requires_grad_(True)
    loss = kdfast.functional.kd_loss(leaf, teacher, labels, temperature=2.0, alpha=0.5)
    options = KDOptions.of(temperature=2.0, alpha=0.5)
    _, _, expected = _one_pass(student, teacher, labels, options)
    loss.backward()
    assert torch.equal(leaf.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("first_scale, second_scale", [(1.0, 1.0), (3.0, 0.5), (1.0, -2.0)])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_second_backward_through_the_graph_is_exact(kind, first_scale, second_scale, dtype):
    """The first backward pass hands the forward's gradient buffer out (scaled where it lies);
    a second pass with retain_graph=True must still give its own grad_output times the
    gradient, even after the caller changed what the first pass returned."""
    student, teacher, labels = _inputs(6, 700, dtype, seed=13)
    options = dict(divergence="reverse_kl", temperature=2.0, alpha=0.3, label_smoothing=0.1)
    if kind == "sparse":
        teacher = kdfast.compress_topk(teacher.float(), 24, temperature=2.0)
        options["tail"] = "bucket"
    function = kdfast.functional.kd_loss if kind == "dense" else kdfast.functional.sparse_kd_loss
    leaf = student.clone().requires_grad_(True)
    loss = function(leaf, teacher, labels, **options)
    first, = torch.autograd.grad(loss * first_scale, leaf, retain_graph=True)
    first_copy = first.clone()
    first.fill_(123.0)  # the caller owns what the first pass returned
    second, = torch.autograd.grad(loss * second_scale, leaf)
    reference_leaf = student.detach().to(torch.float64).requires_grad_(True)
    reference = kdfast.reference.kd_loss if kind == "dense" else kdfast.reference.sparse_kd_loss
    reference_loss = reference(reference_leaf, teacher, labels, **options)
    expected, = torch.autograd.grad(reference_loss, reference_leaf)
    for scale, grad in ((first_scale, first_copy), (second_scale, second)):
        _, grad_scale = natural_scales(temperature=2.0, alpha=0.3, reduction="mean", labels=labels, row_count=6,
                                       grad_output=torch.tensor(scale))
        assert_grad_close(grad, expected * scale, grad_scale=grad_scale, context=f"{kind} x{scale}")


def _lm_head_logits(rows=6, hidden=16, vocab=700, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=generator, dtype=dtype)
    weight = (torch.randn(vocab, hidden, generator=generator, dtype=dtype) * 0.5).requires_grad_(True)
    return h, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("grad_scale", [1.0, 3.0])
def test_inplace_backward_matches_and_reuses_the_logits(divergence, dtype, grad_scale):
    h, weight = _lm_head_logits(dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    teacher = (torch.randn(6, 700, generator=generator) * 2).to(dtype)
    labels = torch.randint(0, 700, (6,), generator=generator)
    labels[3] = -100
    options = dict(divergence=divergence, temperature=2.0, alpha=0.3, label_smoothing=0.1)
    results = []
    for inplace in (False, True):
        weight.grad = None
        logits = h @ weight.t()
        storage = logits.data_ptr()
        captured = {}
        logits.register_hook(lambda grad: captured.setdefault("grad", grad))
        loss = kdfast.functional.kd_loss(logits, teacher, labels, inplace_backward=inplace, **options)
        (loss * grad_scale).backward()
        assert (captured["grad"].data_ptr() == storage) == inplace
        results.append((loss.detach(), weight.grad.clone(), captured["grad"].clone()))
    (loss_a, weight_grad_a, grad_a), (loss_b, weight_grad_b, grad_b) = results
    assert torch.equal(loss_a, loss_b)
    if dtype == torch.float32 or grad_scale == 1.0:
        assert torch.equal(grad_a, grad_b)
        assert torch.equal(weight_grad_a, weight_grad_b)
    else:  # in place, a 16-bit gradient is scaled after its rounding: one more rounding
        assert int(_ulp_distance(grad_a, grad_b).max()) <= 1


def test_inplace_backward_refusals():
    student, teacher, labels = _inputs(4, 300, torch.float32, seed=3)
    leaf = student.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        kdfast.functional.kd_loss(leaf, teacher, labels, alpha=0.5, inplace_backward=True)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        kdfast.functional.kd_loss(leaf.view(2, 2, 300), teacher.view(2, 2, 300), labels.view(2, 2),
                                  alpha=0.5, inplace_backward=True)
    with pytest.raises(ValueError, match="process_group"):
        kdfast.functional.kd_loss(leaf * 1, teacher, labels, alpha=0.5, inplace_backward=True, process_group=object())
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        kdfast.KDLoss(alpha=0.5, inplace_backward=True)(leaf, teacher, labels)

    logits = leaf * 2
    loss = kdfast.functional.kd_loss(logits, teacher, labels, alpha=0.5, inplace_backward=True)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, leaf, create_graph=True)

    logits = leaf * 2
    loss = kdfast.functional.kd_loss(logits, teacher, labels, alpha=0.5, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()

    logits = leaf * 2
    other = (logits ** 2).mean()  # saves the logits for its backward
    loss = kdfast.functional.kd_loss(logits, teacher, labels, alpha=0.5, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("grad_scale", [1.0, 3.0])
def test_sparse_inplace_backward_matches_and_reuses_the_logits(tail, dtype, grad_scale):
    student, teacher, labels = _inputs(6, 700, dtype, seed=11)
    soft_labels = kdfast.compress_topk(teacher.float(), 16)
    options = dict(alpha=0.4, tail=tail, label_smoothing=0.1)
    expected_leaf = student.clone().requires_grad_(True)
    (kdfast.functional.sparse_kd_loss(expected_leaf * 1, soft_labels, labels, **options) * grad_scale).backward()
    leaf = student.clone().requires_grad_(True)
    logits = leaf * 1
    storage = logits.data_ptr()
    loss = kdfast.functional.sparse_kd_loss(logits, soft_labels, labels, inplace_backward=True, **options)
    (loss * grad_scale).backward()
    assert logits.data_ptr() == storage
    if grad_scale == 1.0 or dtype == torch.float32:
        assert torch.equal(leaf.grad, expected_leaf.grad)
    else:  # in place a 16-bit gradient is scaled where it lies: rounded twice
        torch.testing.assert_close(leaf.grad.float(), expected_leaf.grad.float(), rtol=1e-2, atol=1e-4)


def test_sparse_inplace_backward_refusals_and_checks():
    student, teacher, labels = _inputs(4, 300, torch.float32, seed=12)
    soft_labels = kdfast.compress_topk(teacher, 8)
    leaf = student.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        kdfast.functional.sparse_kd_loss(leaf, soft_labels, labels, alpha=0.5, inplace_backward=True)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        kdfast.SparseKDLoss(alpha=0.5, inplace_backward=True)(leaf, soft_labels, labels)
    with pytest.raises(ValueError, match="process_group"):
        kdfast.functional.sparse_kd_loss(leaf * 1, soft_labels, labels, inplace_backward=True, process_group=object())
    # bad labels or indices are reported before the logits are overwritten
    logits = leaf * 1
    before = logits.detach().clone()
    bad_labels = labels.clone()
    bad_labels[0] = 300
    with pytest.raises(ValueError, match="labels"):
        kdfast.functional.sparse_kd_loss(logits, soft_labels, bad_labels, alpha=0.5, inplace_backward=True)
    repeated = SoftLabels(soft_labels.indices.clone(), soft_labels.logprobs, soft_labels.tail_logprob,
                          vocab_size=300, temperature=soft_labels.temperature)
    repeated.indices[1, 1] = repeated.indices[1, 0]
    with pytest.raises(ValueError, match="repeat"):
        kdfast.functional.sparse_kd_loss(logits, repeated, labels, alpha=0.5, inplace_backward=True)
    assert torch.equal(logits.detach(), before)

    loss = kdfast.functional.sparse_kd_loss(leaf * 2, soft_labels, labels, alpha=0.5, inplace_backward=True)
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, leaf, create_graph=True)
    loss = kdfast.functional.sparse_kd_loss(leaf * 2, soft_labels, labels, alpha=0.5, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_inplace_backward_on_strided_rows_gets_a_fresh_gradient():
    """Rows taken with a step cannot hold their gradient at r * V: the gradient goes into a
    fresh buffer, exact, and the rows between them are left alone."""
    student, teacher, labels = _inputs(8, 300, torch.float32, seed=6)
    base = student.clone().requires_grad_(True)
    logits = base * 1.0
    before = logits.detach().clone()
    loss = kdfast.functional.kd_loss(logits[::2], teacher[:4], labels[:4], alpha=0.5, inplace_backward=True)
    assert torch.equal(logits.detach(), before), "a strided view's logits are not overwritten"
    loss.backward()
    expected_base = student.clone().requires_grad_(True)
    kdfast.functional.kd_loss(expected_base[::2] * 1.0, teacher[:4], labels[:4], alpha=0.5).backward()
    assert torch.equal(base.grad, expected_base.grad)


def test_inplace_backward_without_grad_leaves_the_logits():
    student, teacher, labels = _inputs(4, 300, torch.float32, seed=4)
    kept = student.clone()
    expected = kdfast.functional.kd_loss(student, teacher, labels, alpha=0.5)
    loss = kdfast.functional.kd_loss(student, teacher, labels, alpha=0.5, inplace_backward=True)
    assert torch.equal(student, kept) and torch.equal(loss, expected)  # no grad needed: nothing written
    logits = student.clone().requires_grad_(True) * 1
    with torch.no_grad():
        loss = kdfast.functional.kd_loss(logits, teacher, labels, alpha=0.5, inplace_backward=True)
    assert torch.equal(logits.detach(), kept) and torch.equal(loss, expected)


def _sparse_inputs(rows, vocab, k, dtype, temperature, seed):
    student, teacher, labels = _inputs(rows, vocab, dtype, seed)
    soft = kdfast.compress_topk(teacher.float(), k, temperature=temperature)
    return student, soft, labels


def _sparse_paths(student, soft, labels, options):
    from kdfast.ops import sparse as sparse_ops
    inputs = (student, soft.indices, soft.logprobs, soft.tail_logprob, labels)
    loss, row_stats, valid_rows = sparse_ops.forward_outputs(student, options)
    sparse_ops.forward_body(*inputs, loss, row_stats, valid_rows, options)
    two = torch.empty_like(student)
    grad_output = torch.ones(student.shape[0] if options.reduction == "none" else (), dtype=loss.dtype)
    sparse_ops.backward_body(grad_output, *inputs, row_stats, valid_rows, two, options)
    loss1, row_stats1, valid_rows1 = sparse_ops.forward_outputs(student, options)
    one = torch.empty_like(student)
    sparse_ops.forward_grad_body(*inputs, loss1, row_stats1, valid_rows1, one, options)
    assert torch.equal(row_stats.nan_to_num(), row_stats1.nan_to_num())
    assert torch.equal(loss.nan_to_num(), loss1.nan_to_num())
    return two, one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("option_set", [(2.0, 0.0, 0.0), (1.0, 0.5, 0.1), (3.0, 0.4, 0.0)],
                         ids=lambda o: f"T{o[0]}-a{o[1]}-eps{o[2]}")
def test_sparse_one_pass_gradient_matches_two_pass(divergence, tail, dtype, option_set):
    temperature, alpha, smoothing = option_set
    for reduction in ("mean", "none"):
        options = KDOptions.of(divergence=divergence, reduction=reduction, temperature=temperature, alpha=alpha,
                               label_smoothing=smoothing, tail=tail)
        student, soft, labels = _sparse_inputs(6, 3001, 16, dtype, temperature, seed=7)
        two, one = _sparse_paths(student, soft, labels, options)
        assert torch.equal(two.isnan(), one.isnan())
        assert int(_ulp_distance(two.nan_to_num(), one.nan_to_num()).max()) <= 2, f"{options}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_plain_backward_and_loss_times_three(tail, dtype):
    student, soft, labels = _sparse_inputs(8, 900, 12, dtype, 2.0, seed=9)
    options = dict(divergence="forward_kl", temperature=2.0, alpha=0.4, label_smoothing=0.1, tail=tail)
    for reduction, factor in (("mean", 1.0), ("mean", 3.0), ("none", 1.0)):
        leaf = student.clone().requires_grad_(True)
        loss = kdfast.functional.sparse_kd_loss(leaf, soft, labels, reduction=reduction, **options)
        (loss * factor).sum().backward()
        reference_leaf = student.detach().to(torch.float64).requires_grad_(True)
        reference_loss = kdfast.reference.sparse_kd_loss(reference_leaf, soft, labels, reduction=reduction, **options)
        (reference_loss * factor).sum().backward()
        _, grad_scale = natural_scales(temperature=2.0, alpha=0.4, reduction=reduction, labels=labels,
                                       row_count=8, grad_output=torch.tensor(factor))
        assert_grad_close(leaf.grad, reference_leaf.grad, grad_scale=grad_scale,
                          context=f"sparse {tail} {reduction} x{factor}")
