"""The on-policy loss (`kdfast.onpolicy`) against TRL's GKD and float64 formulas.

- `completion_kd_loss` (the causal shift, then kdfast's kernels) equals TRL 1.16's
  `GKDTrainer.generalized_jsd_loss` on the shifted logits and labels (loaded from the
  installed source, skipped without TRL) and a float64 formula of the generalized JSD, value
  and student gradient, for β ∈ {0, 0.1, 0.5, 1}, temperatures and dtypes.
- `completion_batch` masks exactly what TRL's `generate_on_policy_outputs` masks (prompt,
  prompt padding, everything after the first EOS, with one EOS id, a list, or none), and
  those positions get exactly zero gradient, from logits and through the fused
  hidden-state path.
- The fused teacher scoring (`fused_model_kd_loss`, `OnPolicyDistiller(fused=True)`) equals
  the loss on materialised logits within float32 tolerance, gradients included.
- `gkd_divergence` / `divergence_options` map β as TRL does and refuse β outside [0, 1].
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

from kdfast.onpolicy import (
    OnPolicyDistiller,
    completion_batch,
    completion_kd_loss,
    divergence_options,
    fused_model_kd_loss,
    gkd_divergence,
)


def _trl_gkd_function(name):
    """A static method of TRL's GKDTrainer compiled alone from the installed source (None without TRL)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "experimental" / "gkd" / "gkd_trainer.py"
    if not path.exists():
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if node is None:
        return None
    node.decorator_list = []
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)  # noqa: S102
    return namespace[name]


TRL_LOSS = _trl_gkd_function("generalized_jsd_loss")
TRL_COMPLETIONS = _trl_gkd_function("generate_on_policy_outputs")


def _kl(log_a, log_b):
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def gjsd_formula(s, t, labels, beta, temperature):
    """float64 generalized JSD (TRL's definition), mean over positions whose shifted label is kept."""
    s, t, labels = s[:, :-1].double(), t[:, :-1].double(), labels[:, 1:]
    log_q = torch.log_softmax(s / temperature, -1)
    log_p = torch.log_softmax(t / temperature, -1)
    if beta == 0:
        rows = _kl(log_p, log_q)
    elif beta == 1:
        rows = _kl(log_q, log_p)
    else:
        b = torch.tensor(beta, dtype=torch.float64)
        log_m = torch.logaddexp(log_p + torch.log(b), log_q + torch.log1p(-b))
        rows = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    keep = labels != -100
    return rows[keep].sum() / keep.sum().clamp_min(1)


def generated_batch(seed=0, batch=3, prompt=4, completion=7, vocab=53, eos=2):
    """A completion_batch with left-padded prompts and an EOS inside two of the completions."""
    g = torch.Generator().manual_seed(seed)
    sequences = torch.randint(3, vocab, (batch, prompt + completion), generator=g)
    prompt_mask = torch.ones(batch, prompt, dtype=torch.long)
    prompt_mask[0, :2] = 0
    sequences[0, :2] = 0
    sequences[0, prompt + 3] = eos
    sequences[0, prompt + 4:] = 0
    sequences[1, prompt + 5] = eos
    sequences[1, prompt + 6:] = 0
    return completion_batch(sequences, prompt, prompt_mask, eos)


def grad_of(fn, x):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    (gradient,) = torch.autograd.grad(value, x)
    return value.detach(), gradient


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_completion_loss_equals_trl_and_float64(beta, temperature, dtype):
    data = generated_batch(seed=int(beta * 10) + int(temperature * 3))
    shape = (*data["labels"].shape, 53)
    g = torch.Generator().manual_seed(7)
    s = (2 * torch.randn(shape, generator=g)).to(dtype)
    t = (2 * torch.randn(shape, generator=g)).to(dtype)
    labels = data["labels"]
    loss, grad = grad_of(lambda x: completion_kd_loss(x, t, labels, beta=beta, temperature=temperature), s)
    ref, ref_grad = grad_of(lambda x: gjsd_formula(x, t, labels, beta, temperature), s.double())
    assert loss.dtype == torch.float32
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    assert abs(float(loss) - float(ref)) <= tol * abs(float(ref)) + 1e-7
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=tol * float(ref_grad.abs().max()))
    if TRL_LOSS is not None and dtype == torch.float32:
        peer, peer_grad = grad_of(lambda x: TRL_LOSS(x[:, :-1], t[:, :-1], labels[:, 1:], beta=beta,
                                                     temperature=temperature), s)
        assert abs(float(loss) - float(peer)) <= 2e-5 * abs(float(peer)) + 1e-7
        torch.testing.assert_close(grad, peer_grad, rtol=0, atol=2e-5 * float(peer_grad.abs().max()))


def test_trl_loss_is_loaded_when_trl_is_installed():
    if importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed")
    assert TRL_LOSS is not None and TRL_COMPLETIONS is not None


class FakeGenerator:
    """Stands in for a model in TRL's generate_on_policy_outputs: returns fixed sequences."""

    def __init__(self, sequences):
        self.sequences = sequences

    def generate(self, **kwargs):
        return type("Output", (), {"sequences": self.sequences})()


@pytest.mark.parametrize("eos", [None, 2, [2, 5]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_completion_mask_matches_trl_and_its_definition(eos, seed):
    g = torch.Generator().manual_seed(seed)
    batch, prompt, completion = 4, 5, 8
    sequences = torch.randint(0, 7, (batch, prompt + completion), generator=g)  # EOS ids occur often
    prompt_mask = (torch.rand(batch, prompt, generator=g) > 0.3).long()
    prompt_mask[:, -1] = 1
    ours = completion_batch(sequences, prompt, prompt_mask, eos)
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
    for row in range(batch):  # the definition, position by position
        stopped = False
        for column in range(prompt + completion):
            if column < prompt:
                assert ours["attention_mask"][row, column] == prompt_mask[row, column]
                assert ours["labels"][row, column] == -100
                continue
            assert ours["attention_mask"][row, column] == (0 if stopped else 1)
            assert ours["labels"][row, column] == (-100 if stopped else sequences[row, column])
            stopped = stopped or int(sequences[row, column]) in eos_ids
    if TRL_COMPLETIONS is not None:
        config = type("Config", (), {"eos_token_id": eos})()
        ids, mask, labels = TRL_COMPLETIONS(FakeGenerator(sequences), {"prompts": sequences[:, :prompt],
                                                                       "prompt_attention_mask": prompt_mask}, config)
        assert torch.equal(ids, ours["input_ids"])
        assert torch.equal(mask.long(), ours["attention_mask"]) and torch.equal(labels, ours["labels"])


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_masked_positions_get_exactly_zero_gradient_from_logits(beta):
    data = generated_batch()
    labels = data["labels"]
    g = torch.Generator().manual_seed(3)
    s = torch.randn(*labels.shape, 53, generator=g, requires_grad=True)
    t = torch.randn(*labels.shape, 53, generator=g)
    completion_kd_loss(s, t, labels, beta=beta, temperature=1.5).backward()
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != -100  # position i is scored on label i+1
    assert torch.all(s.grad[~scored] == 0)
    assert torch.all(s.grad[scored].abs().sum(-1) > 0)
    # the prompt (with its padding) and the tokens after an EOS are among the unscored positions
    assert not scored[0, :3].any() and not scored[0, 8:].any() and not scored[1, 10:].any()


class FixedBody(torch.nn.Module):
    """A "base model" whose hidden states are a parameter, so their gradient can be read."""

    def __init__(self, hidden):
        super().__init__()
        self.hidden = torch.nn.Parameter(hidden)

    def forward(self, input_ids, attention_mask=None):
        return self.hidden


class HeadLM(torch.nn.Module):
    """body + Linear lm_head, following the conventions `hidden_and_head` reads."""

    base_model_prefix = "body"

    def __init__(self, body, vocab, hidden, bias=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body, self.lm_head = body, torch.nn.Linear(hidden, vocab, bias=bias)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None):
        return self.lm_head(self.body(input_ids, attention_mask))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_scoring_equals_materialised_logits(beta, temperature, bias, device):
    data = {key: value.to(device) for key, value in generated_batch(seed=5).items()}
    g = torch.Generator().manual_seed(11)
    shape = data["labels"].shape
    student = HeadLM(FixedBody(torch.randn(*shape, 12, generator=g)), 53, 12, bias=bias, seed=1).to(device)
    teacher = HeadLM(FixedBody(torch.randn(*shape, 20, generator=g)), 53, 20, bias=bias, seed=2).to(device)
    results = []
    for fused in (True, False):
        distiller = OnPolicyDistiller(beta=beta, temperature=temperature, fused=fused)
        loss = distiller.loss(student, teacher, data)
        results.append((loss, torch.autograd.grad(loss, list(student.parameters()))))
    (fused_loss, fused_grads), (loss, grads) = results
    fused_loss, loss = fused_loss.detach(), loss.detach()
    assert abs(float(fused_loss) - float(loss)) <= 1e-5 * abs(float(loss)) + 1e-7
    for a, b in zip(fused_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
    ref = gjsd_formula(student(data["input_ids"]), teacher(data["input_ids"]), data["labels"], beta, temperature)
    assert abs(float(fused_loss) - float(ref.detach())) <= 2e-5 * abs(float(ref.detach()))
    # the hidden states of unscored positions get exactly zero gradient through the fused path
    (hidden_grad,) = torch.autograd.grad(distiller.loss(student, teacher, data), [student.body.hidden])
    scored = torch.zeros_like(data["labels"], dtype=torch.bool)
    scored[:, :-1] = data["labels"][:, 1:] != -100
    assert torch.all(hidden_grad[~scored] == 0) and torch.all(hidden_grad[scored].abs().sum(-1) > 0)


def test_fused_model_loss_takes_kd_options_and_no_scored_rows_give_zero():
    data = generated_batch(seed=2)
    shape = data["labels"].shape
    student = HeadLM(FixedBody(torch.randn(*shape, 8)), 53, 8, seed=3)
    teacher = HeadLM(FixedBody(torch.randn(*shape, 8)), 53, 8, seed=4)
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    loss, _ = fused_model_kd_loss(student, teacher, inputs, data["labels"], divergence="tvd", temperature=1.0)
    with torch.no_grad():
        s, t = student(data["input_ids"])[:, :-1], teacher(data["input_ids"])[:, :-1]
    keep = data["labels"][:, 1:] != -100
    tvd = 0.5 * (s.double().softmax(-1) - t.double().softmax(-1)).abs().sum(-1)[keep].mean()
    assert abs(float(loss.detach()) - float(tvd)) <= 2e-5 * float(tvd)
    empty = torch.full_like(data["labels"], -100)
    zero, _ = fused_model_kd_loss(student, teacher, inputs, empty)
    (gradient,) = torch.autograd.grad(zero, [student.body.hidden])
    assert float(zero.detach()) == 0.0 and not gradient.any()


def test_gkd_divergence_mapping_and_errors():
    assert gkd_divergence(0) == {"divergence": "forward_kl"}
    assert gkd_divergence(1) == {"divergence": "reverse_kl"}
    assert gkd_divergence(0.25) == {"divergence": "jsd", "beta": 0.25}
    assert divergence_options("generalized_jsd", 0.0) == ("forward_kl", 0.5)
    assert divergence_options("generalized_jsd", 0.9) == ("jsd", 0.9)
    assert divergence_options("tvd", 0.3) == ("tvd", 0.3)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            gkd_divergence(beta)
