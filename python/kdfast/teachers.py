"""Loading a teacher for offline compression: a Hugging Face causal LM or a Python function.

`load_teacher(spec)` returns a `Teacher`: a callable that maps token ids [B, L] (int64, on
the teacher's device) to next-token logits [B, L, V] (floating point), run under
`torch.inference_mode()`. `spec` is either `module:function` / `path/to/file.py:function`
(the function takes the token-id tensor and returns the logits, or an object with a
`.logits` attribute) or anything `transformers.AutoModelForCausalLM.from_pretrained`
accepts (a hub name or a local directory). `transformers` is imported only for the latter.
`load_tokenizer` wraps `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from typing import Any, Callable, Optional

import torch

__all__ = ["Teacher", "load_teacher", "load_tokenizer", "is_function_spec", "resolve_torch_dtype"]

_FUNCTION_SPEC = re.compile(r"^(?P<module>[^:]+):(?P<function>[A-Za-z_][A-Za-z0-9_.]*)$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_function_spec(spec: str) -> bool:
    """True for `module:function` or `file.py:function` specs (an existing path never is one)."""
    return not os.path.exists(spec) and _FUNCTION_SPEC.match(spec) is not None


def resolve_torch_dtype(name: str, device: str) -> torch.dtype:
    """Teacher compute dtype for a `--teacher-dtype` name: "auto" is bfloat16 on CUDA, else float32."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"teacher dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


class Teacher:
    """A callable teacher: `teacher(token_ids [B, L] int64) -> logits [B, L, V]`.

    Attributes:
        name: how the manifest identifies it (hub name, absolute local path, or the
            function spec with an absolute file path).
        device: where token ids must live.
        default_tokenizer: where to load a tokenizer from when none is given (the model
            directory / hub name for Hugging Face teachers, None for functions).
    """

    def __init__(
        self,
        name: str,
        forward: Callable[[torch.Tensor], Any],
        device: torch.device,
        default_tokenizer: Optional[str] = None,
    ) -> None:
        self.name = name
        self._forward = forward
        self.device = device
        self.default_tokenizer = default_tokenizer

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            output = self._forward(token_ids.to(self.device))
        logits = getattr(output, "logits", output)
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError(
                f"teacher {self.name!r} must return a floating-point logits tensor (or an object with .logits), "
                f"got {type(logits).__name__}"
                + (f" of dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else "")
            )
        expected = tuple(token_ids.shape)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != expected:
            raise ValueError(
                f"teacher {self.name!r} returned logits of shape {tuple(logits.shape)} for token ids of shape "
                f"{expected}; expected [{expected[0]}, {expected[1]}, V]"
            )
        return logits

    def __repr__(self) -> str:
        return f"Teacher({self.name!r}, device={self.device})"


def _load_function(spec: str) -> Callable[[torch.Tensor], Any]:
    match = _FUNCTION_SPEC.match(spec)
    module_part, function_path = match.group("module"), match.group("function")
    if module_part.endswith(".py"):
        path = os.path.abspath(module_part)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher file {path} does not exist")
        module_name = f"kdfast_teacher_{abs(hash(path))}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_part)
    target: Any = module
    for attribute in function_path.split("."):
        if not hasattr(target, attribute):
            raise AttributeError(f"teacher spec {spec!r}: {module_part} has no attribute {function_path!r}")
        target = getattr(target, attribute)
    if not callable(target):
        raise TypeError(f"teacher spec {spec!r} does not name a callable")
    return target


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "loading a Hugging Face teacher or tokenizer needs the `transformers` package: "
            "pip install 'kdfast[compress]' (or pip install transformers safetensors)"
        ) from None
    return transformers


def load_teacher(
    spec: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> Teacher:
    """Loads a teacher from a function spec or a Hugging Face causal LM.

    Args:
        spec: `module:function`, `path/to/file.py:function`, a hub model name or a local
            model directory.
        device: device the model is moved to and token ids are sent to (default "cpu").
            A function teacher receives ids on this device and places itself.
        dtype: weights/compute dtype of a Hugging Face model (default float32); ignored
            for functions.
        trust_remote_code: passed to `from_pretrained` (default False).

    Returns:
        A `Teacher` in eval mode.
    """
    torch_device = torch.device(device)
    if is_function_spec(spec):
        module_part, _, function_path = spec.rpartition(":")
        name = f"{os.path.abspath(module_part)}:{function_path}" if module_part.endswith(".py") else spec
        return Teacher(name, _load_function(spec), torch_device)
    transformers = _transformers()
    name = os.path.abspath(spec) if os.path.exists(spec) else spec
    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_keyword = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec, **{dtype_keyword: dtype}, trust_remote_code=trust_remote_code
    )
    model.to(torch_device).eval()

    def forward(token_ids: torch.Tensor):
        return model(input_ids=token_ids, use_cache=False).logits

    return Teacher(name, forward, torch_device, default_tokenizer=spec)


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """`transformers.AutoTokenizer.from_pretrained(name)` with a clear error when it is missing."""
    return _transformers().AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
