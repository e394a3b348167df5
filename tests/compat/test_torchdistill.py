"""kdfast.compat.torchdistill.KDLoss against torchdistill 1.1.5's `KDLoss`.

Values and student gradients against a float64 formula of torchdistill's definition (always)
and torchdistill's class (when installed), on classification logits [N, C] (CIFAR-10/100 and
ImageNet class counts as in torchdistill's configurations) and a segmentation-like
[N, C, H, W], float32 and bfloat16, every reduction, α/β combinations including α = None or 0
(the soft loss alone), ignored targets and label smoothing, called with torchdistill's io dicts
and with plain tensors.
"""

import pytest
import torch
import torch.nn.functional as F
from compat_peers import assert_close, torchdistill_kd_loss

from kdfast.compat.torchdistill import KDLoss

PEER = torchdistill_kd_loss()


def formula(s, t, targets, temperature, alpha, beta, reduction, **ce):
    s64, t64 = s.double(), t.double()
    elements = F.kl_div(torch.log_softmax(s64 / temperature, 1), torch.softmax(t64 / temperature, 1),
                        reduction="none")
    soft = {"batchmean": elements.sum() / s.shape[0], "mean": elements.mean(), "sum": elements.sum()}[reduction]
    if alpha is None or alpha == 0 or targets is None:
        return soft
    beta = 1 - alpha if beta is None else beta
    hard = F.cross_entropy(s64, targets, reduction="mean" if reduction == "batchmean" else reduction, **ce)
    return alpha * hard + beta * temperature ** 2 * soft


def make(shape, dtype, ignored, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(*shape, generator=g)).to(dtype)
    t = (3 * torch.randn(*shape, generator=g)).to(dtype)
    targets = torch.randint(0, shape[1], (shape[0],) + tuple(shape[2:]), generator=g)
    if ignored:
        targets.view(-1)[::4] = -100
    return s, t, targets


def loss_and_grad(fn, s):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s)
    (grad,) = torch.autograd.grad(loss, s)
    return loss, grad


WEIGHTS = [(0.5, None), (0.3, 0.9), (None, 1.0)]


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss")
@pytest.mark.parametrize("shape", [(64, 10), (16, 1000), (2, 5, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
@pytest.mark.parametrize("alpha, beta", WEIGHTS)
@pytest.mark.parametrize("ignored, ce", [(False, {}), (True, {"label_smoothing": 0.1})])
def test_matches_formula_and_torchdistill(shape, dtype, reduction, alpha, beta, ignored, ce):
    s, t, targets = make(shape, dtype, ignored)
    ours = KDLoss("student", "io", "teacher", "io", 4.0, alpha, beta, reduction, **ce)
    loss, grad = loss_and_grad(lambda x: ours({"student": {"io": x}}, {"teacher": {"io": t}}, targets), s)
    plain = KDLoss(temperature=4.0, alpha=alpha, beta=beta, reduction=reduction, **ce)(s, t, targets)
    assert float(plain.detach()) == float(loss.detach())
    ref, ref_grad = loss_and_grad(lambda x: formula(x, t, targets, 4.0, alpha, beta, reduction, **ce), s)
    assert_close(loss, ref, dtype, "loss vs float64")
    assert_close(grad, ref_grad, dtype, "grad vs float64")
    if PEER is not None and dtype == torch.float32:
        peer = PEER("student", "io", "teacher", "io", 4.0, alpha, beta, reduction, **ce)
        peer_loss, peer_grad = loss_and_grad(
            lambda x: peer({"student": {"io": x}}, {"teacher": {"io": t}}, targets), s)
        assert_close(loss, peer_loss, dtype, "loss vs torchdistill")
        assert_close(grad, peer_grad, dtype, "grad vs torchdistill")


@pytest.mark.skipif(PEER is None, reason="torchdistill is not installed")
def test_without_targets_against_torchdistill():
    s, t, _ = make((8, 10), torch.float32, False)
    peer = PEER("s", "o", "t", "o", 2.0, 0.5)({"s": {"o": s}}, {"t": {"o": t}})
    assert_close(KDLoss("s", "o", "t", "o", 2.0, 0.5)({"s": {"o": s}}, {"t": {"o": t}}), peer, torch.float32, "soft")


def test_without_targets_is_the_soft_loss_and_options_are_checked():
    s, t, _ = make((8, 10), torch.float32, False)
    soft = KDLoss(temperature=2.0, alpha=0.5)(s, t)
    assert_close(soft, formula(s, t, None, 2.0, 0.5, None, "batchmean"), torch.float32, "soft")
    with pytest.raises(TypeError):
        KDLoss(temperature=2.0)  # beta = 1 - alpha with alpha None, as in torchdistill
    with pytest.raises(ValueError, match="weight"):
        KDLoss(temperature=2.0, alpha=0.5, weight=torch.ones(10))
    with pytest.raises(ValueError, match="reduction"):
        KDLoss(temperature=2.0, alpha=0.5, reduction="none")
