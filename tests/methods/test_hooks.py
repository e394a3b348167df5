"""Tests for `kdfast.methods.FeatureCapture`: capturing intermediate outputs by module name.

Checks that captured values equal the submodules' outputs computed by hand, that hooks
exist exactly while attached (also after an exception), that unknown names fail clearly
at construction, that detached and attached-graph captures behave as documented, and
that captured features drive a hint loss end to end.
"""

import pytest
import torch
from torch import nn

from kdfast.methods import FeatureCapture, HintLoss


@pytest.fixture(autouse=True)
def single_thread():
    # The tensors here are tiny: one thread is fastest and immune to a busy machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class TinyNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Linear(6, width)
        self.blocks = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Linear(width, 3)

    def forward(self, inputs):
        return self.head(self.blocks(torch.tanh(self.stem(inputs))))


class PairOutput(nn.Module):
    def forward(self, inputs):
        return inputs * 2, inputs + 1


def hook_count(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyNet(width=5)


def test_captured_outputs_equal_the_submodule_outputs(model):
    inputs = torch.randn(4, 6)
    with FeatureCapture(model, ["stem", "blocks.1", "blocks"]) as capture:
        output = model(inputs)
    stem = model.stem(inputs)
    relu = torch.relu(model.blocks[0](torch.tanh(stem)))
    torch.testing.assert_close(capture["stem"], stem)
    torch.testing.assert_close(capture["blocks.1"], relu)
    torch.testing.assert_close(capture["blocks"], model.blocks[2](relu))
    torch.testing.assert_close(output, model.head(capture["blocks"]))  # model output unchanged
    assert list(capture) == ["stem", "blocks.1", "blocks"] and len(capture) == 3 and "stem" in capture


def test_hooks_exist_only_while_attached_and_are_removed_on_error(model):
    capture = FeatureCapture(model, "blocks.2")
    assert hook_count(model) == 0 and not capture.attached
    with capture:
        assert hook_count(model) == 1 and capture.attached
    assert hook_count(model) == 0 and not capture.attached
    with pytest.raises(RuntimeError, match="boom"):
        with capture:
            model(torch.randn(2, 6))
            raise RuntimeError("boom")
    assert hook_count(model) == 0
    captured = capture["blocks.2"]  # captures survive removal of the hooks ...
    model(torch.randn(2, 6))
    assert capture["blocks.2"] is captured  # ... and are not updated afterwards


def test_attach_and_remove_without_context_manager(model):
    capture = FeatureCapture(model, ["stem"]).attach()
    with pytest.raises(RuntimeError, match="already attached"):
        capture.attach()
    model(torch.randn(3, 6))
    assert capture["stem"].shape == (3, 5)
    capture.clear()
    with pytest.raises(KeyError, match="has not run a forward pass"):
        capture["stem"]
    capture.remove()
    assert hook_count(model) == 0


def test_each_forward_overwrites_and_reattaching_forgets(model):
    with FeatureCapture(model, "stem") as capture:
        model(torch.randn(2, 6))
        second = torch.randn(7, 6)
        model(second)
        torch.testing.assert_close(capture["stem"], model.stem(second))
    with capture:
        assert len(capture) == 0


def test_unknown_names_fail_clearly_at_construction(model):
    with pytest.raises(ValueError, match=r"no submodule named 'block\.1' \(did you mean 'blocks\.1'") as info:
        FeatureCapture(model, ["stem", "block.1"])
    assert "named_modules" in str(info.value)
    with pytest.raises(KeyError, match="is not captured"):
        FeatureCapture(model, "stem")["head"]
    with pytest.raises(TypeError, match="nn.Module"):
        FeatureCapture(lambda x: x, "stem")
    with pytest.raises(TypeError, match="strings"):
        FeatureCapture(model, [3])
    with pytest.raises(ValueError, match="at least one"):
        FeatureCapture(model, [])


def test_detach_and_graph_keeping_captures(model):
    inputs = torch.randn(3, 6)
    with FeatureCapture(model, "stem", detach=True) as detached, FeatureCapture(model, "stem") as kept:
        model(inputs)
    assert detached["stem"].grad_fn is None and not detached["stem"].requires_grad
    kept["stem"].sum().backward()
    assert model.stem.weight.grad is not None and model.stem.weight.grad.abs().sum() > 0


def test_tuple_outputs_are_captured_and_detached_elementwise():
    model = nn.Sequential(nn.Linear(2, 2), PairOutput())
    with FeatureCapture(model, "1", detach=True) as capture:
        model(torch.randn(2, 2))
    doubled, shifted = capture["1"]
    assert isinstance(capture["1"], tuple) and doubled.grad_fn is None and shifted.grad_fn is None


def test_capture_drives_a_hint_loss_between_teacher_and_student():
    torch.manual_seed(1)
    teacher, student = TinyNet(width=8), TinyNet(width=4)
    hint = HintLoss(4, 8)
    inputs = torch.randn(16, 6)
    optimizer = torch.optim.Adam(list(student.parameters()) + list(hint.parameters()), lr=1e-2)
    losses = []
    with FeatureCapture(teacher, "blocks.1") as teacher_features, \
            FeatureCapture(student, "blocks.1") as student_features:
        for _ in range(30):
            with torch.no_grad():
                teacher(inputs)
            student(inputs)
            loss = hint(student_features["blocks.1"], teacher_features["blocks.1"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert hook_count(teacher) == 0 and hook_count(student) == 0
    assert teacher_features["blocks.1"].grad_fn is None
    assert losses[-1] < 0.5 * losses[0]
