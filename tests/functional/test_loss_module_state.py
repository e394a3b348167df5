"""The loss modules keep their tensor state as buffers, so `.to()`, `state_dict()` and compilation see it.

`MultiTeacherKDLoss(weights=...)` holds per-teacher weights: they must follow the module to
another device or dtype, travel in its state dict, and give the same loss in eager and
compiled execution.
"""

import pytest
import torch

import kdfast


def _inputs(teachers=3, rows=6, vocab=29, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator)
    teacher_logits = torch.randn(teachers, rows, vocab, generator=generator)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    return student, teacher_logits, labels


@pytest.mark.parametrize("weights", [[1.0, 2.0, 0.5], torch.tensor([0.2, 0.3, 0.5])])
def test_teacher_weights_are_a_buffer(weights):
    module = kdfast.MultiTeacherKDLoss(weights=weights, temperature=2.0, alpha=0.5)
    buffers = dict(module.named_buffers())
    assert "weights" in buffers and "weights" in module.state_dict()
    torch.testing.assert_close(buffers["weights"].double(), torch.as_tensor(weights, dtype=torch.float64))
    moved = kdfast.MultiTeacherKDLoss(weights=weights).to("meta")
    assert moved.weights.device.type == "meta"


def test_teacher_weights_round_trip_through_state_dict():
    source = kdfast.MultiTeacherKDLoss(weights=[3.0, 1.0, 1.0], temperature=2.0)
    target = kdfast.MultiTeacherKDLoss(weights=[1.0, 1.0, 1.0], temperature=2.0)
    target.load_state_dict(source.state_dict())
    student, teachers, labels = _inputs()
    assert torch.equal(target(student, teachers, labels), source(student, teachers, labels))


def test_weighted_module_equals_functional_eager_and_compiled():
    torch._dynamo.reset()
    weights = [1.0, 2.0, 0.5]
    module = kdfast.MultiTeacherKDLoss(weights=weights, temperature=2.0, alpha=0.25, divergence="reverse_kl")
    student, teachers, labels = _inputs(seed=4)
    expected = kdfast.functional.multi_teacher_kd_loss(student, teachers, labels, weights=weights, temperature=2.0,
                                                       alpha=0.25, divergence="reverse_kl")
    eager = module(student, teachers, labels)
    compiled = torch.compile(module, fullgraph=True)(student, teachers, labels)
    torch.testing.assert_close(eager, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    without = kdfast.MultiTeacherKDLoss(temperature=2.0, alpha=0.25, divergence="reverse_kl")(student, teachers, labels)
    assert not torch.allclose(eager, without)
