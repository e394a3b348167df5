"""Tests for adversarial KD: `Discriminator` and the `AdversarialKD` component.

The losses are compared against a float64 NumPy forward pass of the same MLP with the
BCE formulas written out; gradients are checked with `gradcheck`; the component's
contract is tested (student outputs detached in the discriminator step, discriminator
parameters untouched by the student loss); and two small games are trained: a
discriminator learning to separate fixed outputs, a generator whose outputs move onto the
teacher's distribution by the adversarial term alone, and a classifier distilled with KD
plus the adversarial term.
"""

import math

import numpy as np
import pytest
import torch

from kdfast import reference
from kdfast.methods import AdversarialKD, Discriminator


@pytest.fixture(autouse=True)
def single_thread():
    # The tensors here are tiny: one thread is fastest and immune to a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def numpy_scores(discriminator, outputs):
    """Forward pass of the Discriminator's MLP in float64 NumPy, from its weights."""
    activations = outputs.detach().double().numpy()
    linears = [m for m in discriminator.modules() if isinstance(m, torch.nn.Linear)]
    for index, linear in enumerate(linears):
        activations = activations @ linear.weight.detach().double().numpy().T + linear.bias.detach().double().numpy()
        if index < len(linears) - 1:
            activations = np.where(activations > 0, activations, 0.2 * activations)
    return activations[..., 0]


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def make_component(in_features=5, seed=0, **kwargs):
    torch.manual_seed(seed)
    return AdversarialKD(Discriminator(in_features, hidden_features=7, **kwargs).double())


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_discriminator_shapes_and_layers():
    discriminator = Discriminator(6, hidden_features=4, num_hidden_layers=3)
    assert sum(isinstance(m, torch.nn.Linear) for m in discriminator.modules()) == 4
    assert discriminator(torch.randn(5, 6)).shape == (5,)
    assert discriminator(torch.randn(2, 3, 6)).shape == (2, 3)
    assert discriminator(torch.randn(5, 6, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[\.\.\., 6\], got \(5, 7\)"):
        discriminator(torch.randn(5, 7))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        Discriminator(6, num_hidden_layers=0)


def test_losses_match_numpy():
    component = make_component(num_hidden_layers=2)
    student, teacher = randn(4, 3, 5, seed=1), randn(4, 3, 5, seed=2) + 1.0
    student_scores = numpy_scores(component.discriminator, student)
    teacher_scores = numpy_scores(component.discriminator, teacher)
    np.testing.assert_allclose(component.discriminator(student).detach().numpy(), student_scores, rtol=1e-12)
    expected_discriminator = -log_sigmoid(teacher_scores).mean() - log_sigmoid(-student_scores).mean()
    np.testing.assert_allclose(component.discriminator_loss(student, teacher).item(), expected_discriminator,
                               rtol=1e-12)
    generator = -log_sigmoid(student_scores).mean()
    kd = torch.tensor(0.75, dtype=torch.float64)
    np.testing.assert_allclose(component.student_loss(student, teacher).item(), generator, rtol=1e-12)
    np.testing.assert_allclose(component.student_loss(student, teacher, kd_loss=kd, weight=0.3).item(),
                               0.75 + 0.3 * generator, rtol=1e-12)


def test_student_loss_gradcheck_and_leaves_discriminator_alone():
    component = make_component()
    teacher = randn(6, 5, seed=3)
    student = randn(6, 5, seed=4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: component.student_loss(s, teacher, weight=0.5), (student,))
    component.student_loss(student, teacher).backward()
    parameters = list(component.discriminator.parameters())
    assert all(p.grad is None for p in parameters)
    assert all(p.requires_grad for p in parameters)  # flags restored
    assert student.grad.abs().sum() > 0


def test_discriminator_step_detaches_student_and_updates_discriminator():
    component = make_component()
    student = randn(8, 5, seed=5).requires_grad_(True)
    teacher = randn(8, 5, seed=6)
    before = [p.detach().clone() for p in component.discriminator.parameters()]
    expected = component.discriminator_loss(student, teacher).item()
    returned = component.discriminator_step(student, teacher)
    assert isinstance(returned, float) and returned == pytest.approx(expected, rel=1e-12)
    assert student.grad is None
    assert all(not torch.equal(b, p) for b, p in zip(before, component.discriminator.parameters()))


def test_component_accepts_a_given_optimizer_and_moves_as_a_module():
    discriminator = Discriminator(3, hidden_features=4)
    optimizer = torch.optim.SGD(discriminator.parameters(), lr=0.1)
    component = AdversarialKD(discriminator, optimizer)
    assert component.optimizer is optimizer
    assert set(component.state_dict()) == {"discriminator." + k for k in discriminator.state_dict()}
    assert isinstance(AdversarialKD(Discriminator(3)).optimizer, torch.optim.Adam)
    assert next(component.double().parameters()).dtype == torch.float64


def test_component_rejects_bad_input():
    component = make_component()
    with pytest.raises(ValueError, match=r"\(4, 5\) and \(4, 6\)"):
        component.discriminator_step(randn(4, 5, seed=0), randn(4, 6, seed=1))
    with pytest.raises(ValueError, match=r"\(4, 5\) and \(3, 5\)"):
        component.student_loss(randn(4, 5, seed=0), randn(3, 5, seed=1))
    with pytest.raises(ValueError, match="kd_loss must be a 0-dim tensor"):
        component.student_loss(randn(4, 5, seed=0), randn(4, 5, seed=1), kd_loss=torch.ones(3))
    with pytest.raises(ValueError, match="weight"):
        component.student_loss(randn(4, 5, seed=0), randn(4, 5, seed=1), weight=-1.0)
    with pytest.raises(TypeError, match="discriminator"):
        AdversarialKD(lambda x: x)
    with pytest.raises(TypeError, match="student_out"):
        component.discriminator_step(randn(4, 5, seed=0).long(), randn(4, 5, seed=1))


# ---------------------------------------------------------------- training

def test_discriminator_learns_to_separate_teacher_from_student():
    torch.manual_seed(10)
    component = AdversarialKD(Discriminator(4, hidden_features=16), lr=1e-2)
    student = torch.randn(64, 4) - 1.0
    teacher = torch.randn(64, 4) + 1.0
    losses = [component.discriminator_step(student, teacher) for _ in range(100)]
    assert losses[0] > 1.0 and losses[-1] < 0.3 * losses[0]
    with torch.no_grad():
        assert (component.discriminator(teacher) > 0).float().mean() > 0.9
        assert (component.discriminator(student) < 0).float().mean() > 0.9


def test_adversarial_term_alone_moves_student_outputs_onto_the_teacher_distribution():
    # Student outputs z + b must learn the teacher's mean: only the discriminator can tell it.
    torch.manual_seed(11)
    teacher_mean = torch.tensor([3.0, -2.0])
    shift = torch.zeros(2, requires_grad=True)
    component = AdversarialKD(Discriminator(2, hidden_features=32), lr=1e-3)
    optimizer = torch.optim.Adam([shift], lr=2e-2)
    discriminator_losses = []
    for _ in range(300):
        student_out = torch.randn(64, 2) + shift
        teacher_out = torch.randn(64, 2) + teacher_mean
        discriminator_losses.append(component.discriminator_step(student_out, teacher_out))
        optimizer.zero_grad()
        component.student_loss(student_out, teacher_out).backward()
        optimizer.step()
    assert (shift.detach() - teacher_mean).norm() < 1.0 < 3.6 - 1.0  # started 3.6 away
    # At the end the discriminator can no longer tell them apart: L_D ≈ 2·log 2.
    assert abs(np.mean(discriminator_losses[-30:]) - 2 * math.log(2)) < 0.1


def test_student_distilled_with_kd_plus_adversarial_term_learns_the_teacher():
    generator = torch.Generator().manual_seed(12)
    inputs = torch.randn(256, 10, generator=generator)
    teacher_logits = 4.0 * torch.tanh(inputs @ torch.randn(10, 32, generator=generator) / math.sqrt(10)) \
        @ torch.randn(32, 4, generator=generator) / math.sqrt(32)
    labels = teacher_logits.argmax(-1)
    torch.manual_seed(13)
    student = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    component = AdversarialKD(Discriminator(4, hidden_features=32))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    kd_losses = []
    for _ in range(150):
        student_logits = student(inputs)
        component.discriminator_step(student_logits, teacher_logits)
        kd = reference.kd_loss(student_logits, teacher_logits, temperature=2.0)
        loss = component.student_loss(student_logits, teacher_logits, kd_loss=kd, weight=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        kd_losses.append(kd.item())
    with torch.no_grad():
        accuracy = (student(inputs).argmax(-1) == labels).float().mean().item()
    assert kd_losses[-1] < 0.3 * kd_losses[0]
    assert accuracy > 0.8  # chance is 0.25
