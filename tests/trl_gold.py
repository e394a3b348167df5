"""TRL's ULD code (`trl.experimental.gold.gold_trainer.ULDLoss`) for comparison tests, loaded without its trainer.

The installed TRL module imports the whole trainer stack (datasets, vLLM hooks, …) at the top,
which the test environment need not have. `load_uld_class()` reads the installed
`gold_trainer.py`, takes the `ULDLoss` class definition out of its syntax tree and executes
only that class with torch in scope, so the tests run TRL's own code for the loss and the
byte-offset alignment. It returns None (the tests skip) when TRL is not installed or the class
cannot be found or built.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import types

import torch
import torch.nn as nn
import torch.nn.functional as F


@functools.lru_cache(maxsize=1)
def load_uld_class():
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "experimental", "gold", "gold_trainer.py")
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), filename=path)
        node = next(item for item in tree.body if isinstance(item, ast.ClassDef) and item.name == "ULDLoss")
        namespace = {"torch": torch, "nn": nn, "F": F, "GOLDConfig": object, "GOLDTrainer": None}
        exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), namespace)  # noqa: S102
        return namespace["ULDLoss"]
    except (OSError, SyntaxError, StopIteration, NameError, AttributeError):
        return None


def plain_uld_module(student_temperature: float = 1.0, teacher_temperature: float = 1.0):
    """A TRL ULDLoss in its plain form: no extended alignment, no EOS skipping, no cross-entropy,
    distillation weight 1, "observed" merge strategy, no hybrid loss. None without TRL."""
    cls = load_uld_class()
    if cls is None:
        return None
    config = types.SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=student_temperature,
        uld_teacher_temperature=teacher_temperature, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=False, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False, beta=1.0,
    )
    return cls(config)
