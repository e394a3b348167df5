"""Sampling completions for on-policy distillation, reproducibly, and turning them into a batch.

- `GenerationSettings`: max_new_tokens, temperature (0 = greedy), top_p, top_k (0 = off),
  eos_token_id (one id, a list, or None) and pad_token_id.
- `generate(model, prompts, prompt_attention_mask, settings, seed)`: `[B, P + C]` sequences
  (the prompts followed by C ≤ max_new_tokens sampled tokens). A model with a `generate`
  method (a Hugging Face `GenerationMixin`) samples with it, the global torch generator forked
  and seeded with `seed` for the call, so the caller's random state is untouched; any other
  `nn.Module` returning logits `[B, L, V]` is sampled by `sample`, a loop without a KV cache
  that draws from a `torch.Generator` seeded with `seed`. Either way the same seed gives the
  same tokens. Sampling follows the usual order: logits / temperature, top-k, then top-p
  (the smallest set of tokens whose probability reaches top_p), then a multinomial draw.
- `settings_for(model, settings)`: fills an unset EOS / pad id from the model's
  `generation_config`, as Hugging Face's `generate` would use it anyway.
- `completion_batch(sequences, prompt_length, prompt_attention_mask, eos_token_id)`: the
  batch a loss is computed on, `input_ids`, `attention_mask`, `labels`, with TRL's masking
  (`GKDTrainer.generate_on_policy_outputs`): the attention mask is the prompt's mask followed
  by 1 up to and including the first EOS of each completion and 0 after it; labels are the
  tokens, `ignore_index` on the prompt and wherever the attention mask is 0. So the prompt,
  its padding and everything after the first EOS carry no loss and no gradient; the EOS
  itself is learnt.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from kdfast.onpolicy.models import model_logits

__all__ = ["GenerationSettings", "completion_batch", "filter_logits", "generate", "sample", "settings_for"]

TokenIds = Union[int, Sequence[int], None]


def _id_list(ids: TokenIds) -> list:
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are sampled.

    Attributes:
        max_new_tokens: most tokens generated per prompt (≥ 1, default 128).
        temperature: sampling temperature > 0, or 0 for greedy decoding (default 1.0).
        top_p: nucleus sampling threshold in (0, 1] (default 1.0: off).
        top_k: keep the k most likely tokens, 0 = off (default 0).
        eos_token_id: the end-of-sequence id or ids; None: completions run to max_new_tokens.
        pad_token_id: the id written after a finished completion (default: the first EOS id, else 0).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_id: TokenIds = None
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not float(self.temperature) >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < float(self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")

    @property
    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return int(self.pad_token_id)
        eos = _id_list(self.eos_token_id)
        return eos[0] if eos else 0


def settings_for(model: torch.nn.Module, settings: GenerationSettings) -> GenerationSettings:
    """`settings` with an unset EOS / pad id taken from `model.generation_config` (when it has one).

    A Hugging Face model's `generate` stops at its configured EOS even when none is passed, so
    the completion mask must know that id too (TRL reads it from the same place).
    """
    config = getattr(model, "generation_config", None)
    eos = settings.eos_token_id if settings.eos_token_id is not None else getattr(config, "eos_token_id", None)
    pad = settings.pad_token_id if settings.pad_token_id is not None else getattr(config, "pad_token_id", None)
    return dataclasses.replace(settings, eos_token_id=eos, pad_token_id=pad)


def filter_logits(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """float32 logits `[B, V]` divided by `temperature` with the tokens top-k / top-p drop set to −inf."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop = before >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: Tensor, prompt_attention_mask: Optional[Tensor],
           settings: GenerationSettings, generator: torch.Generator) -> Tensor:
    """Sample completions from any module returning logits `[B, L, V]`, one full forward per token.

    Args:
        model: called as `model(ids)` (plus `attention_mask=` when its forward accepts it).
        prompts: `[B, P]` int64 token ids (left-padded when prompts differ in length).
        prompt_attention_mask: `[B, P]` 1 = token, 0 = padding, or None (all tokens).
        settings: the sampling settings.
        generator: the torch.Generator the draws use (on the logits' device).

    Returns:
        int64 `[B, P + C]`, C ≤ max_new_tokens (the loop stops once every row has sampled an EOS);
        tokens after a row's EOS are `settings.pad_id`.
    """
    ids = prompts
    mask = torch.ones_like(prompts) if prompt_attention_mask is None else prompt_attention_mask.to(prompts.dtype)
    pass_mask = _accepts(model, "attention_mask")
    eos = torch.tensor(_id_list(settings.eos_token_id), dtype=ids.dtype, device=ids.device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(settings.max_new_tokens):
        output = model(ids, attention_mask=mask) if pass_mask else model(ids)
        last = model_logits(output)[:, -1, :]
        if settings.temperature == 0:
            token = last.argmax(-1)
        else:
            probs = filter_logits(last, settings.temperature, settings.top_k, settings.top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(finished, torch.full_like(token, settings.pad_id), token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, (~finished).to(mask.dtype)[:, None]], dim=1)
        if eos.numel():
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                break
    return ids


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Tensor, prompt_attention_mask: Optional[Tensor],
             settings: GenerationSettings, seed: int) -> Tensor:
    """`[B, P + C]` int64 sequences sampled from `model` after `prompts`; the same seed gives the same tokens.

    Uses `model.generate` (Hugging Face) when the model has one, with the global torch
    generator forked and seeded for the call; otherwise `sample` with a generator seeded by
    `seed`. The model is put in eval mode for the call and its mode restored after. Pass
    `settings_for(model, settings)` to stop at the model's own EOS.
    """
    was_training = model.training
    model.eval()
    try:
        if callable(getattr(model, "generate", None)):
            options = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.temperature > 0,
                           pad_token_id=settings.pad_id, return_dict_in_generate=False)
            if settings.temperature > 0:
                options.update(temperature=float(settings.temperature), top_k=settings.top_k,
                               top_p=float(settings.top_p))
            eos = _id_list(settings.eos_token_id)
            if eos:
                options["eos_token_id"] = eos if len(eos) > 1 else eos[0]
            devices = list(range(torch.cuda.device_count())) if prompts.is_cuda else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                return model.generate(input_ids=prompts, attention_mask=prompt_attention_mask, **options)
        generator = torch.Generator(device=prompts.device).manual_seed(seed)
        return sample(model, prompts, prompt_attention_mask, settings, generator)
    finally:
        model.train(was_training)


def completion_batch(sequences: Tensor, prompt_length: int, prompt_attention_mask: Optional[Tensor] = None,
                     eos_token_id: TokenIds = None, ignore_index: int = -100) -> Dict[str, Tensor]:
    """The training batch for generated `sequences`: loss on completion tokens only.

    Args:
        sequences: `[B, P + C]` int64, the prompts (first `prompt_length` columns) and completions.
        prompt_length: P.
        prompt_attention_mask: `[B, P]` mask of the prompts (0 = padding), or None (all 1).
        eos_token_id: the EOS id(s); tokens after a completion's first EOS are masked. None:
            every completion token counts.
        ignore_index: the label of masked positions (default −100).

    Returns:
        {"input_ids": sequences, "attention_mask": int64 [B, P + C], "labels": int64 [B, P + C]},
        labels = the tokens, `ignore_index` on the prompt and where the attention mask is 0
        (labels are aligned with input_ids: the caller shifts them as for any causal LM).
    """
    completion = sequences[:, prompt_length:]
    eos = _id_list(eos_token_id)
    if eos:
        is_eos = torch.isin(completion, torch.tensor(eos, dtype=completion.dtype, device=completion.device))
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], completion.shape[1],
                                                                                     dtype=torch.long))
        positions = torch.arange(completion.shape[1], device=completion.device).expand_as(completion)
        completion_mask = (positions <= first[:, None]).long()
    else:
        completion_mask = torch.ones_like(completion, dtype=torch.long)
    if prompt_attention_mask is None:
        prompt_attention_mask = torch.ones(sequences.shape[0], prompt_length, dtype=torch.long,
                                           device=sequences.device)
    attention_mask = torch.cat([prompt_attention_mask.long(), completion_mask], dim=1)
    labels = sequences.masked_fill(attention_mask == 0, ignore_index)
    labels[:, :prompt_length] = ignore_index
    return {"input_ids": sequences, "attention_mask": attention_mask, "labels": labels}
