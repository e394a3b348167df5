"""Vocabulary-parallel KD over torch.distributed (gloo, CPU): 2 and 3 spawned processes.

Each rank holds an uneven slice of the vocabulary. `kd_loss`, `sparse_kd_loss` and
`fused_linear_kd_loss` with `process_group=` must give the single-process loss (float64
reference on the full vocabulary) on every rank, and each rank's gradient must be its slice
of the full gradient (grad_hidden: the full one). A DDP test trains a tiny student with
`fused_linear_kd_loss` on 2 processes and compares the parameters with one process.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

ROWS, VOCAB, HIDDEN, TEACHER_HIDDEN = 13, 47, 8, 6
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def _init(rank, world_size, rendezvous):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    bias = torch.randn(VOCAB, generator=generator)
    teacher_hidden = torch.randn(ROWS, TEACHER_HIDDEN, generator=generator)
    teacher_weight = torch.randn(VOCAB, TEACHER_HIDDEN, generator=generator) * 1.5
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    labels[[2, 7]] = -100
    return hidden, weight, bias, teacher_hidden, teacher_weight, labels


def _slices(world_size):
    sizes = [VOCAB // world_size + (1 if r < VOCAB % world_size else 0) for r in range(world_size)]
    sizes[0] += 2  # uneven on purpose
    sizes[-1] -= 2
    starts = [sum(sizes[:r]) for r in range(world_size)]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def _close(actual, expected, what, rtol=2e-5):
    scale = expected.abs().max().clamp(min=1e-8)
    error = (actual.double() - expected).abs().max()
    assert error <= rtol * scale, f"{what}: max error {error:.3g} vs scale {scale:.3g}"


def _dense_and_sparse_cases(rank, world_size):
    from kdfast import compress_topk, reference
    from kdfast.functional import kd_loss, sparse_kd_loss

    hidden, weight, bias, teacher_hidden, teacher_weight, labels = _inputs()
    student = (hidden @ weight.t() + bias) * 0.7
    teacher = teacher_hidden @ teacher_weight.t()
    part = _slices(world_size)[rank]
    grad_output = torch.rand(ROWS, generator=torch.Generator().manual_seed(3)) + 0.5
    for divergence in DIVERGENCES:
        for reduction in ("mean", "sum", "none", "batchmean"):
            for alpha, smoothing in ((0.0, 0.0), (0.4, 0.1), (1.0, 0.0)):
                options = dict(divergence=divergence, temperature=2.0, alpha=alpha, reduction=reduction,
                               label_smoothing=smoothing)
                shard = student[:, part].clone().requires_grad_()
                loss = kd_loss(shard, teacher[:, part], labels, process_group=torch.distributed.group.WORLD, **options)
                full = student.double().requires_grad_()
                expected = reference.kd_loss(full, teacher.double(), labels, **options)
                weight_out = grad_output if reduction == "none" else torch.tensor(1.3)
                (grad,) = torch.autograd.grad(loss, shard, weight_out.to(loss.dtype))
                (full_grad,) = torch.autograd.grad(expected, full, weight_out.double())
                what = f"rank {rank}/{world_size} dense {options}"
                _close(loss, expected, what)
                _close(grad, full_grad[:, part], what + " grad")
    soft = compress_topk(teacher, 6, temperature=2.0)
    full_soft = compress_topk(teacher, VOCAB, temperature=2.0)
    for labels_kind in (soft, full_soft):
        for divergence in DIVERGENCES:
            for tail in ("bucket", "renormalize"):
                for alpha in (0.0, 0.3):
                    options = dict(divergence=divergence, alpha=alpha, tail=tail, reduction="none",
                                   label_smoothing=0.05)
                    shard = student[:, part].clone().requires_grad_()
                    loss = sparse_kd_loss(shard, labels_kind, labels, process_group=torch.distributed.group.WORLD,
                                          **options)
                    full = student.double().requires_grad_()
                    expected = reference.sparse_kd_loss(full, labels_kind, labels, **options)
                    (grad,) = torch.autograd.grad(loss, shard, grad_output)
                    (full_grad,) = torch.autograd.grad(expected, full, grad_output.double())
                    what = f"rank {rank}/{world_size} sparse k={labels_kind.indices.shape[-1]} {options}"
                    _close(loss, expected, what)
                    _close(grad, full_grad[:, part], what + " grad")


def _fused_linear_cases(rank, world_size):
    from kdfast import compress_topk, reference
    from kdfast.functional import fused_linear_kd_loss

    hidden, weight, bias, teacher_hidden, teacher_weight, labels = _inputs(seed=1)
    teacher = teacher_hidden @ teacher_weight.t()
    part = _slices(world_size)[rank]
    group = torch.distributed.group.WORLD
    cases = [
        ("logits", teacher[:, part], teacher, dict(divergence="jsd", alpha=0.3, reduction="mean")),
        ("hidden", (teacher_hidden, teacher_weight[part]), teacher, dict(divergence="reverse_kl", reduction="none",
                                                                         softcap=3.0)),
        ("soft", compress_topk(teacher, 5), compress_topk(teacher, 5), dict(divergence="forward_kl", alpha=0.2,
                                                                             reduction="sum")),
    ]
    for name, teacher_shard, full_teacher, options in cases:
        h = hidden.clone().requires_grad_()
        w = weight[part].clone().requires_grad_()
        b = bias[part].clone().requires_grad_()
        loss = fused_linear_kd_loss(h, w, teacher_shard, labels, student_bias=b, chunk_size=4, process_group=group,
                                    **options)
        softcap = options.pop("softcap", None)
        h64, w64, b64 = (x.double().requires_grad_() for x in (hidden, weight, bias))
        logits = h64 @ w64.t() + b64
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        if name == "soft":
            expected = reference.sparse_kd_loss(logits, full_teacher, labels, **options)
        else:
            expected = reference.kd_loss(logits, full_teacher.double(), labels, **options)
        out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(5)) + 0.5
        grads = torch.autograd.grad(loss, (h, w, b), out)
        full = torch.autograd.grad(expected, (h64, w64, b64), out.double())
        what = f"rank {rank}/{world_size} fused linear {name}"
        _close(loss, expected, what)
        _close(grads[0], full[0], what + " grad_hidden")
        _close(grads[1], full[1][part], what + " grad_weight")
        _close(grads[2], full[2][part], what + " grad_bias")


def _worker(rank, world_size, rendezvous, out_dir):
    import torch.distributed as dist

    _init(rank, world_size, rendezvous)
    try:
        _dense_and_sparse_cases(rank, world_size)
        _fused_linear_cases(rank, world_size)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_vocab_parallel_matches_single_process(world_size, spawn_workers):
    spawn_workers(_worker, world_size)


def _error_worker(rank, world_size, rendezvous, out_dir):
    import torch.distributed as dist

    from kdfast.functional import kd_loss

    _init(rank, world_size, rendezvous)
    try:
        shard = torch.randn(4, 5)
        try:
            kd_loss(shard, shard, torch.tensor([0, 1, 10, 2]), alpha=0.5, process_group=dist.group.WORLD)
        except ValueError as error:
            assert "labels out of range" in str(error) and "[0, 10)" in str(error)
        else:
            raise AssertionError("a label >= the global vocabulary must raise")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_label_range_uses_the_global_vocabulary(spawn_workers):
    spawn_workers(_error_worker, 2)


# ----------------------------------------------------------------------------- DDP training
class _TinyLM(torch.nn.Module):
    def __init__(self, seed, vocab=VOCAB, hidden=HIDDEN):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden, generator=generator) * 0.5)
        self.proj = torch.nn.Parameter(torch.randn(hidden, hidden, generator=generator) / hidden**0.5)
        self.lm_head = torch.nn.Parameter(torch.randn(vocab, hidden, generator=generator) * 0.3)

    def forward(self, tokens):
        return torch.tanh(self.embed[tokens] @ self.proj)


def _ddp_data():
    generator = torch.Generator().manual_seed(42)
    tokens = torch.randint(0, VOCAB, (8, 12), generator=generator)
    teacher = torch.randn(8, 12, VOCAB, generator=generator) * 2
    return tokens, teacher


def _train(model, tokens, teacher, steps, rows):
    from kdfast.functional import fused_linear_kd_loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    inner = model.module if hasattr(model, "module") else model
    for _ in range(steps):
        optimizer.zero_grad()
        hidden = model(tokens[rows])
        labels = tokens[rows].roll(-1, dims=1)
        loss = fused_linear_kd_loss(hidden, inner.lm_head, teacher[rows], labels, chunk_size=16, alpha=0.5,
                                    temperature=2.0)
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in inner.parameters()]


def _ddp_worker(rank, world_size, rendezvous, out_dir):
    import gc

    import torch.distributed as dist

    _init(rank, world_size, rendezvous)
    try:
        tokens, teacher = _ddp_data()
        model = torch.nn.parallel.DistributedDataParallel(_TinyLM(seed=7))
        parameters = _train(model, tokens, teacher, steps=5, rows=slice(rank * 4, rank * 4 + 4))
        if rank == 0:
            torch.save(parameters, os.path.join(out_dir, "ddp.pt"))
        del model
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_fused_linear_training_matches_single_process(tmp_path, spawn_workers):
    spawn_workers(_ddp_worker, 2)
    distributed = torch.load(tmp_path / "ddp.pt", weights_only=True)
    tokens, teacher = _ddp_data()
    single = _train(_TinyLM(seed=7), tokens, teacher, steps=5, rows=slice(0, 8))
    initial = list(_TinyLM(seed=7).parameters())
    for a, b, start in zip(distributed, single, initial):
        assert not torch.allclose(b, start.detach())  # training moved every parameter
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
