"""Tests of `kdfast.methods.registry`: every registered name builds on a tiny CNN pair and
gives a finite loss whose gradient reaches the student; the composition α·CE + (1−α)·D + β·E
holds for the logit methods against the underlying losses; hooks are removed; the
adversarial discriminator trains only under autograd; unknown names and missing arguments
raise errors that name the valid choices; and a method drives `kdfast.Distiller`."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import kdfast
from kdfast.methods import METHODS, available_methods, build_method, dkd_loss, logit_mse_loss
from kdfast.trainer import Distiller

CLASSES = 7


class TinyCNN(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.embedding = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, CLASSES)

    def forward(self, images):
        return self.head(self.embedding(self.features(images)))


LAYERS = {"fitnets": "features", "attention": "features", "similarity": "embedding", "rkd": "embedding"}


def models_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    student, teacher = TinyCNN(3), TinyCNN(5).eval()
    images = torch.randn(6, 1, 8, 10)
    labels = torch.randint(0, CLASSES, (6,))
    return student, teacher, images, labels


def build(name, student, teacher, images, **kwargs):
    layer = LAYERS.get(name)
    return build_method(name, temperature=2.0, alpha=0.3, student=student, teacher=teacher, student_layer=layer,
                        teacher_layer=layer, example_inputs=images[:2], **kwargs)


@pytest.mark.parametrize("name", available_methods())
def test_every_method_gives_a_finite_loss_with_student_gradient(name):
    student, teacher, images, labels = models_and_batch()
    method = build(name, student, teacher, images)
    assert method.name == name and method.needs_teacher_forward == METHODS[name].needs_features
    with torch.no_grad():
        teacher_logits = teacher(images)
    loss = method(student(images), teacher_logits, labels)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())
    for parameter in method.trainable_parameters():  # the FitNets regressor learns too
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    method.remove()


@pytest.mark.parametrize("name", [n for n in available_methods() if METHODS[n].needs_features
                                  or METHODS[n].extra_term == "adversarial"])
def test_extra_term_is_added_with_its_weight(name):
    student, teacher, images, labels = models_and_batch(1)
    with build(name, student, teacher, images, weight=0.0) as plain:
        with torch.no_grad():
            teacher_logits = teacher(images)
            base = plain(student(images), teacher_logits, labels)
    with build(name, student, teacher, images, weight=2.0) as weighted, torch.no_grad():
        teacher(images)
        total = weighted(student(images), teacher_logits, labels)
        teacher(images)
        extra = weighted._extra_loss(student(images), teacher_logits)
    expected_base = kdfast.KDLoss(temperature=2.0, alpha=0.3)(student(images), teacher_logits, labels)
    torch.testing.assert_close(base, expected_base)
    assert extra.item() > 0
    torch.testing.assert_close(total, base + 2.0 * extra, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, divergence", [("kd", "forward_kl"), ("reverse_kl", "reverse_kl"),
                                              ("jsd", "jsd"), ("tvd", "tvd")])
def test_divergence_methods_equal_kd_loss(name, divergence):
    student_logits, teacher_logits = torch.randn(5, CLASSES), torch.randn(5, CLASSES)
    labels = torch.tensor([0, 3, -100, 6, 1])
    got = build_method(name, temperature=3.0, alpha=0.4)(student_logits, teacher_logits, labels)
    expected = kdfast.KDLoss(divergence=divergence, temperature=3.0, alpha=0.4)(student_logits, teacher_logits, labels)
    torch.testing.assert_close(got, expected)


def test_mse_and_dkd_compose_with_cross_entropy_over_valid_rows():
    torch.manual_seed(2)
    student_logits, teacher_logits = torch.randn(5, CLASSES), torch.randn(5, CLASSES)
    labels = torch.tensor([0, 3, -100, 6, 1])
    valid = labels != -100
    ce = F.cross_entropy(student_logits[valid], labels[valid])
    mse = build_method("mse", alpha=0.25)(student_logits, teacher_logits, labels)
    torch.testing.assert_close(mse, 0.25 * ce + 0.75 * logit_mse_loss(student_logits[valid], teacher_logits[valid]))
    dkd = build_method("dkd", alpha=0.25, temperature=2.0)(student_logits, teacher_logits, labels)
    torch.testing.assert_close(dkd, 0.25 * ce + 0.75 * dkd_loss(student_logits, teacher_logits, labels,
                                                                 temperature=2.0))
    all_ignored = torch.full((5,), -100)
    for name in ("mse", "dkd"):
        loss = build_method(name)(student_logits.requires_grad_(), teacher_logits, all_ignored)
        assert loss.item() == 0.0


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown distillation method 'fitnet'.*did you mean 'fitnets'") as info:
        build_method("fitnet")
    for name in available_methods():
        assert name in str(info.value)


def test_missing_pieces_and_bad_values_raise():
    with pytest.raises(ValueError, match="needs student, teacher, example_inputs, student_layer, teacher_layer"):
        build_method("fitnets")
    student, teacher, images, _ = models_and_batch()
    with pytest.raises(ValueError, match="'attention' needs \\[N, C, \\*spatial\\] feature maps"):
        build_method("attention", student=student, teacher=teacher, student_layer="embedding",
                     teacher_layer="embedding", example_inputs=images)
    with pytest.raises(ValueError, match="no submodule named 'conv'"):
        build_method("rkd", student=student, teacher=teacher, student_layer="conv", teacher_layer="embedding",
                     example_inputs=images)
    with pytest.raises(ValueError, match="alpha must be in"):
        build_method("kd", alpha=1.5)
    with pytest.raises(ValueError, match="needs labels"):
        build_method("dkd")(torch.randn(2, 3), torch.randn(2, 3))


def test_hooks_are_removed_and_features_must_be_captured():
    student, teacher, images, labels = models_and_batch()
    method = build("similarity", student, teacher, images)
    assert student.embedding._forward_hooks and teacher.embedding._forward_hooks
    with pytest.raises(RuntimeError, match="found no captured features"):
        method(torch.randn(6, CLASSES), torch.randn(6, CLASSES), labels)
    with torch.no_grad():
        teacher_logits = teacher(images)
    method(student(images), teacher_logits, labels)
    with pytest.raises(RuntimeError, match="found no captured features"):  # the first call consumed them
        method(torch.randn(6, CLASSES), teacher_logits, labels)
    method.remove()
    assert not student.embedding._forward_hooks and not teacher.embedding._forward_hooks


def test_adversarial_discriminator_steps_only_with_autograd():
    student, teacher, images, labels = models_and_batch()
    method = build("adversarial", student, teacher, images)
    before = [p.detach().clone() for p in method.adversary.discriminator.parameters()]
    teacher_logits = teacher(images).detach()
    with torch.no_grad():
        method(student(images), teacher_logits, labels)
    assert all(torch.equal(a, b) for a, b in zip(before, method.adversary.discriminator.parameters()))
    loss = method(student(images), teacher_logits, labels)
    assert not all(torch.equal(a, b) for a, b in zip(before, method.adversary.discriminator.parameters()))
    step_grads = [p.grad.clone() for p in method.adversary.discriminator.parameters()]
    loss.backward()  # the student's loss leaves the discriminator's gradients alone
    assert all(torch.equal(a, p.grad) for a, p in zip(step_grads, method.adversary.discriminator.parameters()))


@pytest.mark.parametrize("name", ["fitnets", "dkd"])
def test_method_drives_the_distiller(name):
    student, teacher, images, labels = models_and_batch(3)
    method = build(name, student, teacher, images)
    loader = [(images, labels)] * 4
    optimizer = torch.optim.SGD(list(student.parameters()) + method.trainable_parameters(), lr=0.05)
    distiller = Distiller(student, teacher, method, optimizer, progress=False, seed=0)
    history = distiller.fit(loader, epochs=2)
    losses = [entry["loss"] for entry in history["train"]]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert "accuracy" in distiller.evaluate(loader)
    method.remove()


def test_adversarial_finds_the_number_of_classes_from_the_student():
    student, _, images, labels = models_and_batch()
    method = build_method("adversarial", student=student, example_inputs=images[:2])
    assert method.adversary.discriminator.in_features == CLASSES
    assert build_method("adversarial", num_classes=5).adversary.discriminator.in_features == 5
    with pytest.raises(ValueError, match="needs student, example_inputs"):
        build_method("adversarial")


def test_label_free_mse_is_plain_logit_regression():
    student_logits, teacher_logits = torch.randn(4, CLASSES), torch.randn(4, CLASSES)
    loss = build_method("mse", alpha=0.0)(student_logits, teacher_logits)
    torch.testing.assert_close(loss, ((student_logits - teacher_logits) ** 2).mean())
    with pytest.raises(ValueError, match="'mse' with alpha=0.5 needs labels"):
        build_method("mse")(student_logits, teacher_logits)
