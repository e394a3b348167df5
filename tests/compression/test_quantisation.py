"""Quantisation-aware training (`kdfast.compression`): a prepared student trains with a kdfast
loss, converts to integer weights whose outputs equal the fake-quantised ones, is refused with
a clear error for unsupported layers and configurations. (Skipped without torchao; the
optional-import behaviour is tested in test_optional_dependency.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdfast.compression import (
    SCHEMES,
    QuantScheme,
    convert_qat,
    distil_into_quantised,
    is_fake_quantised,
    prepare_qat,
    quantisable_layers,
    quantise_ptq,
)
from kdfast.losses import KDLoss

pytest.importorskip("torchao", reason="quantisation-aware training needs torchao (the quant extra)")

BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8}


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))


def problem(seed: int = 0, rows: int = 256):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, 64, generator=generator)
    labels = (inputs[:, :10].argmax(dim=1) + (inputs[:, 10] > 0).long()) % 10
    return inputs, labels


def train_steps(model: nn.Module, teacher: nn.Module, inputs, labels, steps: int) -> list:
    loss_fn = KDLoss(temperature=2.0, alpha=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        rows = slice((step * 32) % len(inputs), (step * 32) % len(inputs) + 32)
        with torch.no_grad():
            target = teacher(inputs[rows])
        loss = loss_fn(model(inputs[rows]), target, labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_qat_student_trains_and_converts_to_what_it_computed(name):
    scheme = SCHEMES[name]
    inputs, labels = problem()
    teacher = mlp(1)
    student = mlp(0)
    assert prepare_qat(student, scheme) == ["0", "2"] and is_fake_quantised(student)
    assert all(parameter.dtype == torch.float32 for parameter in student.parameters())
    losses = train_steps(student, teacher, inputs, labels, 24)
    assert sum(losses[-6:]) < sum(losses[:6])  # it learns under fake quantisation
    student.eval()
    with torch.no_grad():
        fake = student(inputs)
        float_copy = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
        float_copy.load_state_dict(student.state_dict())
        unquantised = float_copy(inputs)
    convert_qat(student, scheme)
    assert not is_fake_quantised(student)
    for index in (0, 2):
        weight = student[index].weight
        assert weight.qdata.dtype == torch.int8
        bound = 2 ** (BITS[scheme.weights] - 1)
        assert -bound <= int(weight.qdata.min()) and int(weight.qdata.max()) <= bound - 1
    with torch.no_grad():
        converted = student(inputs)
    quantisation_effect = (fake - unquantised).abs().max()
    assert quantisation_effect > 0
    # the converted model computes what the fake-quantised one did, far inside one quantisation step
    assert (converted - fake).abs().max() <= 0.01 * quantisation_effect


@pytest.mark.parametrize("name", ["a8w4", "w8"])
def test_ptq_equals_converting_an_untrained_qat_model(name):
    inputs, _ = problem()
    ptq = quantise_ptq(mlp(), name)
    qat = mlp()
    prepare_qat(qat, name)
    convert_qat(qat, name)
    with torch.no_grad():
        torch.testing.assert_close(ptq(inputs), qat(inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Linear(60, 10)), "not a multiple of group_size"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(64, 10)), "would stay in float"),
    (nn.Sequential(nn.Embedding(10, 64), nn.Linear(64, 10)), "would stay in float"),
    (nn.Sequential(nn.ReLU()), "no nn.Linear"),
])
def test_unsupported_models_are_refused_by_name(model, message):
    with pytest.raises(ValueError, match=message):
        prepare_qat(model, "a8w4")


def test_strict_false_keeps_other_layers_in_float():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 10))
    assert quantisable_layers(model, "a8w4", strict=False) == ["2"]
    prepare_qat(model, "a8w4", strict=False)
    assert isinstance(model[0], nn.Conv2d) and is_fake_quantised(model)


@pytest.mark.parametrize("call, message", [
    (lambda: QuantScheme(weights="int5"), "weights must be one of"),
    (lambda: QuantScheme(activations="int4"), "activations must be"),
    (lambda: QuantScheme(group_size=0), "group_size must be"),
    (lambda: prepare_qat(mlp(), "a4w4"), "unknown quantisation scheme"),
    (lambda: convert_qat(mlp(), "a8w4"), "needs a model prepared by prepare_qat"),
])
def test_unsupported_configurations_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_preparing_twice_is_refused():
    model = mlp()
    prepare_qat(model, "a8w8")
    with pytest.raises(ValueError, match="already fake-quantised"):
        prepare_qat(model, "a8w8")


def test_distil_into_quantised_brings_the_quantised_copy_closer_to_the_float_model():
    inputs, labels = problem(3, rows=512)
    model = mlp(2)
    train_steps(model, mlp(5), inputs, labels, 60)  # a float model worth copying
    before = copy.deepcopy(model.state_dict())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=64,
                                         shuffle=True, generator=torch.Generator().manual_seed(0))
    converted, report = distil_into_quantised(model, loader, QuantScheme("int4", "int8", None), epochs=4,
                                              lr=1e-3, eval_loader=loader)
    assert not is_fake_quantised(converted) and report["layers"] == ["0", "2"]
    assert report["steps"] == 4 * len(loader) and len(report["train_loss"]) == report["steps"]
    assert report["quantised_bytes"] < report["float_bytes"]
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())  # untouched
    assert report["eval"]["qat"]["loss"] < report["eval"]["ptq"]["loss"]  # KL to the float model


def test_skipped_layers_stay_float_through_prepare_and_convert():
    inputs, _ = problem()
    model = mlp()
    assert prepare_qat(model, "a8w4", skip=["2"]) == ["0"]
    assert isinstance(model[2], nn.Linear) and type(model[2]).__name__ == "Linear"
    convert_qat(model, "a8w4")
    assert model[0].weight.qdata.dtype == torch.int8
    assert type(model[2].weight) is torch.nn.Parameter and model[2].weight.dtype == torch.float32
    assert model(inputs).shape == (256, 10)
    with pytest.raises(ValueError, match="not nn.Linear layers of the model: 1"):
        quantisable_layers(mlp(), "a8w4", skip=["1"])


def test_convert_uses_the_prepared_scheme_and_refuses_another():
    inputs, _ = problem()
    model = mlp()
    prepare_qat(model, "w8")
    with pytest.raises(ValueError, match="prepared for scheme w8-pc, not a8w4-g32"):
        convert_qat(model, "a8w4")
    copied = copy.deepcopy(model)
    convert_qat(copied)  # the scheme recorded by prepare_qat travels with the model
    torch.testing.assert_close(copied(inputs), quantise_ptq(mlp(), "w8")(inputs), rtol=1e-5, atol=1e-5)
