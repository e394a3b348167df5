"""kdfast.compat.trl.generalized_jsd_loss against TRL 1.16's `GKDTrainer.generalized_jsd_loss`.

Values and student gradients against a float64 formula of TRL's definition (always) and TRL's
own function (when installed), on [B, T, V] logits like TRL's GKD tests, float32 and bfloat16,
β ∈ {0, 0.1, 0.5, 1} (0 and 1 are TRL's forward/reverse-KL special cases), temperatures,
labels with −100, every reduction and `num_items_in_batch`; masked (−inf) vocabulary entries
against the float64 formula with 0·log 0 = 0 (TRL's own formula is NaN there).
"""

import pytest
import torch
from compat_peers import assert_close, trl_generalized_jsd_loss

from kdfast.compat.trl import generalized_jsd_loss

PEER = trl_generalized_jsd_loss()


def _kl(log_a, log_b):
    """Σ a·(log a − log b) per row, 0·log 0 = 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def formula(s, t, labels, beta, temperature, reduction, num_items=None):
    log_q = torch.log_softmax(s.double() / temperature, -1)
    log_p = torch.log_softmax(t.double() / temperature, -1)
    if beta == 0:
        rows = _kl(log_p, log_q)
    elif beta == 1:
        rows = _kl(log_q, log_p)
    else:
        log_m = torch.logaddexp(log_q + torch.log1p(torch.tensor(-beta, dtype=torch.float64)),
                                log_p + torch.log(torch.tensor(beta, dtype=torch.float64)))
        rows = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if labels is not None:
        keep = labels != -100
        rows, count = rows[keep], int(keep.sum())
    else:
        count = rows.numel()
    total = rows.sum()
    if num_items is not None:
        return total / num_items
    if reduction == "batchmean":
        return total / (max(count, 1) if labels is not None else s.shape[0])
    if reduction == "sum":
        return total
    return total / (count * s.shape[-1])


def make(dtype, shape=(2, 13, 211), seed=0, masked=False):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(*shape, generator=g)).to(dtype)
    t = (2 * torch.randn(*shape, generator=g)).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[0, :4] = -100
    if masked:
        s[..., :5] = float("-inf")
        t[..., :5] = float("-inf")
    return s, t, labels


def loss_and_grad(fn, s):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s)
    (grad,) = torch.autograd.grad(loss, s)
    return loss, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction, with_labels", [("batchmean", True), ("batchmean", False), ("sum", True),
                                                    ("mean", True)])
def test_matches_formula_and_trl(dtype, beta, temperature, reduction, with_labels):
    s, t, labels = make(dtype)
    labels = labels if with_labels else None
    loss, grad = loss_and_grad(lambda x: generalized_jsd_loss(x, t, labels, beta, temperature, reduction), s)
    assert loss.dtype == dtype and loss.dim() == 0
    ref, ref_grad = loss_and_grad(lambda x: formula(x, t, labels, beta, temperature, reduction), s)
    assert_close(loss, ref, dtype, "loss vs float64")
    assert_close(grad, ref_grad, dtype, "grad vs float64")
    if PEER is not None and dtype == torch.float32:  # TRL computes bfloat16 logits in bfloat16
        peer, peer_grad = loss_and_grad(lambda x: PEER(x, t, labels, beta, temperature, reduction), s)
        assert_close(loss, peer, dtype, "loss vs TRL")
        assert_close(grad, peer_grad, dtype, "grad vs TRL")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_num_items_in_batch_and_masked_vocabulary(beta):
    s, t, labels = make(torch.float32, masked=True)
    for num_items in (7, torch.tensor(7)):
        loss, grad = loss_and_grad(lambda x: generalized_jsd_loss(x, t, labels, beta, 1.5,
                                                                  num_items_in_batch=num_items), s)
        # the masked entries have probability 0 in both models: the formula over the others
        ref, ref_grad = loss_and_grad(lambda x: formula(x, t[..., 5:], labels, beta, 1.5, "batchmean", 7), s[..., 5:])
        assert torch.isfinite(loss) and not grad[..., :5].any()
        assert_close(loss, ref, torch.float32, "loss")
        assert_close(grad[..., 5:], ref_grad, torch.float32, "grad")


@pytest.mark.skipif(PEER is None, reason="trl is not installed")
def test_default_arguments_against_trl():
    s, t, labels = make(torch.float32)
    assert_close(generalized_jsd_loss(s, t, labels), PEER(s, t, labels), torch.float32, "defaults")
    assert_close(generalized_jsd_loss(s, t), PEER(s, t), torch.float32, "no labels")


def test_edge_reductions_and_errors():
    s, t, labels = make(torch.float32)
    labels.fill_(-100)
    assert float(generalized_jsd_loss(s, t, labels)) == 0.0  # TRL clamps the count to 1
    assert torch.isnan(generalized_jsd_loss(s, t, labels, reduction="mean"))  # mean of nothing
    with pytest.raises(ValueError, match="reduction='none'"):
        generalized_jsd_loss(s, t, labels, reduction="none")
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(s, t, labels, beta=1.5)
