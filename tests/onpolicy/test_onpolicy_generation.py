"""Sampling and batch selection of `kdfast.onpolicy`: who generates, reproducibly.

- `OnPolicyDistiller`: lmbda = 0 never calls the student's `generate`, lmbda = 1 always does
  (calls counted), `seq_kd` makes the teacher generate otherwise, an intermediate lmbda
  generates as often as a binomial draw allows; the same seed gives identical tokens and
  losses whatever the global random state (which generation leaves untouched), another seed
  other tokens; `state_dict` / `load_state_dict` resume the same sequence.
- The built-in sampler (`sample`, plain modules): greedy = top-k 1 = the argmax chain, top-k
  samples only among the k largest logits, `filter_logits`' top-p keeps exactly the smallest
  set reaching p (checked by brute force in float64), an EOS stops a row (pad after it).
- Hugging Face `generate` and the built-in sampler pick the same greedy tokens for a Llama.
"""

from __future__ import annotations

import pytest
import torch

from kdfast.onpolicy import GenerationSettings, OnPolicyDistiller, filter_logits, generate, sample

transformers = pytest.importorskip("transformers")

VOCAB = 41


def tiny_llama(seed, hidden=16):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


class Body(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, hidden)

    def forward(self, input_ids, attention_mask=None):
        return torch.tanh(self.embed(input_ids).cumsum(1))  # each position sees its prefix


class CountingLM(torch.nn.Module):
    """A plain LM (embedding → lm_head, no `generate`), counting its forward calls."""

    base_model_prefix = "body"

    def __init__(self, seed, hidden=8):
        super().__init__()
        torch.manual_seed(seed)
        self.body = Body(hidden)
        self.lm_head = torch.nn.Linear(hidden, VOCAB, bias=False)
        torch.nn.init.normal_(self.lm_head.weight, std=1.0)
        self.calls = 0

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return self.lm_head(self.body(input_ids))


def count_generate(model):
    calls = []
    original = model.generate

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.generate = counted
    return calls


def prompt_batch(seed=0, size=3, prompt=4, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (size, length), generator=g)
    return {"prompts": ids[:, :prompt], "prompt_attention_mask": torch.ones(size, prompt, dtype=torch.long),
            "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.cat([torch.full((size, prompt), -100), ids[:, prompt:]], 1)}


SETTINGS = GenerationSettings(max_new_tokens=5, temperature=1.0, eos_token_id=2, pad_token_id=0)


@pytest.mark.parametrize("lmbda, seq_kd, student_calls, teacher_calls", [
    (0.0, False, 0, 0), (1.0, False, 20, 0), (0.0, True, 0, 20), (1.0, True, 20, 0)])
def test_lmbda_zero_never_generates_and_one_always(lmbda, seq_kd, student_calls, teacher_calls):
    student, teacher = tiny_llama(1), tiny_llama(2, hidden=24)
    student_counter, teacher_counter = count_generate(student), count_generate(teacher)
    distiller = OnPolicyDistiller(lmbda=lmbda, seq_kd=seq_kd, generation=SETTINGS, seed=3)
    for step in range(20):
        batch, source = distiller.prepare(student, teacher, prompt_batch(step))
        if source == "data":
            assert torch.equal(batch["input_ids"], prompt_batch(step)["input_ids"])
        else:
            assert torch.equal(batch["input_ids"][:, :4], prompt_batch(step)["prompts"])
            assert (batch["labels"][:, :4] == -100).all()
    assert (len(student_counter), len(teacher_counter)) == (student_calls, teacher_calls)
    assert distiller.counts["student"] == student_calls and distiller.counts["teacher"] == teacher_calls


@pytest.mark.parametrize("lmbda", [0.2, 0.5, 0.8])
def test_intermediate_lmbda_generates_at_its_rate(lmbda):
    draws = 2000
    for seed in (0, 1):
        distiller = OnPolicyDistiller(lmbda=lmbda, seed=seed)
        student = sum(distiller.draw_source() == "student" for _ in range(draws))
        sigma = (draws * lmbda * (1 - lmbda)) ** 0.5
        assert abs(student - draws * lmbda) < 5 * sigma  # far outside: the rule or the draw is wrong


def to_device(batch, device):
    return {key: value.to(device) for key, value in batch.items()}


def global_rng_states(device):
    states = [torch.random.get_rng_state()]
    return states + ([torch.cuda.get_rng_state(torch.device(device))] if device != "cpu" else [])


@pytest.mark.parametrize("model_kind", ["hf", "plain"])
@pytest.mark.parametrize("fused", [True, False])
def test_same_seed_same_tokens_and_losses(model_kind, fused, device):
    teacher = (tiny_llama(2, hidden=24) if model_kind == "hf" else CountingLM(2)).to(device)

    def run(seed, global_state):
        torch.manual_seed(global_state)
        student = (tiny_llama(1) if model_kind == "hf" else CountingLM(1)).to(device)
        distiller = OnPolicyDistiller(lmbda=0.6, beta=0.3, generation=SETTINGS, fused=fused, seed=seed)
        out = []
        for step in range(6):
            before = global_rng_states(device)
            loss, batch, source = distiller.step(student, teacher, to_device(prompt_batch(step), device))
            after = global_rng_states(device)  # the global generators are untouched
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            assert batch["input_ids"].device.type == device and torch.isfinite(loss)
            out.append((source, batch["input_ids"].cpu(), float(loss.detach())))
        return out

    first, second, other = run(5, 0), run(5, 123), run(6, 0)
    assert [s for s, _, _ in first] == [s for s, _, _ in second]
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(first, second))
    assert [loss for *_, loss in first] == [loss for *_, loss in second]
    generated = [(a, b) for (s, a, _), (t, b, _) in zip(first, other) if s == t == "student"]
    assert {s for s, _, _ in first} == {"student", "data"}
    assert any(not torch.equal(a, b) for a, b in generated) or [s for s, *_ in first] != [s for s, *_ in other]


def test_state_dict_resumes_the_same_sequence(tmp_path):
    student, teacher = CountingLM(1), CountingLM(2)
    distiller = OnPolicyDistiller(lmbda=0.5, seq_kd=True, generation=SETTINGS, seed=9)
    for step in range(3):
        distiller.prepare(student, teacher, prompt_batch(step))
    torch.save(distiller.state_dict(), tmp_path / "state.pt")
    ahead = [distiller.prepare(student, teacher, prompt_batch(step)) for step in range(3, 8)]
    resumed = OnPolicyDistiller(lmbda=0.5, seq_kd=True, generation=SETTINGS, seed=0)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    again = [resumed.prepare(student, teacher, prompt_batch(step)) for step in range(3, 8)]
    assert [s for _, s in ahead] == [s for _, s in again]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for (a, _), (b, _) in zip(ahead, again))
    assert resumed.counts == distiller.counts and sum(distiller.counts.values()) == 8


def test_greedy_equals_top_k_one_equals_the_argmax_chain():
    model = CountingLM(4)
    prompts = torch.randint(3, VOCAB, (4, 3), generator=torch.Generator().manual_seed(0))
    greedy = sample(model, prompts, None, GenerationSettings(max_new_tokens=6, temperature=0), torch.Generator())
    top1 = sample(model, prompts, None, GenerationSettings(max_new_tokens=6, top_k=1), torch.Generator())
    ids = prompts
    for _ in range(6):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, ids) and torch.equal(top1, ids)


def test_top_k_samples_only_the_k_largest_and_eos_stops_a_row():
    model = CountingLM(5)
    prompts = torch.randint(3, VOCAB, (64, 2), generator=torch.Generator().manual_seed(1))
    out = sample(model, prompts, None, GenerationSettings(max_new_tokens=1, top_k=3, temperature=2.0),
                 torch.Generator().manual_seed(0))
    allowed = model(prompts)[:, -1].topk(3, -1).indices
    assert (out[:, -1:] == allowed).any(-1).all()
    settings = GenerationSettings(max_new_tokens=12, temperature=3.0, eos_token_id=[2, 5], pad_token_id=0)
    out = sample(model, prompts, None, settings, torch.Generator().manual_seed(2))
    for row in out[:, 2:]:
        stops = [i for i, token in enumerate(row.tolist()) if token in (2, 5)]
        if stops:
            assert (row[stops[0] + 1:] == 0).all()
    assert out.shape[1] <= 14


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
    g = torch.Generator().manual_seed(int(top_p * 100))
    logits = 3 * torch.randn(6, 30, generator=g)
    kept = torch.isfinite(filter_logits(logits, 1.0, top_p=top_p))
    probs = logits.double().softmax(-1)
    for row in range(6):
        order = probs[row].argsort(descending=True).tolist()
        total, expected = 0.0, set()
        for index in order:  # take tokens, most likely first, until their mass reaches p
            expected.add(index)
            total += float(probs[row, index])
            if total >= top_p:
                break
        assert set(kept[row].nonzero().flatten().tolist()) == expected


def test_hugging_face_generate_and_the_builtin_sampler_agree_greedily(device):
    model = tiny_llama(7).to(device)
    prompts = torch.randint(3, VOCAB, (3, 4), generator=torch.Generator().manual_seed(3)).to(device)
    settings = GenerationSettings(max_new_tokens=6, temperature=0)  # no EOS: every row runs 6 tokens
    through_hf = generate(model, prompts, torch.ones_like(prompts), settings, seed=0)
    builtin = sample(model, prompts, torch.ones_like(prompts), settings, torch.Generator())
    assert through_hf.shape == (3, 10) and torch.equal(through_hf, builtin)
    assert model.training  # generate restores the train mode it found


def test_settings_and_distiller_errors():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1)):
        with pytest.raises(ValueError):
            GenerationSettings(**bad)
    for bad in (dict(lmbda=1.5), dict(beta=-0.5), dict(temperature=0.0), dict(alpha=2.0)):
        with pytest.raises(ValueError):
            OnPolicyDistiller(**bad)
    with pytest.raises(TypeError, match="GenerationSettings"):
        OnPolicyDistiller(generation={"max_new_tokens": 3})
    distiller = OnPolicyDistiller(lmbda=1.0)
    with pytest.raises(KeyError, match="prompts"):
        distiller.prepare(CountingLM(0), CountingLM(1), {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(KeyError, match="input_ids"):
        OnPolicyDistiller(lmbda=0.0).prepare(CountingLM(0), CountingLM(1), {"prompts": torch.zeros(1, 3)})
