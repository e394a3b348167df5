"""The cache of fresh-gradient blocks (`kdfast.ops._buffers`): a block is reused only once no
tensor refers to it, so a gradient that is still alive (kept by the caller, a view of it, or a
leaf's `.grad`) is never overwritten by a later step; the cache can be turned off and emptied.

`MIN_BYTES` is lowered for these tests so that small tensors take the cached route.
"""

from __future__ import annotations

import pytest
import torch

from kdfast.functional import compress_topk, kd_loss, sparse_kd_loss
from kdfast.ops import _buffers


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(_buffers, "MIN_BYTES", 1024)
    monkeypatch.delenv("KDFAST_GRADIENT_CACHE", raising=False)
    _buffers.release_cached_gradients()
    yield
    _buffers.release_cached_gradients()


def test_block_is_reused_only_when_no_tensor_refers_to_it():
    first = _buffers.gradient_buffer((8, 300), torch.float32, "cpu")
    address = first.data_ptr()
    second = _buffers.gradient_buffer((8, 300), torch.float32, "cpu")
    assert second.data_ptr() != address
    view = first[2:]
    del first
    third = _buffers.gradient_buffer((8, 300), torch.float32, "cpu")
    assert third.data_ptr() not in (address, second.data_ptr())  # the view keeps the block busy
    del view
    fourth = _buffers.gradient_buffer((8, 300), torch.float32, "cpu")
    assert fourth.data_ptr() == address
    assert fourth.shape == (8, 300) and fourth.dtype == torch.float32 and fourth.is_contiguous()
    assert fourth.data_ptr() % (2 << 20) == 0


def test_other_sizes_and_dtypes_get_their_own_blocks():
    a = _buffers.gradient_buffer((8, 300), torch.float32, "cpu")
    address = a.data_ptr()
    del a
    b = _buffers.gradient_buffer((8, 600), torch.bfloat16, "cpu")  # the same bytes: the same block
    assert b.data_ptr() == address and b.dtype == torch.bfloat16
    c = _buffers.gradient_buffer((8, 301), torch.float32, "cpu")
    assert c.data_ptr() != address


def test_varying_sizes_keep_the_cache_bounded():
    """A smaller request reuses an idle block up to twice its size; a request no idle block
    holds drops every idle block first, so varying sizes never pile up blocks."""
    big = _buffers.gradient_buffer((8, 400), torch.float32, "cpu")
    address = big.data_ptr()
    del big
    smaller = _buffers.gradient_buffer((8, 300), torch.float32, "cpu")
    assert smaller.data_ptr() == address
    del smaller
    tiny = _buffers.gradient_buffer((8, 100), torch.float32, "cpu")  # less than half: a block of its own
    # the idle big block was dropped (its memory may well come back as the new block's)
    assert _buffers.cached_gradient_bytes() == 8 * 100 * 4 + (2 << 20) and tiny.shape == (8, 100)
    for columns in range(500, 1500, 100):
        _buffers.gradient_buffer((8, columns), torch.float32, "cpu")
    assert _buffers.cached_gradient_bytes() <= 8 * 100 * 4 + 8 * 1400 * 4 + 2 * (2 << 20)


def test_release_and_switch_off(monkeypatch):
    kept = _buffers.gradient_buffer((8, 300), torch.float32, "cpu")
    idle = _buffers.gradient_buffer((8, 300), torch.float32, "cpu")
    del idle
    held = _buffers.cached_gradient_bytes()
    released = _buffers.release_cached_gradients()
    assert 0 < released < held and _buffers.cached_gradient_bytes() == held - released
    kept.fill_(1.0)
    assert bool((kept == 1.0).all())
    monkeypatch.setenv("KDFAST_GRADIENT_CACHE", "0")
    before = _buffers.cached_gradient_bytes()
    plain = _buffers.gradient_buffer((8, 300), torch.float32, "cpu")
    assert plain.shape == (8, 300) and _buffers.cached_gradient_bytes() == before
    small = _buffers.gradient_buffer((2, 3), torch.float32, "cpu")
    assert small.shape == (2, 3) and _buffers.cached_gradient_bytes() == before


@pytest.mark.parametrize("loss", ["dense", "sparse"])
@pytest.mark.parametrize("path", ["leaf", "non_leaf", "scaled"])
def test_live_gradients_survive_later_steps(loss, path):
    """Gradients kept from earlier steps keep their values while later steps run; once they
    are dropped, a later step's gradient reuses one of their blocks (leaf: `.grad` is the
    kernels' own buffer; scaled: grad_output 1.5, scaled where it lies; non_leaf: the
    gradient passes through a multiplication, whose output is PyTorch's)."""
    generator = torch.Generator().manual_seed(5)
    rows, vocab = 6, 257
    teacher = torch.randn(rows, vocab, generator=generator)
    soft_labels = compress_topk(teacher, 8, temperature=2.0)

    def step(seed):
        student = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        logits = student * 1.0 if path == "non_leaf" else student
        if loss == "dense":
            value = kd_loss(logits, teacher, temperature=2.0, reduction="sum")
        else:
            value = sparse_kd_loss(logits, soft_labels, reduction="sum")
        value.backward(torch.tensor(1.5 if path == "scaled" else 1.0))
        return student.grad

    grads = [step(seed) for seed in range(4)]  # every gradient kept alive
    copies = [g.clone() for g in grads]
    assert len({g.data_ptr() for g in grads}) == 4
    for seed in range(3):
        step(10 + seed)  # later steps, their gradients dropped at once
    for g, copy in zip(grads, copies):
        assert torch.equal(g, copy)
    if path != "non_leaf":
        kept = {g.data_ptr() for g in grads}
        del grads, g
        assert step(20).data_ptr() in kept
