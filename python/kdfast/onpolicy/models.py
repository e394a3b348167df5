"""What the on-policy loop reads from a causal language model: its logits, or its last hidden
states with its lm_head.

- `model_logits(output)`: the `[B, L, V]` logits in a model's output (a tensor, an output with
  `.logits`, a dict with "logits", or a tuple whose first item is a tensor).
- `hidden_and_head(model, inputs)`: runs only the model's base (`model.<base_model_prefix>`,
  as Hugging Face causal LMs are built) and returns the last hidden states `[B, L, H]`, the
  lm_head weight `[V, H]`, its bias or None, the config's `final_logit_softcapping` or None,
  and the base model's output. A model whose config rescales its logits (`logit_scale`,
  `logits_scaling`) is refused, since the fused loss would not apply the scale.

Plain `torch.nn.Module`s take part by following the same conventions (a `base_model_prefix`
attribute naming the body, `get_output_embeddings()` returning a `Linear`). Needs torch only.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["hidden_and_head", "model_logits"]


def model_logits(output: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, `.logits`, `["logits"]` or the first item.

    Raises:
        TypeError: no logits can be found.
    """
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def hidden_and_head(model: torch.nn.Module, inputs: dict) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[float],
                                                                   Any]:
    """(last hidden states [B, L, H], lm_head weight [V, H], bias [V] or None, softcap or None, base output).

    Args:
        model: a causal LM with a base model at `getattr(model, model.base_model_prefix)` and a
            `torch.nn.Linear` lm_head returned by `get_output_embeddings()`.
        inputs: keyword inputs of the base model (`input_ids`, `attention_mask`, ...).

    Raises:
        TypeError: the model has no base model or no Linear lm_head.
        ValueError: its config scales the logits (`logit_scale` or `logits_scaling` not 1).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if head is None or not isinstance(head, torch.nn.Linear) or base is None or base is model:
        raise TypeError(f"fused=True needs a causal LM with a base model (`{prefix or 'base_model_prefix'}`) and a "
                        f"Linear lm_head (get_output_embeddings()); {type(model).__name__} has neither; "
                        f"use fused=False")
    config = getattr(model, "config", None)
    for name in ("logit_scale", "logits_scaling"):
        scale = getattr(config, name, None)
        if scale is not None and float(scale) != 1.0:
            raise ValueError(f"fused=True: {type(model).__name__} scales its logits (config.{name}={scale}), which "
                             "the fused loss does not apply; use fused=False")
    output = base(**inputs)
    if isinstance(output, Tensor):
        hidden = output
    else:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    softcap = getattr(config, "final_logit_softcapping", None)
    return hidden, head.weight, head.bias, softcap, output
