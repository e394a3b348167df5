"""kdfast.compat.torchtune against torchtune 0.6.1's definitions.

Values and student gradients of the six losses against a float64 formula of torchtune's
definition (always) and against torchtune's own classes (when installed), on torchtune's test
shape (3 sequences of 50 tokens, vocabulary 50) and a Llama-like odd vocabulary, float32 and
bfloat16 logits, ignored tokens, masked (−inf) vocabulary entries and `normalize`.
"""

import pytest
import torch
from compat_peers import assert_close, torchtune_losses

from kdfast.compat import torchtune as compat

PEER = torchtune_losses()
SHAPES = [(3, 50, 50), (2, 24, 1271)]
DTYPES = [torch.float32, torch.bfloat16]


def _fkl_rows(s, t):
    log_q = torch.log_softmax(s, -1)
    log_q = log_q.masked_fill(torch.isinf(s), 0)
    return -(torch.softmax(t, -1) * log_q).sum(-1)


def _rkl_rows(s, t):
    mask = torch.isinf(s) | torch.isinf(t)
    log_q = torch.log_softmax(s, -1).masked_fill(mask, 0)
    log_p = torch.log_softmax(t, -1).masked_fill(mask, 0)
    return (torch.softmax(s, -1) * (log_q - log_p)).masked_fill(mask, 0).sum(-1)


def formula(kind, s, t, labels, ignore_index=-100, ratio=0.5, normalize=True):
    """torchtune's loss in float64 (masked terms treated as constants, so gradients are finite)."""
    s, t = s.reshape(-1, s.shape[-1]).double(), t.reshape(-1, t.shape[-1]).double()
    keep = (labels.reshape(-1) != ignore_index).double()
    rows = {"forward": _fkl_rows(s, t), "reverse": _rkl_rows(s, t)}.get(kind)
    if rows is None:
        rows = ratio * _fkl_rows(s, t) + (1 - ratio) * _rkl_rows(s, t)
    total = (rows * keep).sum()
    if not normalize:
        return total
    return total / keep.sum() if keep.sum() > 0 else total * 0


def make(shape, dtype, seed=0, masked=False, ignored=True):
    g = torch.Generator().manual_seed(seed)
    b, n, v = shape
    s = (2 * torch.randn(b, n, v, generator=g)).to(dtype)
    t = (2 * torch.randn(b, n, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (b, n), generator=g)
    if ignored:
        labels[0, : n // 3] = -100
        labels[-1, -2:] = -100
    if masked:  # padded vocabulary entries masked in both models
        s[..., -3:] = float("-inf")
        t[..., -3:] = float("-inf")
    return s, t, labels


def grad_of(fn, s):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s)
    (grad,) = torch.autograd.grad(loss, s)
    return loss, grad


NAMES = {"forward": "ForwardKLLoss", "reverse": "ReverseKLLoss", "symmetric": "SymmetricKLLoss"}


CASES = [(SHAPES[0], dtype, kind, normalize, masked) for dtype in DTYPES for kind in NAMES
         for normalize, masked in [(True, False), (False, True)]]
CASES += [(SHAPES[1], dtype, kind, True, True) for dtype in DTYPES for kind in NAMES]


@pytest.mark.parametrize("shape, dtype, kind, normalize, masked", CASES)
def test_loss_matches_formula_and_torchtune(shape, dtype, kind, normalize, masked):
    s, t, labels = make(shape, dtype, masked=masked)
    ours = getattr(compat, NAMES[kind])()
    loss, grad = grad_of(lambda x: ours(x.reshape(-1, shape[-1]), t.reshape(-1, shape[-1]), labels, normalize), s)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    ref, ref_grad = grad_of(lambda x: formula(kind, x.double(), t, labels, normalize=normalize), s)
    assert_close(loss, ref, dtype, "loss vs float64")
    assert_close(grad, ref_grad, dtype, "grad vs float64")
    if PEER is not None:
        peer = getattr(PEER, NAMES[kind])()
        peer_loss, peer_grad = grad_of(
            lambda x: peer(x.reshape(-1, shape[-1]), t.reshape(-1, shape[-1]), labels, normalize), s)
        assert_close(loss, peer_loss, dtype, "loss vs torchtune")
        if not (masked and kind != "forward"):  # torchtune's reverse-KL gradient is NaN with any -inf logit
            assert_close(grad, peer_grad, dtype, "grad vs torchtune")


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_infinite_logit_against_finite_other_model_takes_torchtune_masking(kind):
    s, t, labels = make((2, 8, 40), torch.float32)
    s[..., 5] = float("-inf")  # student -inf where the teacher has mass
    t[..., 9] = float("-inf")  # teacher -inf where the student has mass
    ours = getattr(compat, NAMES[kind])()
    loss, grad = grad_of(lambda x: ours(x, t, labels), s)
    ref, ref_grad = grad_of(lambda x: formula(kind, x.double(), t, labels), s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


def test_no_kept_token_gives_zero_and_ratio_is_checked():
    s, t, labels = make((2, 6, 30), torch.float32)
    labels.fill_(-100)
    for name in NAMES.values():
        assert float(getattr(compat, name)()(s.reshape(12, 30), t.reshape(12, 30), labels)) == 0.0
    with pytest.raises(ValueError, match="sym_kd_ratio"):
        compat.SymmetricKLLoss(sym_kd_ratio=1.5)


CHUNKED = {"forward": "ForwardKLWithChunkedOutputLoss", "reverse": "ReverseKLWithChunkedOutputLoss",
           "symmetric": "SymmetricKLWithChunkedOutputLoss"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(CHUNKED))
@pytest.mark.parametrize("chunks", [8, 3])
def test_chunked_variants(dtype, kind, chunks):
    shape = (3, 50, 50)
    s, t, labels = make(shape, dtype, masked=True)
    ours = getattr(compat, CHUNKED[kind])(num_output_chunks=chunks)
    loss, grad = grad_of(lambda x: ours(list(x.chunk(chunks, 1)), list(t.chunk(chunks, 1)), labels), s)
    ref, ref_grad = grad_of(lambda x: formula(kind, x.double(), t, labels), s)
    assert_close(loss, ref, dtype, "loss vs float64")
    assert_close(grad, ref_grad, dtype, "grad vs float64")
    if PEER is not None:
        peer = getattr(PEER, CHUNKED[kind])(num_output_chunks=chunks)
        peer_loss = peer(list(s.chunk(chunks, 1)), list(t.chunk(chunks, 1)), labels)
        assert_close(loss, peer_loss, dtype, "loss vs torchtune")


@pytest.mark.skipif(PEER is None, reason="torchtune is not installed")
def test_default_arguments_against_torchtune():
    s, t, labels = make(SHAPES[0], torch.float32, masked=True)
    for name in NAMES.values():
        ours = getattr(compat, name)()(s.reshape(-1, 50), t.reshape(-1, 50), labels)
        assert_close(ours, getattr(PEER, name)()(s.reshape(-1, 50), t.reshape(-1, 50), labels), torch.float32, name)


def test_chunked_all_ignored_mirrors_torchtune():
    s, t, labels = make((2, 16, 30), torch.float32)
    labels.fill_(-100)
    args = (list(s.chunk(8, 1)), list(t.chunk(8, 1)), labels)
    assert float(compat.ForwardKLWithChunkedOutputLoss()(*args)) == 0.0
    assert torch.isnan(compat.ReverseKLWithChunkedOutputLoss()(*args))
    assert torch.isnan(compat.SymmetricKLWithChunkedOutputLoss()(*args))
