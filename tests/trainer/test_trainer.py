"""Tests of `kdfast.Distiller` (python/kdfast/trainer/) on tiny CPU models.

They check properties, not smoke: resuming from a checkpoint (after an interrupt, a crash
or `max_steps`) reproduces an uninterrupted run bit for bit; gradient accumulation equals
one large batch; clipping bounds the update; evaluation metrics equal hand-computed values;
a checkpoint file is always the old or the new one; DDP over two gloo processes equals
single-process training with the same global batch.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from kdfast import KDLoss
from kdfast.trainer import Distiller, atomic_save, seed_everything

FEATURES, CLASSES = 7, 5


def make_data(count=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(count, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    return inputs, labels


def make_teacher(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES))


def make_student(seed=2, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 12), nn.ReLU(), nn.Dropout(dropout), nn.Linear(12, CLASSES))


def parameters_of(model):
    return [parameter.detach().clone() for parameter in model.parameters()]


def interrupt_after(model, calls, error=KeyboardInterrupt):
    """Make `model` raise `error` on its training-mode forward call number `calls`."""
    seen = [0]

    def hook(module, args):
        if module.training:
            seen[0] += 1
            if seen[0] == calls:
                raise error("stop here")

    model.register_forward_pre_hook(hook)
    return model


def build(student, loader_seed=None, **kwargs):
    """A Distiller with AdamW + a step scheduler, and a shuffling loader."""
    inputs, labels = make_data()
    generator = torch.Generator().manual_seed(loader_seed) if loader_seed is not None else None
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=4, shuffle=True, generator=generator)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
    eval_loader = DataLoader(TensorDataset(*make_data(count=12, seed=5)), batch_size=5)
    distiller = Distiller(student, make_teacher(), KDLoss(temperature=2.0, alpha=0.3), optimizer, scheduler,
                          seed=123, progress=False, **kwargs)
    return distiller, loader, eval_loader


@pytest.mark.parametrize("loader_seed", [None, 7], ids=["global-rng-shuffle", "loader-generator"])
@pytest.mark.parametrize("how", ["keyboard-interrupt", "crash-after-periodic-checkpoint", "max-steps"])
def test_resume_is_bit_identical(tmp_path, how, loader_seed):
    epochs, accumulation = 3, 2  # 10 batches per epoch -> 5 optimizer steps per epoch
    reference, loader, eval_loader = build(make_student(dropout=0.3), loader_seed, accumulation_steps=accumulation)
    reference.fit(loader, epochs=epochs, eval_loader=eval_loader)
    assert reference.step == 15
    expected = parameters_of(reference.student)

    path = tmp_path / "run" / "last.pt"
    student = make_student(dropout=0.3)
    if how == "keyboard-interrupt":
        # Interrupt in the middle of an accumulation group of the second epoch: the checkpoint
        # must hold the state of the last completed optimizer step (step 7).
        first, loader, eval_loader = build(interrupt_after(student, calls=16), loader_seed,
                                           accumulation_steps=accumulation, checkpoint_path=path)
        with pytest.raises(KeyboardInterrupt):
            first.fit(loader, epochs=epochs, eval_loader=eval_loader)
        expected_step = 7
    elif how == "crash-after-periodic-checkpoint":
        first, loader, eval_loader = build(interrupt_after(student, calls=19, error=RuntimeError), loader_seed,
                                           accumulation_steps=accumulation, checkpoint_path=path,
                                           checkpoint_every=4)
        with pytest.raises(RuntimeError, match="stop here"):
            first.fit(loader, epochs=epochs, eval_loader=eval_loader)
        expected_step = 8  # checkpoints at steps 4, 5 (epoch end) and 8; the crash hits step 9
    else:
        first, loader, eval_loader = build(student, loader_seed, accumulation_steps=accumulation,
                                           checkpoint_path=path)
        first.fit(loader, epochs=epochs, eval_loader=eval_loader, max_steps=6)
        expected_step = 6
    assert path.exists()
    assert torch.load(path, weights_only=True)["step"] == expected_step

    # Fresh objects, a different initial student: everything must come from the checkpoint.
    resumed, loader, eval_loader = build(make_student(seed=99, dropout=0.3), loader_seed,
                                         accumulation_steps=accumulation, checkpoint_path=path)
    resumed.fit(loader, epochs=epochs, eval_loader=eval_loader, resume_from=path)
    assert resumed.step == 15 and resumed.epoch == epochs
    for got, want in zip(parameters_of(resumed.student), expected):
        assert torch.equal(got, want)
    assert [entry["loss"] for entry in resumed.history["train"]] == \
        [entry["loss"] for entry in reference.history["train"]]
    assert resumed.history["eval"] == reference.history["eval"]
    assert resumed.scheduler.get_last_lr() == reference.scheduler.get_last_lr()


def test_resume_at_epoch_boundary_and_seeded_runs_repeat(tmp_path):
    reference, loader, _ = build(make_student(dropout=0.5))
    reference.fit(loader, epochs=2)
    again, loader, _ = build(make_student(dropout=0.5))
    again.fit(loader, epochs=2)
    for got, want in zip(parameters_of(again.student), parameters_of(reference.student)):
        assert torch.equal(got, want)

    path = tmp_path / "ckpt.pt"
    first, loader, _ = build(make_student(dropout=0.5), checkpoint_path=path)
    first.fit(loader, epochs=1)
    resumed, loader, _ = build(make_student(seed=5, dropout=0.5))
    resumed.fit(loader, epochs=2, resume_from=path)
    for got, want in zip(parameters_of(resumed.student), parameters_of(reference.student)):
        assert torch.equal(got, want)


def _sgd_run(batch_size, accumulation_steps, count, epochs=2):
    inputs, labels = make_data(count=count)
    student = make_student()
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=False)
    distiller = Distiller(student, make_teacher(), KDLoss(temperature=3.0, alpha=0.5),
                          torch.optim.SGD(student.parameters(), lr=0.5), accumulation_steps=accumulation_steps,
                          progress=False)
    distiller.fit(loader, epochs=epochs)
    return parameters_of(student), distiller.step


@pytest.mark.parametrize("count", [16, 12], ids=["full-groups", "short-last-group"])
def test_gradient_accumulation_equals_large_batch(count):
    # With 12 rows the last group of each epoch holds a single micro-batch of 4, which must be
    # averaged over itself (equal to a plain batch of 4), not over accumulation_steps.
    big, big_steps = _sgd_run(batch_size=8, accumulation_steps=1, count=count)
    small, small_steps = _sgd_run(batch_size=4, accumulation_steps=2, count=count)
    assert big_steps == small_steps
    moved = max((a - b).abs().max().item() for a, b in zip(big, parameters_of(make_student())))
    assert moved > 1e-2  # training did change the parameters
    for a, b in zip(big, small):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


class Scaled(nn.Module):
    """logits = scale * (W x): large `scale` gives a large gradient."""

    def __init__(self, scale):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(FEATURES, CLASSES)
        self.scale = scale

    def forward(self, inputs):
        return self.scale * self.linear(inputs)


@pytest.mark.parametrize("scale, clipped", [(50.0, True), (1e-3, False)])
def test_gradient_clipping_bounds_the_update(scale, clipped):
    inputs, labels = make_data(count=8)
    student = Scaled(scale)
    loss = KDLoss(temperature=1.0, alpha=1.0)
    teacher = make_teacher()
    # The unclipped gradient, computed directly.
    student.zero_grad()
    with torch.no_grad():
        teacher_logits = teacher(inputs)
    loss(student(inputs), teacher_logits, labels).backward()
    true_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in student.parameters())).item()
    student.zero_grad()

    max_norm = 0.25
    assert (true_norm > max_norm) == clipped
    before = parameters_of(student)
    distiller = Distiller(student, teacher, loss, torch.optim.SGD(student.parameters(), lr=1.0),
                          max_grad_norm=max_norm, progress=False)
    distiller.fit(DataLoader(TensorDataset(inputs, labels), batch_size=8), epochs=1)
    update = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(parameters_of(student), before))).item()
    assert distiller.history["train"][0]["grad_norm"] == pytest.approx(true_norm, rel=1e-5)
    assert update == pytest.approx(min(true_norm, max_norm), rel=1e-5)


class ReturnsInputs(nn.Module):
    """logits = inputs[:, permutation]; one dummy parameter so that optimizers accept it."""

    def __init__(self, permutation=None):
        super().__init__()
        self.permutation = permutation
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, inputs):
        return inputs if self.permutation is None else inputs[:, self.permutation]


def test_evaluation_metrics_on_a_known_case():
    student_logits = torch.tensor([
        [3.0, 1.0, 0.0],   # student argmax 0, teacher 0, label 0
        [0.0, 2.0, 1.0],   # student 1, teacher 2, label 1
        [1.0, 0.0, 4.0],   # student 2, teacher 1, label 2
        [0.5, 2.5, 0.0],   # student 1, teacher 2, label 0
        [2.0, 0.0, 1.5],   # student 0, teacher 0, label -100 (ignored)
        [0.0, 0.2, 0.1],   # student 1, teacher 2, label 2
        [1.0, 3.0, 2.0],   # student 1, teacher 2, label 1
    ])
    labels = torch.tensor([0, 1, 2, 0, -100, 2, 1])
    permutation = torch.tensor([0, 2, 1])  # the teacher swaps classes 1 and 2
    teacher_logits = student_logits[:, permutation]
    assert teacher_logits.argmax(-1).tolist() == [0, 2, 1, 2, 0, 2, 2]
    loss = KDLoss(temperature=2.0, alpha=0.4)
    distiller = Distiller(ReturnsInputs(), ReturnsInputs(permutation), loss, progress=False)
    loader = DataLoader(TensorDataset(student_logits, labels), batch_size=3)  # batches of 3, 3, 1

    metrics = distiller.evaluate(loader)
    valid = labels != -100
    assert metrics["rows"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)          # rows 0, 1, 2, 6
    assert metrics["teacher_accuracy"] == pytest.approx(2 / 6)  # rows 0, 5
    assert metrics["agreement"] == pytest.approx(1 / 6)         # row 0 (row 4 agrees but is ignored)
    assert metrics["loss"] == pytest.approx(loss(student_logits, teacher_logits, labels).item(), rel=1e-6)
    assert metrics["ce"] == pytest.approx(
        F.cross_entropy(student_logits[valid], labels[valid]).item(), rel=1e-6)
    assert distiller.student.training  # mode restored


def test_evaluation_without_labels_uses_every_row():
    student_logits, _ = make_data(count=9)
    permutation = torch.randperm(FEATURES, generator=torch.Generator().manual_seed(0))
    distiller = Distiller(ReturnsInputs(), ReturnsInputs(permutation), KDLoss(temperature=1.5), progress=False)
    metrics = distiller.evaluate(DataLoader(TensorDataset(student_logits), batch_size=4))
    teacher_logits = student_logits[:, permutation]
    expected_agreement = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()
    assert metrics["rows"] == 9 and "accuracy" not in metrics
    assert metrics["agreement"] == pytest.approx(expected_agreement)
    assert metrics["loss"] == pytest.approx(KDLoss(temperature=1.5)(student_logits, teacher_logits).item(), rel=1e-6)


def test_several_teachers_are_a_weighted_mean_of_logits_and_offline_logits_match():
    inputs, labels = make_data(count=16)
    teachers = [make_teacher(seed) for seed in (1, 2, 3)]
    weights = [1.0, 3.0, 0.0]
    distiller = Distiller(make_student(), teachers, teacher_weights=weights, progress=False)
    with torch.no_grad():
        expected = 0.25 * teachers[0](inputs) + 0.75 * teachers[1](inputs)
    torch.testing.assert_close(distiller.teacher_logits(inputs), expected)
    assert all(not p.requires_grad for t in teachers for p in t.parameters())
    assert all(not t.training for t in teachers)

    # Precomputed teacher logits in the batch train exactly like the live teachers.
    live_student, offline_student = make_student(), make_student()
    live = Distiller(live_student, teachers, teacher_weights=weights, progress=False,
                     optimizer=torch.optim.SGD(live_student.parameters(), lr=0.1))
    live.fit(DataLoader(TensorDataset(inputs, labels), batch_size=4), epochs=2)
    offline = Distiller(offline_student, None, progress=False,
                        optimizer=torch.optim.SGD(offline_student.parameters(), lr=0.1))
    offline.fit(DataLoader(TensorDataset(inputs, labels, expected), batch_size=4), epochs=2)
    for a, b in zip(parameters_of(live_student), parameters_of(offline_student)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bf16_autocast_and_mapping_batches_train():
    inputs, labels = make_data(count=16)

    class Keyword(nn.Module):
        """Takes `features=` and returns {"logits": ...}, like many model libraries."""

        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, features):
            return {"logits": self.body(features)}

    student = Keyword(make_student())
    distiller = Distiller(student, Keyword(make_teacher()), bf16=True, progress=False)
    batches = [{"features": inputs[i:i + 4], "labels": labels[i:i + 4]} for i in range(0, 16, 4)]
    before = parameters_of(student)
    history = distiller.fit(batches, epochs=1)
    assert len(history["train"]) == 4 and all(torch.isfinite(torch.tensor(e["loss"])) for e in history["train"])
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(parameters_of(student), before))


def test_callbacks_receive_steps_evals_and_epochs():
    events = []

    class Recorder:
        def on_step(self, distiller, metrics):
            events.append(("step", metrics["step"]))

        def on_eval(self, distiller, metrics):
            events.append(("eval", metrics["step"]))

        def on_epoch_end(self, distiller, metrics):
            events.append(("epoch", metrics["epoch"]))

    inputs, labels = make_data(count=8)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=4)
    distiller = Distiller(make_student(), make_teacher(), progress=False, callbacks=[Recorder()], eval_every=3)
    distiller.fit(loader, epochs=2, eval_loader=loader)
    assert events == [("step", 1), ("step", 2), ("eval", 2), ("epoch", 1), ("step", 3), ("eval", 3),
                      ("step", 4), ("eval", 4), ("epoch", 2)]


def test_atomic_checkpoint_is_old_or_new(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"version": "old", "payload": torch.arange(1000)}, path)
    real_save = torch.save
    seen_during_write = []

    def interrupted_save(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(handle.tell() // 2)  # half written ...
        seen_during_write.append(torch.load(path, weights_only=True)["version"])
        raise KeyboardInterrupt  # ... and interrupted

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"version": "new", "payload": torch.arange(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert seen_during_write == ["old"]
    assert torch.load(path, weights_only=True)["version"] == "old"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # no temporary file left behind

    atomic_save({"version": "new", "payload": torch.arange(1000)}, path)
    assert torch.load(path, weights_only=True)["version"] == "new"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_bad_arguments_raise_clear_errors(tmp_path):
    student, teacher = make_student(), make_teacher()
    with pytest.raises(ValueError, match="teacher_weights has 2 entries for 1 teacher"):
        Distiller(student, teacher, teacher_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="accumulation_steps"):
        Distiller(student, teacher, accumulation_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        Distiller(student, teacher, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpoint_path"):
        Distiller(student, teacher, checkpoint_every=5)
    with pytest.raises(TypeError, match="teachers\\[0\\]"):
        Distiller(student, ["not a module"])
    with pytest.raises(RuntimeError, match="ddp=True"):
        Distiller(student, teacher, ddp=True)
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)
    distiller = Distiller(student, None, progress=False)
    inputs, labels = make_data(count=4)
    with pytest.raises(RuntimeError, match="no teachers"):
        distiller.fit([(inputs, labels)])
    wrong = Distiller(make_student(), nn.Linear(FEATURES, CLASSES + 1), progress=False)
    with pytest.raises(ValueError, match=r"student logits \(4, 5\) and teacher logits \(4, 6\)"):
        wrong.fit([(inputs, labels)])
    with pytest.raises(FileNotFoundError):
        Distiller(make_student(), teacher, progress=False).load_checkpoint(tmp_path / "missing.pt")
    atomic_save({"something": "else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a kdfast Distiller checkpoint"):
        Distiller(make_student(), teacher, progress=False).load_checkpoint(tmp_path / "other.pt")


# --------------------------------------------------------------------------------------
# DDP: two gloo processes on CPU equal one process with the same global batch
# --------------------------------------------------------------------------------------


def _ddp_train(rank, world_size, out_dir):
    from torch.utils.data.distributed import DistributedSampler

    inputs, labels = make_data(count=32)
    dataset = TensorDataset(inputs, labels)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    student = make_student(seed=10 + rank)  # DDP broadcasts rank 0's initial weights
    distiller = Distiller(student, make_teacher(), KDLoss(temperature=2.0, alpha=0.5),
                          torch.optim.AdamW(student.parameters(), lr=1e-2), accumulation_steps=2,
                          progress=False, checkpoint_path=os.path.join(out_dir, "ddp.pt"))
    assert distiller.distributed
    distiller.fit(loader, epochs=2)
    eval_sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    metrics = distiller.evaluate(DataLoader(dataset, batch_size=5, sampler=eval_sampler))
    if rank == 0:
        torch.save({"parameters": parameters_of(student), "metrics": metrics, "step": distiller.step},
                   os.path.join(out_dir, "result.pt"))


def _ddp_worker(rank, world_size, rendezvous, out_dir):
    import datetime
    import gc

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        _ddp_train(rank, world_size, out_dir)
        gc.collect()  # drop the DDP wrapper (and its reference to the process group) first
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_processes_match_single_process(tmp_path, spawn_workers):
    spawn_workers(_ddp_worker, 2)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    checkpoint = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_boundary"]) == 2

    # One process, global batch 8 = the two ranks' batches of 4 (rank r holds rows r, r+2, ...),
    # accumulation 2 over batches of 8, i.e. the same 16 rows per optimizer step.
    inputs, labels = make_data(count=32)
    student = make_student(seed=10)
    single = Distiller(student, make_teacher(), KDLoss(temperature=2.0, alpha=0.5),
                       torch.optim.AdamW(student.parameters(), lr=1e-2), accumulation_steps=2, progress=False)
    single.fit(DataLoader(TensorDataset(inputs, labels), batch_size=8), epochs=2)
    assert result["step"] == single.step == 4
    for a, b in zip(result["parameters"], parameters_of(student)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    metrics = single.evaluate(DataLoader(TensorDataset(inputs, labels), batch_size=5))
    for key in ("loss", "accuracy", "teacher_accuracy", "agreement", "ce", "rows"):
        assert result["metrics"][key] == pytest.approx(metrics[key], rel=1e-5)
