"""Bad input to the dense KD loss raises the documented exception with a useful message.

Each case runs against both `kdfast.functional.kd_loss` (the compiled path) and
`kdfast.reference.kd_loss`: wrong dtypes raise TypeError, every other bad shape, device,
label or option raises ValueError, and the message names the offending argument (and,
for shapes, the shapes seen). Labels out of range are detected inside the kernel on the
compiled path, so for it only the "out of range" wording is required.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import kdfast
from kdfast import functional, reference
from kdfast.contract import validation
from kdfast.contract.options import DIVERGENCES, REDUCTIONS

CUDA_AVAILABLE = torch.cuda.is_available()

IMPLEMENTATIONS = [
    pytest.param(functional.kd_loss, id="functional"),
    pytest.param(reference.kd_loss, id="reference"),
]


def random_inputs(rows=4, vocab_size=12, *, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab_size, generator=generator).to(device)
    teacher = torch.randn(rows, vocab_size, generator=generator).to(device)
    labels = torch.randint(0, vocab_size, (rows,), generator=generator).to(device)
    return student, teacher, labels


@pytest.fixture(params=IMPLEMENTATIONS)
def kd_loss(request):
    return request.param


# --------------------------------------------------------------------------------------
# Shapes.


def test_mismatched_vocab(kd_loss, device):
    student, _, labels = random_inputs(4, 12, device=device)
    _, teacher, _ = random_inputs(4, 10, device=device)
    with pytest.raises(ValueError) as raised:
        kd_loss(student, teacher, labels)
    message = str(raised.value)
    assert "teacher_logits" in message and "student_logits" in message and "vocab" in message
    assert "(4, 12)" in message and "(4, 10)" in message


def test_mismatched_rows(kd_loss, device):
    student, _, labels = random_inputs(4, 12, device=device)
    _, teacher, _ = random_inputs(3, 12, device=device)
    with pytest.raises(ValueError) as raised:
        kd_loss(student, teacher, labels)
    message = str(raised.value)
    assert "teacher_logits" in message and "(4, 12)" in message and "(3, 12)" in message


def test_mismatched_leading_dims(kd_loss, device):
    student, teacher, _ = random_inputs(6, 12, device=device)
    with pytest.raises(ValueError, match="teacher_logits"):
        kd_loss(student.reshape(2, 3, 12), teacher.reshape(3, 2, 12))


@pytest.mark.parametrize("labels_shape", [(5,), (2, 2), ()], ids=str)
def test_labels_shape_differs_from_rows(kd_loss, device, labels_shape):
    student, teacher, _ = random_inputs(4, 12, device=device)
    labels = torch.zeros(labels_shape, dtype=torch.long, device=device)
    with pytest.raises(ValueError) as raised:
        kd_loss(student, teacher, labels, alpha=0.5)
    message = str(raised.value)
    assert "labels" in message and str(tuple(labels_shape)) in message and "(4,)" in message


def test_zero_dim_logits(kd_loss):
    with pytest.raises(ValueError, match="student_logits"):
        kd_loss(torch.tensor(1.0), torch.tensor(1.0))


def test_empty_vocab(kd_loss):
    with pytest.raises(ValueError, match=r"student_logits.*vocab size 0"):
        kd_loss(torch.randn(3, 0), torch.randn(3, 0))


# --------------------------------------------------------------------------------------
# Dtypes.


@pytest.mark.parametrize("labels_dtype", [torch.int32, torch.int16, torch.float32], ids=str)
def test_wrong_label_dtype(kd_loss, device, labels_dtype):
    student, teacher, labels = random_inputs(device=device)
    with pytest.raises(TypeError) as raised:
        kd_loss(student, teacher, labels.to(labels_dtype), alpha=0.5)
    message = str(raised.value)
    assert "labels" in message and "int64" in message and str(labels_dtype) in message


@pytest.mark.parametrize("argument", ["student_logits", "teacher_logits"])
@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_non_floating_logits(kd_loss, device, argument, bad_dtype):
    student, teacher, labels = random_inputs(device=device)
    if argument == "student_logits":
        student = student.to(bad_dtype)
    else:
        teacher = teacher.to(bad_dtype)
    with pytest.raises(TypeError) as raised:
        kd_loss(student, teacher, labels)
    assert argument in str(raised.value) and str(bad_dtype) in str(raised.value)


def test_labels_not_a_tensor(kd_loss):
    student, teacher, _ = random_inputs()
    with pytest.raises(TypeError, match="labels"):
        kd_loss(student, teacher, [0, 1, 2, 3], alpha=0.5)


# --------------------------------------------------------------------------------------
# Label range.


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize(
    "bad_label, ignore_index",
    [(12, -100), (13, -100), (-5, -100), (-1, -100), (-100, -1)],
    ids=["label=V", "label=V+1", "label=-5", "label=-1", "label=-100-with-ignore=-1"],
)
def test_labels_out_of_range(kd_loss, device, bad_label, ignore_index, alpha):
    student, teacher, labels = random_inputs(4, 12, device=device)
    labels[2] = bad_label
    if device == "cuda" and kd_loss is functional.kd_loss and kdfast.build_info().get("cuda"):
        # The CUDA kernels cannot raise without a device synchronisation: the bad row's loss
        # (and so every reduction) is NaN instead, as documented in kdfast.functional.kd_loss.
        loss = kd_loss(student, teacher, labels, alpha=alpha, ignore_index=ignore_index, reduction="none")
        assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
        return
    with pytest.raises(ValueError) as raised:
        kd_loss(student, teacher, labels, alpha=alpha, ignore_index=ignore_index)
    message = str(raised.value)
    assert "out of range" in message
    if kd_loss is reference.kd_loss:
        assert str(bad_label) in message and "12" in message


def test_label_equal_to_ignore_index_is_not_out_of_range(kd_loss, device):
    student, teacher, labels = random_inputs(4, 12, device=device)
    labels[1] = -7
    loss = kd_loss(student, teacher, labels, alpha=0.5, ignore_index=-7)
    assert torch.isfinite(loss)


def test_check_label_range_message():
    labels = torch.tensor([0, 3, 11, 40, -100])
    with pytest.raises(ValueError, match=r"labels out of range.*40.*V=12"):
        validation.check_label_range(labels, 12, -100)
    validation.check_label_range(labels[:3], 12, -100)
    validation.check_label_range(None, 12, -100)


# --------------------------------------------------------------------------------------
# Options.


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf"), -float("inf")], ids=str)
def test_bad_temperature(kd_loss, temperature):
    student, teacher, labels = random_inputs()
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(student, teacher, labels, temperature=temperature)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")], ids=str)
def test_alpha_outside_unit_interval(kd_loss, alpha):
    student, teacher, labels = random_inputs()
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(student, teacher, labels, alpha=alpha)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_alpha_without_labels(kd_loss, alpha):
    student, teacher, _ = random_inputs()
    with pytest.raises(ValueError) as raised:
        kd_loss(student, teacher, None, alpha=alpha)
    assert "alpha" in str(raised.value) and "labels" in str(raised.value)


def test_unknown_divergence(kd_loss):
    student, teacher, labels = random_inputs()
    with pytest.raises(ValueError) as raised:
        kd_loss(student, teacher, labels, divergence="kl")
    message = str(raised.value)
    assert "divergence" in message and "'kl'" in message
    assert all(name in message for name in DIVERGENCES)


def test_unknown_reduction(kd_loss):
    student, teacher, labels = random_inputs()
    with pytest.raises(ValueError) as raised:
        kd_loss(student, teacher, labels, reduction="average")
    message = str(raised.value)
    assert "reduction" in message and "'average'" in message
    assert all(name in message for name in REDUCTIONS)


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5, 1.5, float("nan")], ids=str)
def test_bad_beta_for_jsd(kd_loss, beta):
    student, teacher, labels = random_inputs()
    with pytest.raises(ValueError, match="beta"):
        kd_loss(student, teacher, labels, divergence="jsd", beta=beta)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "tvd"])
def test_beta_is_ignored_outside_jsd(kd_loss, divergence):
    student, teacher, labels = random_inputs()
    with_odd_beta = kd_loss(student, teacher, labels, divergence=divergence, beta=0.0)
    with_default_beta = kd_loss(student, teacher, labels, divergence=divergence)
    torch.testing.assert_close(with_odd_beta, with_default_beta, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.0, 1.5, float("nan")], ids=str)
def test_bad_label_smoothing(kd_loss, label_smoothing):
    student, teacher, labels = random_inputs()
    with pytest.raises(ValueError, match="label_smoothing"):
        kd_loss(student, teacher, labels, alpha=0.5, label_smoothing=label_smoothing)


def test_boundary_values_are_accepted(kd_loss):
    student, teacher, labels = random_inputs()
    for options in (
        dict(alpha=0.0),
        dict(alpha=1.0),
        dict(alpha=1.0, label_smoothing=0.0),
        dict(alpha=0.5, label_smoothing=0.999),
        dict(temperature=1e-3),
        dict(temperature=100),
        dict(divergence="jsd", beta=1e-6),
        dict(divergence="jsd", beta=1 - 1e-6),
        dict(ignore_index=3),
    ):
        loss = kd_loss(student, teacher, labels, **options)
        assert not math.isnan(float(loss)), options


def test_module_raises_like_functional():
    student, teacher, labels = random_inputs()
    with pytest.raises(ValueError, match="temperature"):
        kdfast.KDLoss(temperature=0.0)(student, teacher, labels)
    with pytest.raises(TypeError, match="labels"):
        kdfast.KDLoss(alpha=0.5)(student, teacher, labels.int())


# --------------------------------------------------------------------------------------
# Devices.


@pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available")
@pytest.mark.parametrize("on_other_device", ["teacher_logits", "labels"])
def test_mixed_devices(kd_loss, on_other_device):
    student, teacher, labels = random_inputs(device="cuda")
    if on_other_device == "teacher_logits":
        teacher = teacher.cpu()
    else:
        labels = labels.cpu()
    with pytest.raises(ValueError) as raised:
        kd_loss(student, teacher, labels, alpha=0.5)
    message = str(raised.value)
    assert on_other_device in message and re.search(r"cuda", message) and "cpu" in message
