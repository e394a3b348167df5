"""`DistillationTrainer`'s on-policy options on tiny Llama models (CPU).

- lmbda = 1: every training step replaces the batch by the student's completions of its
  prompts (student `generate` calls counted), the loss is GKD's generalized JSD (divergence
  "generalized_jsd", α = 0, no T²) and equals the float64 formula on the generated batch,
  and training runs with `fused=True` and `fused=False`; lmbda = 0 never generates; `seq_kd`
  makes the teacher generate.
- The on-policy generator's state is saved beside the Trainer's RNG state in a checkpoint and
  restored from it.
- Argument checks run before `transformers.Trainer` is built.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdfast.integrations import huggingface as hf  # noqa: E402
from kdfast.onpolicy import completion_kd_loss  # noqa: E402

VOCAB = 59
PROMPT, LENGTH = 4, 10


def tiny_llama(seed, hidden=16):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


class PromptDataset(torch.utils.data.Dataset):
    """Windows with a prompt (first PROMPT tokens) and a reference completion."""

    def __init__(self, count=16, seed=0):
        self.ids = torch.randint(3, VOCAB, (count, LENGTH), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        ids = self.ids[index]
        labels = ids.clone()
        labels[:PROMPT] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                "prompts": ids[:PROMPT], "prompt_attention_mask": torch.ones(PROMPT, dtype=torch.long)}


def make_trainer(tmp_path, student, teacher, steps, **options):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)
    return hf.DistillationTrainer(model=student, args=args, train_dataset=PromptDataset(), teacher_model=teacher,
                                  **options)


def counted(model, calls):
    original = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return original(*args, **kwargs)

    model.generate = generate


GKD = dict(divergence="generalized_jsd", alpha=0.0, t2_scale=False, max_new_tokens=5, generation_temperature=0.9)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_on_policy_training_generates_every_step_and_scores_the_completions(tmp_path, fused, beta):
    torch.set_num_threads(1)
    student, teacher = tiny_llama(1), tiny_llama(2, hidden=32)
    trainer = make_trainer(tmp_path, student, teacher, steps=3, lmbda=1.0, beta=beta, fused=fused, **GKD)
    student_calls, teacher_calls = [], []
    counted(student, student_calls)
    counted(teacher, teacher_calls)
    losses = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(model, inputs, return_outputs, num_items_in_batch)
        with torch.no_grad():  # the float64 formula of TRL's loss on the batch the trainer scored
            s = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            t = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        expected = completion_kd_loss(s.double(), t.double(), inputs["labels"], beta=beta)
        losses.append((float(loss.detach()), float(expected), inputs["labels"]))
        return loss

    trainer.compute_loss = compute_loss
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    assert len(student_calls) == 3 and not teacher_calls
    assert all(shape == (4, PROMPT) for shape in student_calls) and len(losses) == 3
    for loss, expected, labels in losses:
        assert abs(loss - expected) <= 1e-5 * abs(expected) + 1e-7
        assert (labels[:, :PROMPT] == -100).all() and labels.shape[1] <= PROMPT + 5
    assert trainer.on_policy.counts == {"student": 3, "teacher": 0, "data": 0}
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


@pytest.mark.parametrize("lmbda, seq_kd, expected", [(0.0, False, (0, 0)), (0.0, True, (0, 2)), (None, True, (0, 2))])
def test_lmbda_zero_and_sequence_level_kd(tmp_path, lmbda, seq_kd, expected):
    torch.set_num_threads(1)
    student, teacher = tiny_llama(3), tiny_llama(4, hidden=32)
    trainer = make_trainer(tmp_path, student, teacher, steps=2, lmbda=lmbda, seq_kd=seq_kd, **GKD)
    student_calls, teacher_calls = [], []
    counted(student, student_calls)
    counted(teacher, teacher_calls)
    trainer.train()
    assert (len(student_calls), len(teacher_calls)) == expected


def test_without_on_policy_options_no_helper_and_prompts_are_not_model_inputs(tmp_path):
    trainer = make_trainer(tmp_path, tiny_llama(5), tiny_llama(6), steps=1)
    assert trainer.on_policy is None
    batch = torch.utils.data.default_collate([trainer.train_dataset[i] for i in range(3)])
    loss = trainer.compute_loss(trainer.model, batch)  # `prompts` is dropped before the models run
    assert torch.isfinite(loss)


def test_on_policy_state_is_saved_and_restored_with_the_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, tiny_llama(7), tiny_llama(8), steps=1, lmbda=0.5, on_policy_seed=11)
    for _ in range(3):
        trainer.on_policy.draw_source()
    saved = trainer.on_policy.state_dict()
    trainer._save_rng_state(str(tmp_path))
    assert (tmp_path / hf.ON_POLICY_STATE).exists()
    ahead = [trainer.on_policy.draw_source() for _ in range(10)]
    fresh = make_trainer(tmp_path, tiny_llama(7), tiny_llama(8), steps=1, lmbda=0.5, on_policy_seed=99)
    fresh._load_rng_state(str(tmp_path))
    assert torch.equal(fresh.on_policy.state_dict()["generator"], saved["generator"])
    assert [fresh.on_policy.draw_source() for _ in range(10)] == ahead


def test_on_policy_argument_checks():
    student = tiny_llama(0)
    trainer_class = hf.DistillationTrainer
    with pytest.raises(ValueError, match="lmbda"):
        trainer_class(model=student, teacher_model=tiny_llama(1), lmbda=1.5)
    with pytest.raises(ValueError, match="beta"):
        trainer_class(model=student, teacher_model=tiny_llama(1), divergence="generalized_jsd", beta=2.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        trainer_class(model=student, teacher_model=tiny_llama(1), lmbda=0.5, max_new_tokens=0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("fused", [False, True])
def test_generalized_jsd_and_t2_scale_in_the_batch_loss(beta, temperature, fused):
    student, teacher = tiny_llama(9), tiny_llama(10, hidden=32)
    batch = PromptDataset(count=3, seed=4)
    data = torch.utils.data.default_collate([batch[i] for i in range(3)])
    options = dict(divergence="generalized_jsd", beta=beta, temperature=temperature, alpha=0.0, fused=fused)
    loss, _ = hf.distillation_loss(student, teacher, data, t2_scale=False, **options)
    scaled, _ = hf.distillation_loss(student, teacher, data, **options)  # t2_scale=True by default
    with torch.no_grad():
        s = student(input_ids=data["input_ids"]).logits.double()
        t = teacher(input_ids=data["input_ids"]).logits.double()
    expected = completion_kd_loss(s, t, data["labels"], beta=beta, temperature=temperature)
    assert abs(float(loss.detach()) - float(expected)) <= 2e-5 * float(expected)
    assert abs(float(scaled.detach()) - temperature ** 2 * float(expected)) <= 2e-5 * temperature ** 2 * float(expected)
