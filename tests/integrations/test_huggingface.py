"""Tests for `kdfast.integrations.huggingface` with tiny randomly initialised Llama models:
the causal-LM loss against a plain-PyTorch formula and against the model's own loss, the
batch-level `distillation_loss` in a plain training loop (frozen teacher, student moving
towards it), the Trainer subclass (its checks; its training run skips when `accelerate`,
which `transformers.Trainer` requires, is absent), input errors, and the ImportError when
transformers is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdfast.contract.install import install_hint  # noqa: E402
from kdfast.integrations import huggingface as hf  # noqa: E402

VOCAB = 67


def tiny_llama(seed: int, hidden: int = 16, layers: int = 1, vocab: int = VOCAB):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def batch(seed: int, size: int = 3, length: int = 11):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (size, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding on the first row
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def eager_formula(student, teacher, labels, temperature, alpha):
    s, t, y = (student[:, :-1].reshape(-1, student.shape[-1]), teacher[:, :-1].reshape(-1, teacher.shape[-1]),
               labels[:, 1:].reshape(-1))
    valid = y != -100
    s, t, y = s[valid].double(), t[valid].double(), y[valid]
    log_q = torch.log_softmax(s / temperature, -1)
    log_p = torch.log_softmax(t / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = torch.nn.functional.cross_entropy(s, y, reduction="none")
    return (alpha * ce + (1 - alpha) * temperature**2 * kl).mean()


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (2.5, 0.0), (4.0, 0.3)])
def test_causal_lm_kd_loss_matches_formula(temperature, alpha):
    data = batch(0)
    student = torch.randn(3, 11, VOCAB, requires_grad=True)
    teacher = 2.0 * torch.randn(3, 11, VOCAB)
    loss = hf.causal_lm_kd_loss(student, teacher, data["labels"], temperature=temperature, alpha=alpha)
    expected = eager_formula(student, teacher, data["labels"], temperature, alpha)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    # the last position predicts nothing and padded positions carry no label: no gradient there
    assert torch.all(student.grad[:, -1] == 0)
    assert torch.all(student.grad[0, -4:] == 0)
    assert student.grad[1, :-1].abs().sum() > 0


def test_alpha_one_equals_the_models_own_loss():
    model = tiny_llama(0)
    data = batch(1)
    output = model(**data)
    ours = hf.causal_lm_kd_loss(output.logits, torch.zeros_like(output.logits), data["labels"], alpha=1.0)
    assert ours.item() == pytest.approx(output.loss.item(), rel=1e-5)


def test_vocab_size_cuts_padded_vocabularies():
    student = torch.randn(2, 5, VOCAB)
    teacher = torch.randn(2, 5, VOCAB + 5)
    labels = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="share a tokenizer"):
        hf.causal_lm_kd_loss(student, teacher, labels)
    cut = hf.causal_lm_kd_loss(student, teacher, labels, vocab_size=VOCAB)
    assert cut.item() == pytest.approx(hf.causal_lm_kd_loss(student, teacher[..., :VOCAB], labels).item())
    with pytest.raises(ValueError, match="vocab_size"):
        hf.causal_lm_kd_loss(student, teacher, labels, vocab_size=VOCAB + 1)


@pytest.mark.parametrize("student_shape, labels, error, match", [
    ((2, 5), torch.zeros(2, 5, dtype=torch.int64), ValueError, r"\[B, L, V\]"),
    ((2, 4, VOCAB), torch.zeros(2, 5, dtype=torch.int64), ValueError, "share"),
    ((2, 5, VOCAB), torch.zeros(2, 5, dtype=torch.int32), TypeError, "int64"),
    ((2, 5, VOCAB), torch.zeros(2, 4, dtype=torch.int64), ValueError, "labels"),
    ((2, 5, VOCAB), None, ValueError, "alpha"),
])
def test_causal_lm_kd_loss_errors(student_shape, labels, error, match):
    with pytest.raises(error, match=match):
        hf.causal_lm_kd_loss(torch.randn(*student_shape), torch.randn(2, 5, VOCAB), labels, alpha=0.5)


def test_labels_none_uses_every_position_with_alpha_zero():
    student, teacher = torch.randn(2, 6, VOCAB), torch.randn(2, 6, VOCAB)
    full = hf.causal_lm_kd_loss(student, teacher, None, alpha=0.0)
    all_labels = torch.zeros(2, 6, dtype=torch.int64)
    assert full.item() == pytest.approx(eager_formula(student, teacher, all_labels, 1.0, 0.0).item(), rel=1e-5)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, count: int, length: int = 12, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (count, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        ids = self.ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_distillation_loss_matches_formula_and_keeps_batch():
    teacher = tiny_llama(1, hidden=32, layers=2)
    student = tiny_llama(2)
    data = batch(3)
    model_inputs = {k: v for k, v in data.items() if k != "labels"}
    with torch.no_grad():
        expected = eager_formula(student(**model_inputs).logits, teacher(**model_inputs).logits, data["labels"],
                                 2.0, 0.3)
    loss, outputs = hf.distillation_loss(student, teacher, data, temperature=2.0, alpha=0.3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert outputs.logits.shape == (3, 11, VOCAB)
    assert "labels" in data  # the caller's batch is not modified
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    with pytest.raises(ValueError, match="labels"):
        hf.distillation_loss(student, teacher, model_inputs)
    with pytest.raises(TypeError, match="mapping"):
        hf.distillation_loss(student, teacher, [data["input_ids"]])


def test_training_loop_moves_student_towards_teacher():
    torch.set_num_threads(1)
    teacher = tiny_llama(1, hidden=32, layers=2)
    student = tiny_llama(2)
    teacher_before = {name: value.clone() for name, value in teacher.state_dict().items()}
    data = TokenDataset(32)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    fixed = {key: value[:8] for key, value in {"input_ids": data.ids, "attention_mask": torch.ones_like(data.ids),
                                               "labels": data.ids}.items()}
    with torch.no_grad():
        before = hf.distillation_loss(student, teacher, fixed, temperature=2.0, alpha=0.0)[0].item()
    for step in range(25):
        rows = slice(8 * (step % 4), 8 * (step % 4) + 8)
        ids = data.ids[rows]
        loss, _ = hf.distillation_loss(student, teacher, {"input_ids": ids, "labels": ids}, temperature=2.0, alpha=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = hf.distillation_loss(student, teacher, fixed, temperature=2.0, alpha=0.0)[0].item()
    assert after < 0.7 * before
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name


def test_trainer_class_and_argument_checks():
    trainer_class = hf.DistillationTrainer
    assert issubclass(trainer_class, transformers.Trainer)
    assert hf.DistillationTrainer is trainer_class
    student = tiny_llama(0)
    # these checks run before transformers.Trainer.__init__, so they need no accelerate
    with pytest.raises(TypeError, match="teacher_model"):
        trainer_class(model=student, teacher_model="not a model")
    with pytest.raises(ValueError, match="different module"):
        trainer_class(model=student, teacher_model=student)
    with pytest.raises(ValueError, match="alpha"):
        trainer_class(model=student, teacher_model=tiny_llama(1), alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        trainer_class(model=student, teacher_model=tiny_llama(1), temperature=0.0)
    with pytest.raises(AttributeError):
        hf.NoSuchName


def make_trainer(tmp_path, student, teacher, steps, **kd):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0)
    return hf.DistillationTrainer(model=student, args=args, train_dataset=TokenDataset(32), teacher_model=teacher, **kd)


def test_trainer_compute_loss_and_training(tmp_path):
    torch.set_num_threads(1)
    teacher = tiny_llama(1, hidden=32, layers=2)
    student = tiny_llama(2)
    teacher_before = {name: value.clone() for name, value in teacher.state_dict().items()}
    trainer = make_trainer(tmp_path, student, teacher, steps=25, temperature=2.0, alpha=0.0)
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    data = batch(3)
    with torch.no_grad():
        expected, _ = hf.distillation_loss(student, teacher, data, temperature=2.0, alpha=0.0)
        loss, outputs = trainer.compute_loss(student, data, return_outputs=True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert outputs.logits.shape == (3, 11, VOCAB)

    train_batch = {key: value[:8] for key, value in {"input_ids": trainer.train_dataset.ids,
                                                     "labels": trainer.train_dataset.ids}.items()}
    with torch.no_grad():
        before = trainer.compute_loss(student, train_batch).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(student, train_batch).item()
    assert after < 0.7 * before
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name


def test_missing_transformers_raises_a_clear_import_error():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from kdfast.integrations import huggingface as hf\n"
        "import torch\n"
        "hf.causal_lm_kd_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, 5), None, alpha=0.0)\n"
        "try:\n    hf.DistillationTrainer\nexcept ImportError as error:\n    print('IMPORT-ERROR', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "IMPORT-ERROR" in result.stdout and install_hint("hf", ["transformers", "accelerate"]) in result.stdout


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_fused_distillation_loss_equals_the_materialised_one(alpha):
    teacher = tiny_llama(4, hidden=24, layers=2)
    student = tiny_llama(5)
    data = batch(6)
    loss, _ = hf.distillation_loss(student, teacher, data, temperature=2.0, alpha=alpha, divergence="jsd")
    grads = torch.autograd.grad(loss, list(student.parameters()))
    fused, outputs = hf.distillation_loss(student, teacher, data, temperature=2.0, alpha=alpha, divergence="jsd",
                                          fused=True)
    assert not hasattr(outputs, "logits") or outputs.logits is None
    fused_grads = torch.autograd.grad(fused, list(student.parameters()))
    assert fused.item() == pytest.approx(loss.item(), rel=1e-5)
    for a, b in zip(fused_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, scale", [("logit_scale", 0.0625), ("logits_scaling", 2.0)])
def test_fused_refuses_models_that_scale_their_logits(name, scale):
    student, teacher = tiny_llama(5), tiny_llama(4)
    setattr(student.config, name, scale)
    with pytest.raises(ValueError, match=f"config.{name}"):
        hf.distillation_loss(student, teacher, batch(6), fused=True)
    setattr(student.config, name, 1.0)  # a scale of one changes nothing and is accepted
    loss, _ = hf.distillation_loss(student, teacher, batch(6), fused=True)
    assert torch.isfinite(loss)
