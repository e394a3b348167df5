"""Tests of the state `kdfast.Distiller` keeps for a loss module with its own parameters.

A registry method (`kdfast.methods.build_method`) can own learnable parts: the FitNets
regressor, updated by the student's optimiser, and the adversarial discriminator, stepped
by its own optimiser inside every training call. These tests check that a checkpoint
resumes every registry method exactly (student, loss module and every optimiser state
bit-identical to an uninterrupted run), that gradient accumulation and clipping treat the
regressor like the student's parameters, that the discriminator is clipped at its own
step, and that the default optimiser includes the loss module's trainable parameters.
"""

from __future__ import annotations

from typing import Any, Mapping

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast import KDLoss
from kdfast.methods import available_methods, build_method
from kdfast.trainer import Distiller, atomic_save

CLASSES = 5
LAYERS = {"fitnets": "features", "attention": "features", "similarity": "embedding", "rkd": "embedding"}


class TinyConvNet(nn.Module):
    """[N, 1, 4, 4] images -> [N, CLASSES] logits, with a spatial and a vector feature layer."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.embedding = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, CLASSES)

    def forward(self, images):
        return self.head(self.embedding(self.features(images)))


def make_data(count=24):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 1, 4, 4, generator=generator), torch.randint(0, CLASSES, (count,), generator=generator)


def make_objects(name, seed, optimizer="adamw"):
    """The same teacher every time; student and registry method built after
    `torch.manual_seed(seed)`; an optimiser over their trainable parameters."""
    torch.manual_seed(1000)
    teacher = TinyConvNet(4)
    torch.manual_seed(seed)
    student = TinyConvNet(3)
    images, _ = make_data()
    layer = LAYERS.get(name)
    method = build_method(name, temperature=2.0, alpha=0.3, student=student, teacher=teacher,
                          student_layer=layer, teacher_layer=layer, example_inputs=images[:2])
    parameters = list(student.parameters()) + method.trainable_parameters()
    if optimizer == "adamw":
        optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    else:
        optimizer = torch.optim.SGD(parameters, lr=0.1)
    return student, teacher, method, optimizer


def assert_same(got: Any, want: Any, where: str = "state") -> None:
    """Recursive bitwise equality of (nested) state dicts."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, Mapping):
        assert isinstance(got, Mapping) and list(got) == list(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for index, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert got == want, where


def interrupt_at(model, call):
    """Make `model` raise KeyboardInterrupt on its training-mode forward call number `call`."""
    seen = [0]

    def hook(module, args):
        if module.training:
            seen[0] += 1
            if seen[0] == call:
                raise KeyboardInterrupt("stop here")

    model.register_forward_pre_hook(hook)


def run_distiller(name, seed, path=None, interrupt=None, **fit_kwargs):
    student, teacher, method, optimizer = make_objects(name, seed)
    if interrupt is not None:
        interrupt_at(student, interrupt)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    images, labels = make_data()
    loader = DataLoader(TensorDataset(images, labels), batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    distiller = Distiller(student, teacher, method, optimizer, scheduler, accumulation_steps=2, max_grad_norm=0.5,
                          seed=0, progress=False, checkpoint_path=path)
    try:
        distiller.fit(loader, epochs=2, **fit_kwargs)  # 6 batches per epoch: 3 optimizer steps per epoch
    finally:
        method.remove()
    return distiller


def assert_same_run(got, want):
    assert got.step == want.step
    assert_same(dict(got.student.state_dict()), dict(want.student.state_dict()), "student")
    assert_same(dict(got.loss.state_dict()), dict(want.loss.state_dict()), "loss module")
    assert_same(got.optimizer.state_dict(), want.optimizer.state_dict(), "optimizer")
    assert_same(got.scheduler.state_dict(), want.scheduler.state_dict(), "scheduler")
    if want.loss.adversary is not None:
        assert_same(got.loss.adversary.optimizer.state_dict(), want.loss.adversary.optimizer.state_dict(),
                    "discriminator optimizer")
    assert [e["loss"] for e in got.history["train"]] == [e["loss"] for e in want.history["train"]]


@pytest.mark.parametrize("name", available_methods())
def test_resume_is_exact_for_every_registry_method(tmp_path, name):
    reference = run_distiller(name, seed=1)
    assert reference.step == 6

    path = tmp_path / "last.pt"
    first = run_distiller(name, seed=1, path=path, max_steps=2)  # stops in the middle of epoch 0
    assert first.step == 2 and torch.load(path, weights_only=True)["batch_in_epoch"] == 4
    # Fresh objects with other initial weights: the student, the method's parameters and every
    # optimiser state must all come from the checkpoint.
    assert_same_run(run_distiller(name, seed=99, path=path, resume_from=path), reference)


@pytest.mark.parametrize("name", ["adversarial", "fitnets"])
def test_interrupt_inside_an_accumulation_group_resumes_exactly(tmp_path, name):
    # The 6th training forward is the second micro-batch of step 3: the discriminator has
    # already stepped on the first one, after step 2 (what the checkpoint records) was done.
    path = tmp_path / "last.pt"
    with pytest.raises(KeyboardInterrupt):
        run_distiller(name, seed=1, path=path, interrupt=6)
    assert torch.load(path, weights_only=True)["step"] == 2
    assert_same_run(run_distiller(name, seed=99, path=path, resume_from=path), run_distiller(name, seed=1))


@pytest.mark.parametrize("max_norm", [None, 0.05], ids=["no-clipping", "clipping"])
def test_accumulation_and_clipping_cover_the_regressor(max_norm):
    images, labels = make_data(count=8)
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    student, teacher, method, optimizer = make_objects("fitnets", seed=4, optimizer="sgd")
    distiller = Distiller(student, teacher, method, optimizer, accumulation_steps=2, max_grad_norm=max_norm,
                          progress=False)
    distiller.fit(batches, epochs=1)
    assert distiller.step == 1
    method.remove()

    # The same step by hand: mean of the two micro-batch gradients over every parameter the
    # optimiser updates, one joint clip, one SGD step.
    student, teacher, method, optimizer = make_objects("fitnets", seed=4, optimizer="sgd")
    teacher.eval().requires_grad_(False)
    for inputs, targets in batches:
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        method(student(inputs), teacher_logits, targets).backward()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(parameters) == len(list(student.parameters())) + len(method.trainable_parameters()) > 0
    for parameter in parameters:
        parameter.grad.div_(2)
    if max_norm is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        assert norm > max_norm
        assert distiller.history["train"][0]["grad_norm"] == pytest.approx(norm, rel=1e-6)
    optimizer.step()
    method.remove()

    for got, want in zip(distiller.student.parameters(), student.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for got, want in zip(distiller.loss.trainable_parameters(), method.trainable_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_discriminator_is_clipped_at_its_own_step_and_only_inside_fit():
    student, teacher, method, optimizer = make_objects("adversarial", seed=5)
    discriminator = list(method.adversary.discriminator.parameters())
    norms = []

    def record(opt, args, kwargs):  # runs after the discriminator's step: sees the gradients it used
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad)
                                                                   for p in discriminator]))))

    method.adversary.optimizer.register_step_post_hook(record)
    images, labels = make_data(count=12)
    max_norm = 1e-3
    distiller = Distiller(student, teacher, method, optimizer, accumulation_steps=2, max_grad_norm=max_norm,
                          progress=False)
    distiller.fit(DataLoader(TensorDataset(images, labels), batch_size=4), epochs=1)
    assert distiller.step == 2 and len(norms) == 3  # one discriminator step per micro-batch
    assert all(norm <= max_norm * (1 + 1e-5) for norm in norms)

    norms.clear()  # outside fit, the method's own step is left as it is
    method.train()
    method(student(images), teacher(images).detach(), labels)
    assert len(norms) == 1 and norms[0] > 10 * max_norm
    method.remove()


def test_default_optimizer_includes_the_loss_modules_trainable_parameters():
    student, teacher, method, _ = make_objects("fitnets", seed=6)
    distiller = Distiller(student, teacher, method, progress=False)
    optimised = {id(p) for group in distiller.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in list(student.parameters()) + method.trainable_parameters()}
    before = [p.detach().clone() for p in method.trainable_parameters()]
    images, labels = make_data(count=8)
    distiller.fit([(images[:4], labels[:4]), (images[4:], labels[4:])], epochs=1)
    assert all(not torch.equal(a, b) for a, b in zip(before, method.trainable_parameters()))
    method.remove()


def test_loss_state_in_checkpoints_and_mismatches(tmp_path):
    student, teacher, method, optimizer = make_objects("adversarial", seed=7)
    path = tmp_path / "adversarial.pt"
    distiller = Distiller(student, teacher, method, optimizer, progress=False)
    distiller.save_checkpoint(path)
    state = torch.load(path, weights_only=True)
    assert_same(dict(state["loss"]), dict(method.state_dict()), "loss")
    assert_same(state["loss_owned"]["adversary.optimizer"], method.adversary.optimizer.state_dict(), "owned")

    def plain_loss(student_logits, teacher_logits, labels):
        return KDLoss(temperature=2.0)(student_logits, teacher_logits, labels)

    with pytest.raises(ValueError, match="loss state"):
        Distiller(TinyConvNet(3), teacher, plain_loss, progress=False).load_checkpoint(path)
    other, _, fitnets, fitnets_optimizer = make_objects("fitnets", seed=7)
    with pytest.raises(ValueError, match="adversary.optimizer"):
        Distiller(other, teacher, fitnets, fitnets_optimizer, progress=False).load_checkpoint(path)
    fitnets.remove()

    # A checkpoint without loss entries (as older versions wrote) still loads, keeping the
    # loss module as it is; a plain-function loss is recorded as None.
    del state["loss"], state["loss_owned"]
    atomic_save(state, tmp_path / "older.pt")
    fresh_student, fresh_teacher, fresh_method, fresh_optimizer = make_objects("adversarial", seed=8)
    kept = {key: value.clone() for key, value in fresh_method.state_dict().items()}
    Distiller(fresh_student, fresh_teacher, fresh_method, fresh_optimizer, progress=False).load_checkpoint(
        tmp_path / "older.pt")
    assert_same(dict(fresh_method.state_dict()), kept, "loss kept")
    assert_same(dict(fresh_student.state_dict()), dict(student.state_dict()), "student")
    plain = Distiller(TinyConvNet(3), teacher, plain_loss, progress=False)
    plain.save_checkpoint(tmp_path / "plain.pt")
    assert torch.load(tmp_path / "plain.pt", weights_only=True)["loss"] is None
    plain.load_checkpoint(tmp_path / "plain.pt")
    method.remove()
    fresh_method.remove()
