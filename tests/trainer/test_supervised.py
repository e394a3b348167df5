"""kdfast.supervised: the teacher-training loop and the batched evaluation helpers."""

from __future__ import annotations

import torch
from torch import nn

from kdfast.supervised import accuracy, predict_logits, train_classifier
from kdfast.trainer import seed_everything


def _data(seed=0, rows=300):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, 6, generator=generator)
    labels = (inputs[:, 0] + 0.5 * inputs[:, 1] > 0).long() + 2 * (inputs[:, 2] > 0.5).long()
    return inputs, labels


def _model():
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))


def test_training_learns_repeats_exactly_and_leaves_eval_mode():
    inputs, labels = _data()
    runs = []
    for _ in range(2):
        seed_everything(3)
        model = _model()
        before = accuracy(model, inputs, labels)
        curve = train_classifier(model, inputs, labels, epochs=15, seed=3, lr=1e-2, batch_size=32)
        assert not model.training
        runs.append((curve, [p.detach().clone() for p in model.parameters()]))
    curve, parameters = runs[0]
    assert len(curve) == 15 and curve[-1] < 0.5 * curve[0]
    assert accuracy(model, inputs, labels) > max(before, 0.9)
    assert runs[1][0] == curve and all(torch.equal(a, b) for a, b in zip(runs[1][1], parameters))


def test_augment_receives_each_batch_and_the_seeded_generator():
    inputs, labels = _data(rows=70)
    seen = []

    def augment(batch, generator):
        seen.append((batch.shape[0], generator.initial_seed()))
        return batch + 0.01 * torch.randn(batch.shape, generator=generator)

    train_classifier(_model(), inputs, labels, epochs=2, seed=11, lr=1e-3, batch_size=32, augment=augment)
    assert [size for size, _ in seen] == [32, 32, 6] * 2 and {seed for _, seed in seen} == {11}


def test_predict_logits_batches_equal_one_pass():
    inputs, _ = _data(rows=130)
    model = _model()
    model.train()
    logits = predict_logits(model, inputs, batch_size=16)
    assert not model.training and logits.dtype == torch.float32 and logits.shape == (130, 4)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(inputs))
