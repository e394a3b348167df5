"""Tests of `kdfast.trainer.DataFreeDistiller`: a checkpoint at step k, loaded into fresh
objects and continued, gives the uninterrupted run bit for bit (student, generator, both
optimisers and schedulers, history); evaluation on real data leaves the trajectory alone;
bad arguments raise when the loop is built; and a short data-free run on the digits lifts a
student well above its untrained accuracy on held-out images it never saw."""

from __future__ import annotations

import pytest
import torch
from test_trainer_state import assert_same
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast import KDLoss
from kdfast.methods import build_method
from kdfast.trainer import DataFreeDistiller, seed_everything
from kdfast.trainer.checkpoint import read_checkpoint

CLASSES = 5


def make_distiller(seed: int, path=None, discrepancy: str = "l1", **kwargs) -> DataFreeDistiller:
    """The same teacher every time; student and generator initialised from `seed`."""
    torch.manual_seed(1000)
    teacher = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(48, CLASSES)).eval()
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, CLASSES))
    method = build_method("data_free", temperature=2.0, teacher=teacher, output_shape=(1, 4, 4), latent_dim=6,
                          generator_width=4, discrepancy=discrepancy, bn_weight=0.5, balance_weight=0.5,
                          generator_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3, gamma=0.5)
    return DataFreeDistiller(student, teacher, method, optimizer, scheduler, batch_size=8, student_steps=2,
                             max_grad_norm=1.0, seed=3, checkpoint_path=path, progress=False, **kwargs)


def assert_same_run(got: DataFreeDistiller, want: DataFreeDistiller) -> None:
    assert got.step == want.step
    assert_same(dict(got.student.state_dict()), dict(want.student.state_dict()), "student")
    assert_same(dict(got.method.state_dict()), dict(want.method.state_dict()), "generator")
    assert_same(got.optimizer.state_dict(), want.optimizer.state_dict(), "student optimizer")
    assert_same(got.scheduler.state_dict(), want.scheduler.state_dict(), "student scheduler")
    assert_same(got.method.optimizer.state_dict(), want.method.optimizer.state_dict(), "generator optimizer")
    assert_same(got.method.scheduler.state_dict(), want.method.scheduler.state_dict(), "generator scheduler")
    def without_speed(history):  # the measured throughput is the one entry that may differ
        return [{k: v for k, v in entry.items() if k != "samples_per_second"} for entry in history["train"]]

    assert without_speed(got.history) == without_speed(want.history)


@pytest.mark.parametrize("discrepancy", ["l1", "jsd"])
@pytest.mark.parametrize("stop", [1, 3])
def test_checkpoint_at_step_k_resumes_exactly(tmp_path, discrepancy, stop):
    reference = make_distiller(seed=1, discrepancy=discrepancy)
    reference.fit_data_free(steps=5)
    path = tmp_path / "data_free.pt"
    first = make_distiller(seed=1, path=path, discrepancy=discrepancy)
    first.fit_data_free(steps=stop)
    state = read_checkpoint(path)  # sealed and verified
    assert state["step"] == stop and set(state["loss_owned"]) == {"optimizer", "scheduler"}
    assert any(key.startswith("generator.") for key in state["loss"])
    # Fresh objects with other initial weights: everything must come from the checkpoint.
    resumed = make_distiller(seed=99, discrepancy=discrepancy)
    resumed.fit_data_free(steps=5, resume_from=path)
    assert_same_run(resumed, reference)


def test_evaluation_does_not_change_the_trajectory():
    torch.manual_seed(7)
    images, labels = torch.rand(20, 1, 4, 4), torch.randint(0, CLASSES, (20,))
    measured = make_distiller(seed=2, eval_every=1)
    history = measured.fit_data_free(steps=3, eval_loader=DataLoader(TensorDataset(images, labels), batch_size=8))
    assert [entry["step"] for entry in history["eval"]] == [1, 2, 3]
    assert {"accuracy", "agreement", "loss"} <= set(history["eval"][-1])
    plain = make_distiller(seed=2)
    plain.fit_data_free(steps=3)
    assert_same(dict(measured.student.state_dict()), dict(plain.student.state_dict()), "student")
    assert_same(dict(measured.method.state_dict()), dict(plain.method.state_dict()), "generator")


def test_bad_arguments_raise_when_built():
    distiller = make_distiller(seed=0)
    student, teacher, method = distiller.student, distiller.teachers[0], distiller.method
    with pytest.raises(TypeError, match="must be a kdfast.methods.DataFreeKD"):
        DataFreeDistiller(student, teacher, KDLoss())
    with pytest.raises(TypeError, match="teacher must be one torch.nn.Module"):
        DataFreeDistiller(student, [teacher], method)
    with pytest.raises(ValueError, match="student_steps must be an int >= 1"):
        DataFreeDistiller(student, teacher, method, student_steps=0)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        distiller.fit_data_free(steps=0)


class DigitsTeacher(nn.Module):
    """A small CNN with BatchNorm: `[N, 1, 8, 8] -> [N, 10]`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(128, 10))

    def forward(self, images):
        return self.net(images)


def test_a_short_data_free_run_beats_the_untrained_student_on_held_out_digits():
    pytest.importorskip("sklearn")
    from kdfast.demo import load_digits_split
    from kdfast.supervised import accuracy, train_classifier

    x_train, y_train, x_test, y_test = load_digits_split(0)
    seed_everything(0)
    teacher = DigitsTeacher()
    train_classifier(teacher, x_train, y_train, epochs=15, seed=0, lr=1e-2)
    assert accuracy(teacher, x_test, y_test) > 0.85
    torch.manual_seed(1)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    untrained = accuracy(student, x_test, y_test)
    method = build_method("data_free", teacher=teacher, example_inputs=x_train[:2], latent_dim=16,
                          generator_width=8, activation="sigmoid", bn_weight=10.0, balance_weight=1.0,
                          generator_lr=1e-2)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    distiller = DataFreeDistiller(student, teacher, method, optimizer, batch_size=64, student_steps=2, seed=0,
                                  progress=False)
    distiller.fit_data_free(steps=150)
    method.remove()
    assert accuracy(student, x_test, y_test) > untrained + 0.2
