"""The Hugging Face recipe of docs/huggingface.md (and the short form in README.md), run as
written: the page's Python blocks are executed verbatim and in order in one namespace, with
only `AutoTokenizer.from_pretrained` and `AutoModelForCausalLM.from_pretrained` redirected
to a word-level tokenizer built here and tiny randomly initialised Llama models (no
download), on a `train.txt` the test writes. Each `DistillationTrainer` must run all its
steps with a finite loss, the hand-written loop must print finite losses, the student must
change, the teacher must not, and `save_model` must write the student."""

from __future__ import annotations

import math
import random
import re
import zlib
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the a student teacher model learns from its soft labels and hard ones while every token counts "
         "slowly quickly small large").split()
LINES = 96  # twelve batches of 8 per epoch; about 770 tokens, three windows of 256 for the store


def python_blocks(path: Path):
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)


def local_tokenizer():
    specials = ["[UNK]", "<s>", "</s>"]
    vocab = {token: index for index, token in enumerate(specials + sorted(set(WORDS)))}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", bos_token="<s>",
                                                eos_token="</s>")


@pytest.fixture
def recipe_env(tmp_path, monkeypatch):
    """Working directory with train.txt; from_pretrained redirected; returns {(name, order): (model, initial state)}."""
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    rng = random.Random(0)
    (tmp_path / "train.txt").write_text(
        "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(LINES)) + "\n",
        encoding="utf-8")
    tokenizer = local_tokenizer()
    loaded = {}

    def load_model(name, *args, **kwargs):
        torch.manual_seed(zlib.crc32(name.encode()))  # a different random model per name
        config = transformers.LlamaConfig(
            vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
        model = transformers.LlamaForCausalLM(config)
        loaded[(name, len(loaded))] = (model, {key: value.clone() for key, value in model.state_dict().items()})
        return model

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: tokenizer))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(load_model))
    return loaded


def check_trainer_ran(trainer, seen):
    assert trainer not in seen  # each trainer block builds a new trainer
    seen.append(trainer)
    assert trainer.state.global_step == math.ceil(LINES / 8)
    (summary,) = [entry for entry in trainer.state.log_history if "train_loss" in entry]
    assert math.isfinite(summary["train_loss"]) and summary["train_loss"] > 0


def test_the_recipe_runs_as_written(recipe_env, capsys):
    blocks = python_blocks(ROOT / "docs" / "huggingface.md")
    readme = [block for block in python_blocks(ROOT / "README.md") if "DistillationTrainer(" in block]
    assert len(blocks) >= 3 and len(readme) == 1
    namespace, trainers = {"__name__": "recipe"}, []
    for number, block in enumerate(blocks + readme):
        exec(compile(block, f"docs/huggingface.md block {number + 1}", "exec"), namespace)
        if "trainer.train()" in block:
            check_trainer_ran(namespace["trainer"], trainers)
    assert {trainer.kd_options["fused"] for trainer in trainers} == {False, True}  # the plain and the fused form

    printed = re.findall(r"^step (\d+): loss (\S+)$", capsys.readouterr().out, re.M)
    assert printed and all(math.isfinite(float(loss)) for _, loss in printed)
    assert math.isfinite(namespace["loss"].item()) and namespace["loss"].requires_grad
    # the offline block: a store of the teacher's top-64 that the student trained from, window by window
    assert namespace["dataset"].store.k == 64 and namespace["dataset"].store.vocab_size == 96
    assert namespace["step"] + 1 == len(namespace["loader"]) >= 1

    student, student_start = _loaded(recipe_env, namespace["student"])
    teacher, teacher_start = _loaded(recipe_env, namespace["teacher"])
    assert any(not torch.equal(value, student_start[key]) for key, value in student.state_dict().items())
    for key, value in teacher.state_dict().items():  # unchanged, up to the recipe's cast to bfloat16
        assert torch.equal(value, teacher_start[key].to(value.dtype)), key
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    saved = transformers.LlamaForCausalLM.from_pretrained(namespace["args"].output_dir)
    assert saved.config.vocab_size == student.config.vocab_size


def _loaded(loaded, model):
    """(model, its state when from_pretrained returned it) for a model the recipe loaded."""
    (entry,) = [entry for entry in loaded.values() if entry[0] is model]
    return entry
