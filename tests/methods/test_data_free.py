"""Tests of `kdfast.methods.data_free`: one generator step raises and one student step lowers
the teacher–student discrepancy on the same noise, for every discrepancy; the divergences'
gradients reach both the student's and the teacher's logits as the plain formulas say; the
default generator gives the requested shapes and ranges; the batch-norm prior matches its
formula and is only active during generator steps; labelled calls compose α·CE + (1−α)·D;
and `build_method("data_free", ...)` validates its options when it is built."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kdfast.methods import DataFreeKD, Generator, build_method
from kdfast.methods.data_free import DISCREPANCIES, BatchNormPrior

CLASSES = 6


def tiny_teacher(batch_norm: bool = True) -> nn.Module:
    norm = [nn.BatchNorm2d(4)] if batch_norm else []
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *norm, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, CLASSES))


def models(seed: int = 0):
    torch.manual_seed(seed)
    teacher = tiny_teacher().eval().requires_grad_(False)
    with torch.no_grad():  # non-trivial running statistics
        teacher[1].running_mean.uniform_(-0.5, 0.5)
        teacher[1].running_var.uniform_(0.5, 2.0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, CLASSES))
    return student, teacher


def reference_divergence(name: str, student_logits, teacher_logits, temperature: float):
    """T²·D(softmax(t/T), softmax(s/T)) in plain PyTorch, mean over rows."""
    p = F.softmax(teacher_logits / temperature, -1)
    q = F.softmax(student_logits / temperature, -1)
    if name == "forward_kl":
        rows = (p * (p.log() - q.log())).sum(-1)
    elif name == "reverse_kl":
        rows = (q * (q.log() - p.log())).sum(-1)
    elif name == "jsd":
        m = 0.5 * (p + q)
        rows = 0.5 * (p * (p.log() - m.log())).sum(-1) + 0.5 * (q * (q.log() - m.log())).sum(-1)
    else:
        rows = 0.5 * (p - q).abs().sum(-1)
    return temperature ** 2 * rows.mean()


def discrepancy_on(method, student, teacher, seed: int) -> float:
    torch.manual_seed(seed)  # the method's first draw is the noise: the same z every time
    with torch.no_grad():
        inputs = method.sample(16)
        return float(method.discrepancy(student(inputs), teacher(inputs)))


@pytest.mark.parametrize("discrepancy", DISCREPANCIES)
def test_generator_step_raises_and_student_step_lowers_the_discrepancy(discrepancy):
    student, teacher = models(1)
    method = build_method("data_free", temperature=2.0, alpha=0.0, teacher=teacher, output_shape=(1, 4, 4),
                          discrepancy=discrepancy, latent_dim=8, generator_width=4,
                          generator_optimizer=None, generator_lr=1e-3)
    method.optimizer = torch.optim.SGD(method.generator.parameters(), lr=1e-3)
    before = discrepancy_on(method, student, teacher, seed=5)
    torch.manual_seed(5)
    terms = method.generator_step(student, teacher, 16)
    assert terms["discrepancy"] == pytest.approx(before, rel=1e-5)
    raised = discrepancy_on(method, student, teacher, seed=5)
    assert raised > before
    assert all(p.grad is None for p in student.parameters())  # L_G trains G only

    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)
    generator_state = {k: v.clone() for k, v in method.generator.state_dict().items()}
    torch.manual_seed(5)
    loss = method.student_loss(student, teacher, 16)
    assert loss.item() == pytest.approx(raised, rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in method.generator.parameters())  # G(z) is detached for L_S
    optimizer.step()
    method.generator.load_state_dict(generator_state)  # undo the running-statistics update of the draw
    assert discrepancy_on(method, student, teacher, seed=5) < raised


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_divergence_gradients_reach_both_logits(name):
    torch.manual_seed(3)
    method = DataFreeKD(Generator(4, (3,)), 4, discrepancy=name, temperature=2.5)
    student_logits = torch.randn(5, CLASSES, requires_grad=True)
    teacher_logits = torch.randn(5, CLASSES, requires_grad=True)
    got = method.discrepancy(student_logits, teacher_logits)
    got_student, got_teacher = torch.autograd.grad(got, (student_logits, teacher_logits))
    want = reference_divergence(name, student_logits, teacher_logits, 2.5)
    want_student, want_teacher = torch.autograd.grad(want, (student_logits, teacher_logits))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_student, want_student, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_teacher, want_teacher, rtol=1e-4, atol=1e-6)
    assert got_teacher.abs().sum() > 0


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 7, 5), (2, 10), (12,)])
@pytest.mark.parametrize("activation, low, high", [("tanh", -1.0, 1.0), ("sigmoid", 0.0, 1.0)])
def test_generator_shapes_and_ranges(shape, activation, low, high):
    torch.manual_seed(0)
    generator = Generator(16, shape, width=8, activation=activation)
    out = generator(torch.randn(5, 16))
    assert out.shape == (5, *shape) and out.dtype == torch.float32
    assert out.min() >= low and out.max() <= high and out.std() > 0
    with pytest.raises(ValueError, match=r"noise \[N, 16\]"):
        generator(torch.randn(5, 15))


def test_batch_norm_prior_matches_its_formula_and_is_active_only_in_generator_steps():
    student, teacher = models(2)
    prior = BatchNormPrior(teacher)
    inputs = torch.randn(7, 1, 4, 4)
    teacher(inputs)
    assert prior.loss is None  # inactive: nothing recorded
    prior.active = True
    teacher(inputs)
    features = teacher[0](inputs)
    layer = teacher[1]
    want = (torch.linalg.vector_norm(features.mean((0, 2, 3)) - layer.running_mean)
            + torch.linalg.vector_norm(features.var((0, 2, 3), unbiased=False) - layer.running_var))
    torch.testing.assert_close(prior.loss, want)
    prior.remove()
    assert not layer._forward_hooks
    with pytest.raises(ValueError, match="has none"):
        BatchNormPrior(tiny_teacher(batch_norm=False))


def test_bn_prior_enters_the_generator_loss_with_its_weight():
    student, teacher = models(4)
    plain = build_method("data_free", teacher=teacher, output_shape=(1, 4, 4), latent_dim=8, generator_width=4)
    weighted = build_method("data_free", teacher=teacher, output_shape=(1, 4, 4), latent_dim=8, generator_width=4,
                            bn_weight=3.0, balance_weight=0.5)
    weighted.generator.load_state_dict(plain.generator.state_dict())
    torch.manual_seed(0)
    base = plain.generator_loss(student, teacher, 8)
    torch.manual_seed(0)
    terms = weighted.generator_loss(student, teacher, 8)
    assert base["bn"].item() == 0 and terms["bn"].item() > 0 and terms["balance"].item() > 0
    torch.testing.assert_close(terms["loss"], base["loss"] + 3.0 * terms["bn"] + 0.5 * terms["balance"])
    weighted.remove()


@pytest.mark.parametrize("discrepancy", ["l1", "forward_kl"])
def test_labelled_call_is_cross_entropy_plus_discrepancy_over_valid_rows(discrepancy):
    torch.manual_seed(6)
    method = build_method("data_free", alpha=0.3, temperature=2.0, output_shape=(4,), discrepancy=discrepancy)
    student_logits, teacher_logits = torch.randn(5, CLASSES), torch.randn(5, CLASSES)
    labels = torch.tensor([0, 3, -100, 5, 1])
    valid = labels != -100
    got = method(student_logits, teacher_logits, labels)
    term = reference_divergence("forward_kl", student_logits[valid], teacher_logits[valid], 2.0) \
        if discrepancy == "forward_kl" else (student_logits[valid] - teacher_logits[valid]).abs().mean()
    want = 0.3 * F.cross_entropy(student_logits[valid], labels[valid]) + 0.7 * term
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(method(student_logits, teacher_logits),
                               method.discrepancy(student_logits, teacher_logits))


def test_registry_builds_it_by_name_with_the_shape_of_the_example_inputs():
    student, teacher = models()
    method = build_method("data_free", student=student, teacher=teacher, example_inputs=torch.rand(2, 1, 4, 4),
                          bn_weight=1.0, activation="sigmoid")
    assert isinstance(method, DataFreeKD) and method.name == "data_free"
    assert method.sample(3).shape == (3, 1, 4, 4)
    assert method.bn_prior is not None and method.trainable_parameters() == []
    with method:
        pass
    assert not teacher[1]._forward_hooks


@pytest.mark.parametrize("options, error, match", [
    ({"discrepancy": "l2"}, ValueError, "discrepancy must be one of"),
    ({"bn_weight": -1.0}, ValueError, "bn_weight must be a number >= 0"),
    ({"balance_weight": math.inf}, ValueError, "must be finite"),
    ({"latent_dim": 0}, ValueError, "latent_dim must be an int >= 1"),
    ({"activation": "relu"}, ValueError, "activation must be one of"),
    ({"generator_lr": 0.0}, ValueError, "lr must be a number > 0"),
    ({"output_shape": (1, 2, 3, 4)}, ValueError, "output_shape must be"),
    ({"noise_dim": 8}, TypeError, "unknown options \\['noise_dim'\\]; valid options: discrepancy"),
    ({"weight": 0.5}, ValueError, "no β term"),
    ({"bn_weight": 1.0, "teacher": None}, ValueError, "needs the teacher"),
    ({"bn_weight": 1.0, "teacher": "plain"}, ValueError, "BatchNorm layers"),
    ({"output_shape": None, "example_inputs": torch.zeros(2, 5, dtype=torch.int64)}, ValueError,
     "needs output_shape"),
])
def test_bad_options_raise_at_construction(options, error, match):
    _, teacher = models()
    arguments = {"teacher": teacher, "output_shape": (1, 4, 4), **options}
    if arguments["teacher"] == "plain":
        arguments["teacher"] = tiny_teacher(batch_norm=False)
    with pytest.raises(error, match=match):
        build_method("data_free", **arguments)


def test_other_methods_reject_data_free_options():
    with pytest.raises(TypeError, match="method 'kd' takes no options, got \\['bn_weight'\\]"):
        build_method("kd", bn_weight=1.0)
