"""Integrations of kdfast's losses with other training libraries.

`kdfast.integrations.huggingface` distils causal language models with Hugging Face
`transformers` (`DistillationTrainer`, `causal_lm_kd_loss`). Importing this package never
imports an optional dependency; each integration imports its library when first used and
raises an ImportError that names the `pip` command to install it when it is missing.
"""

__all__ = ["huggingface"]
