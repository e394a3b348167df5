"""kdfast.compat.liger against Liger-Kernel 0.8.5's definitions (float64 formulas; Liger needs CUDA).

`LigerKLDIVLoss` also against `torch.nn.KLDivLoss`, which Liger's own tests use as the reference.
Shapes follow Liger's tests with fewer rows (its vocabularies 1271, 3200, 32000 and its fused
shape H=167, V=1423 with a student of half the teacher's width), float32 and bfloat16, ignored
rows, masked (−inf) entries, β ∈ {0, 0.1, 0.5, 1} and temperatures. `LigerJSD` gradients are
compared at the logits that `log_softmax` turns into its inputs: Liger's element-wise gradient
with respect to the log-probabilities themselves differs from kdfast's by a multiple of q per
row, which that `log_softmax` removes (docs/migration.md).
"""

import pytest
import torch
from compat_peers import assert_close

from kdfast.compat.liger import LigerFusedLinearJSD, LigerJSD, LigerKLDIVLoss

DTYPES = [torch.float32, torch.bfloat16]


def _kl(log_a, log_b):
    a = log_a.exp()
    return a * torch.where(a > 0, log_a - log_b, torch.zeros_like(a))


def jsd_rows(log_q, log_p, beta):
    """Liger's generalised JSD per row in float64 (β=0 forward KL, β=1 reverse KL)."""
    if beta == 0:
        return _kl(log_p, log_q).sum(-1)
    if beta == 1:
        return _kl(log_q, log_p).sum(-1)
    log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta, dtype=log_p.dtype)),
                            log_q + torch.log1p(torch.tensor(-beta, dtype=log_q.dtype)))
    return (beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)).sum(-1)


def kept_mean(rows, labels, ignore_index=-100):
    if labels is None:
        return rows.mean()
    keep = labels != ignore_index
    return rows[keep].sum() / keep.sum() if keep.any() else rows.sum() * 0


def logits(rows, vocab, dtype, seed, masked=False):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(rows, vocab, generator=g)).to(dtype)
    if masked:
        x[:, -7:] = float("-inf")
    return x


def labels_for(rows, vocab, seed=3):
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed))
    labels[::5] = -100
    return labels


@pytest.mark.parametrize("rows, vocab", [(41 * 11, 1271), (2 * 32, 3200)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("with_labels, masked", [(True, False), (False, True)])
def test_jsd_matches_formula(rows, vocab, dtype, beta, with_labels, masked):
    student = logits(rows, vocab, dtype, 0, masked)
    teacher_log = torch.log_softmax(logits(rows, vocab, torch.float32, 1, masked), -1).to(dtype)
    labels = labels_for(rows, vocab) if with_labels else None
    x = student.clone().requires_grad_(True)
    loss = LigerJSD(beta=beta)(torch.log_softmax(x.float(), -1).to(dtype), teacher_log, labels)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.dtype == dtype and loss.dim() == 0
    cols = slice(0, vocab - 7 if masked else vocab)  # masked entries: probability 0 in both models
    x64 = student[:, cols].double().requires_grad_(True)
    log_q = torch.log_softmax(x64, -1).to(dtype).double() if dtype != torch.float32 else torch.log_softmax(x64, -1)
    ref = kept_mean(jsd_rows(log_q, teacher_log[:, cols].double(), beta), labels)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    assert torch.isfinite(grad).all() and not grad[:, cols.stop:].any()
    assert_close(loss, ref, dtype, "loss")
    assert_close(grad[:, cols], ref_grad, dtype, "grad at the logits")


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, vocab", [(41 * 3, 1271), (16, 32000)])
def test_kldiv_matches_formula_and_torch(reduction, log_target, dtype, rows, vocab):
    y_pred = torch.log_softmax(logits(rows, vocab, torch.float32, 0), -1).to(dtype)
    target_log = torch.log_softmax(logits(rows, vocab, torch.float32, 1), -1)
    y_true = (target_log if log_target else target_log.exp()).to(dtype)
    x = y_pred.clone().requires_grad_(True)
    loss = LigerKLDIVLoss(reduction=reduction, log_target=log_target)(x, y_true)
    weights = torch.randn(loss.shape, dtype=loss.dtype) if reduction == "none" else torch.ones(())
    (grad,) = torch.autograd.grad(loss, x, weights)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    p, t = y_pred.double().requires_grad_(True), y_true.double()
    elements = t.exp() * (t - p) if log_target else t * (t.clamp_min(1e-10).log() - p)
    ref = {"none": elements, "sum": elements.sum(), "mean": elements.mean(),
           "batchmean": elements.sum() / rows}[reduction]
    (ref_grad,) = torch.autograd.grad(ref, p, weights.double())
    assert_close(loss, ref, dtype, "loss vs float64")
    assert_close(grad, ref_grad, dtype, "grad vs float64")
    torch_loss = torch.nn.KLDivLoss(reduction=reduction, log_target=log_target)(y_pred.float(), y_true.float())
    assert_close(loss, torch_loss, torch.float32, "loss vs torch.nn.KLDivLoss")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature, beta", [(1.0, 0.5), (2.0, 0.1), (1.0, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("with_labels", [True, False])
def test_fused_linear_jsd_matches_formula(dtype, temperature, beta, with_labels):
    rows, hidden, vocab = 4 * 42, 167, 1423
    g = torch.Generator().manual_seed(0)
    student_input = torch.randn(rows, hidden // 2, generator=g).to(dtype)
    student_weight = (torch.randn(vocab, hidden // 2, generator=g) / 4).to(dtype)
    teacher_input = torch.randn(rows, hidden, generator=g).to(dtype)
    teacher_weight = (torch.randn(vocab, hidden, generator=g) / 6).to(dtype)
    labels = labels_for(rows, vocab) if with_labels else None
    h, w = student_input.clone().requires_grad_(True), student_weight.clone().requires_grad_(True)
    loss = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)(h, w, teacher_input, teacher_weight, labels)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32
    h64, w64 = student_input.double().requires_grad_(True), student_weight.double().requires_grad_(True)
    log_q = torch.log_softmax(h64 @ w64.T / temperature, -1)
    log_p = torch.log_softmax(teacher_input.double() @ teacher_weight.double().T / temperature, -1)
    ref = kept_mean(jsd_rows(log_q, log_p, beta), labels)
    ref_h, ref_w = torch.autograd.grad(ref, (h64, w64))
    tol_dtype = dtype if dtype == torch.float32 else torch.bfloat16
    assert_close(loss, ref, tol_dtype, "loss")
    assert_close(grad_h, ref_h, tol_dtype, "grad student_input")
    assert_close(grad_w, ref_w, tol_dtype, "grad student_weight")


def test_options_kdfast_cannot_express_raise():
    with pytest.raises(ValueError, match="accum_dtype"):
        h, w = torch.randn(4, 8), torch.randn(16, 8)
        LigerFusedLinearJSD(accum_dtype=torch.float64)(h, w, h, w, None)
    with pytest.raises(ValueError, match="temperature"):
        LigerFusedLinearJSD(temperature=0.0)
    with pytest.raises(ValueError, match="shift_labels"):
        LigerJSD()(torch.randn(4, 8), torch.randn(4, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[BT, V\]"):
        LigerKLDIVLoss()(torch.randn(2, 4, 8), torch.randn(2, 4, 8))


def test_kldiv_sum_is_accurate_over_many_elements():
    """A KL is a small difference of large sums: over 4M elements float32 accumulation must not show."""
    y_pred = torch.log_softmax(logits(128, 32000, torch.float32, 0), -1)
    y_true = torch.softmax(logits(128, 32000, torch.float32, 1), -1)
    loss = LigerKLDIVLoss(reduction="batchmean")(y_pred, y_true)
    p, t = y_pred.double(), y_true.double()
    ref = (t * (t.clamp_min(1e-10).log() - p)).sum() / 128
    assert abs(float(loss) - float(ref)) <= 2e-6 * abs(float(ref))
