"""Loading a teacher for offline compression: a Hugging Face causal LM or a Python function.

`load_teacher(spec)` returns a `Teacher`: a callable that maps token ids [B, L] (int64, on
the teacher's device) to next-token logits [B, L, V] (floating point), run under
`torch.inference_mode()`. `spec` names either a Python function (which takes the token-id
tensor and returns the logits, or an object with a `.logits` attribute) or anything
`transformers.AutoModelForCausalLM.from_pretrained` accepts (a hub name or a local
directory). Function specs, resolved the way they are typed:

- `path/to/file.py:function` or `path/to/file.py`: the file (relative to the current
  directory); without `:function` the function named `teacher` (`DEFAULT_FUNCTION`).
- `name:function` (`pkg.name:function`): `name.py` (`pkg/name.py`) in the current
  directory if there is one, else the importable module `name`.

`parse_device` checks a device name against what this torch and machine provide. Every
problem a user can fix (no such file or function, a module that fails to import, a model
that does not load, a teacher that raises or returns the wrong shape or dtype, an unknown
or absent device) raises `TeacherError` with a one-line message that says what was tried.
`transformers` is imported only for Hugging Face specs; `load_tokenizer` wraps
`transformers.AutoTokenizer`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import traceback
from typing import Any, Callable, Optional, Tuple

import torch

from kdfast.contract.install import install_hint

__all__ = ["DEFAULT_FUNCTION", "Teacher", "TeacherError", "default_tokenizer", "is_function_spec", "load_teacher",
           "load_tokenizer", "parse_device", "resolve_torch_dtype"]

DEFAULT_FUNCTION = "teacher"
_FUNCTION_SPEC = re.compile(r"^(?P<module>[^:]+):(?P<function>[A-Za-z_][A-Za-z0-9_.]*)$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ACCELERATORS = ("cuda", "mps", "xpu")


class TeacherError(ValueError):
    """The teacher cannot be loaded, cannot run on the device asked for, or returned unusable logits."""


def _describe(error: BaseException, filename: Optional[str] = None) -> str:
    """`Type: message (file:line)`, the location being the innermost frame in `filename` (else the innermost)."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, SyntaxError) and error.filename:
        return f"{text} ({error.filename}:{error.lineno})" if error.lineno else text
    if filename is not None:
        frames = [frame for frame in frames if os.path.abspath(frame.filename) == filename] or frames
    return f"{text} ({frames[-1].filename}:{frames[-1].lineno})" if frames else text


def _split_function_spec(spec: str) -> Optional[Tuple[str, Optional[str]]]:
    """(module or file, function or None) for a function spec, None for a Hugging Face one."""
    if os.path.isdir(spec):
        return None
    if spec.endswith(".py"):
        return spec, None
    match = _FUNCTION_SPEC.match(spec)
    if match is None or (os.path.exists(spec) and not os.path.isfile(spec)):
        return None
    return match.group("module"), match.group("function")


def is_function_spec(spec: str) -> bool:
    """True for specs naming a Python function (`file.py[:function]`, `module:function`); False for models."""
    return _split_function_spec(spec) is not None


def parse_device(name: str) -> torch.device:
    """`torch.device(name)` after checking that this torch and machine can run a teacher there.

    Raises:
        TeacherError: an unknown device name, a device type no teacher runs on, a torch
            built without that backend, or a device index that does not exist.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise TeacherError(f"unknown device {name!r}; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type not in _ACCELERATORS:
        raise TeacherError(f"a teacher cannot run on device {name!r}; expected cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise TeacherError(f"device {name!r}: this torch ({torch.__version__}) was built without CUDA")
    backend = getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        raise TeacherError(f"device {name!r}: no {device.type} device is available on this machine")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise TeacherError(f"device {name!r}: this machine has {count} {device.type} device(s), "
                           f"{device.type}:0 to {device.type}:{count - 1}")
    return device


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
        source_file: the Python file of a function teacher; an error the teacher raises is
            reported at its innermost line in that file.

    Raises (on call):
        TeacherError: the teacher raised, or returned something other than floating-point
            logits [B, L, V].
    """

    def __init__(
        self,
        name: str,
        forward: Callable[[torch.Tensor], Any],
        device: torch.device,
        default_tokenizer: Optional[str] = None,
        source_file: Optional[str] = None,
    ) -> None:
        self.name = name
        self._forward = forward
        self.device = device
        self.default_tokenizer = default_tokenizer
        self._source_file = source_file

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        try:
            with torch.inference_mode():
                output = self._forward(token_ids.to(self.device))
        except Exception as error:  # the teacher is user code: report where it failed, in one line
            raise TeacherError(f"teacher {self.name!r} failed on token ids of shape {tuple(token_ids.shape)}: "
                               f"{_describe(error, self._source_file)}") from error
        logits = getattr(output, "logits", output)
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TeacherError(
                f"teacher {self.name!r} must return a floating-point logits tensor (or an object with .logits), "
                f"got {type(logits).__name__}"
                + (f" of dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else "")
            )
        expected = tuple(token_ids.shape)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != expected:
            raise TeacherError(
                f"teacher {self.name!r} returned logits of shape {tuple(logits.shape)} for token ids of shape "
                f"{expected}; expected [{expected[0]}, {expected[1]}, V]"
            )
        return logits

    def __repr__(self) -> str:
        return f"Teacher({self.name!r}, device={self.device})"


def _load_file(path: str) -> Any:
    module_name = f"kdfast_teacher_{abs(hash(path))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # user code: any failure while it runs is the user's to fix
        sys.modules.pop(module_name, None)
        raise TeacherError(f"teacher file {path} failed to load: {_describe(error, path)}") from error
    return module


def _load_module(module_part: str) -> Tuple[Any, str]:
    """(module, what it was loaded from) for the module or file part of a function spec."""
    if module_part.endswith(".py") or "/" in module_part or os.sep in module_part:
        path = os.path.abspath(os.path.expanduser(module_part))
        if not os.path.isfile(path):
            raise TeacherError(f"teacher file {module_part} not found (looked for {path})")
        return _load_file(path), path
    local = os.path.abspath(os.path.join(*module_part.split(".")) + ".py")
    if os.path.isfile(local):
        return _load_file(local), local
    try:
        return importlib.import_module(module_part), module_part
    except ModuleNotFoundError as error:
        if error.name and (module_part == error.name or module_part.startswith(error.name + ".")):
            raise TeacherError(f"teacher module {module_part!r} not found: tried {local} and importing "
                               f"{module_part!r} from the Python path") from None
        raise TeacherError(f"teacher module {module_part!r} failed to import: {_describe(error)}") from error
    except Exception as error:
        raise TeacherError(f"teacher module {module_part!r} failed to import: {_describe(error)}") from error


def _public_callables(module: Any) -> str:
    names = [name for name, value in vars(module).items()
             if not name.startswith("_") and callable(value) and getattr(value, "__module__", None) == module.__name__]
    return ", ".join(sorted(names)) or "none"


def _load_function(module_part: str, function_path: Optional[str]) -> Tuple[Callable[[torch.Tensor], Any], str, str]:
    """(the function, the teacher's name for the manifest, the file or module it came from)."""
    module, source = _load_module(module_part)
    name_given = function_path is not None
    function_path = function_path or DEFAULT_FUNCTION
    target: Any = module
    for attribute in function_path.split("."):
        if not hasattr(target, attribute):
            how = "" if name_given else f" (the default when no :FUNCTION is given); name one as {module_part}:FUNCTION"
            raise TeacherError(f"teacher {source} has no function {function_path!r}{how}; "
                               f"functions defined there: {_public_callables(module)}")
        target = getattr(target, attribute)
    if not callable(target):
        raise TeacherError(f"teacher {source}:{function_path} is a {type(target).__name__}, not a function")
    return target, f"{source}:{function_path}", source


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "loading a Hugging Face teacher or tokenizer needs the transformers package: "
            + install_hint("compress", ["transformers"])
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
        spec: `path/to/file.py[:function]`, `module:function`, a hub model name or a local
            model directory (see the module docstring for how function specs resolve).
        device: device the model is moved to and token ids are sent to (default "cpu").
            A function teacher receives ids on this device and places itself.
        dtype: weights/compute dtype of a Hugging Face model (default float32); ignored
            for functions.
        trust_remote_code: passed to `from_pretrained` (default False).

    Returns:
        A `Teacher` in eval mode.

    Raises:
        TeacherError: see the module docstring.
        ImportError: a Hugging Face spec without `transformers` installed (the message has
            the install command).
    """
    torch_device = parse_device(device)
    function_spec = _split_function_spec(spec)
    if function_spec is not None:
        forward, name, source = _load_function(*function_spec)
        return Teacher(name, forward, torch_device, source_file=source if os.path.isabs(source) else None)
    if os.path.isfile(spec):
        raise TeacherError(f"teacher {spec} is a file; expected a Python file (file.py[:function]), "
                           "a Hugging Face model directory or a hub model name")
    if spec.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(spec)):
        raise TeacherError(f"teacher {spec}: no such model directory")
    transformers = _transformers()
    name = os.path.abspath(spec) if os.path.exists(spec) else spec
    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_keyword = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            spec, **{dtype_keyword: dtype}, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as error:
        local = f" (for the Python file {spec}.py, pass {spec}.py or {spec}:FUNCTION)" \
            if os.path.isfile(spec + ".py") else ""
        raise TeacherError(f"cannot load the Hugging Face teacher {spec!r}{local}: {error}") from error
    model.to(torch_device).eval()

    def forward(token_ids: torch.Tensor):
        return model(input_ids=token_ids, use_cache=False).logits

    return Teacher(name, forward, torch_device, default_tokenizer=spec)


def default_tokenizer(spec: str) -> Optional[str]:
    """Where `load_teacher(spec).default_tokenizer` points, known without loading the teacher."""
    return None if is_function_spec(spec) else spec


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """`transformers.AutoTokenizer.from_pretrained(name)` with a clear error when it is missing or fails.

    Raises:
        TeacherError: the tokenizer does not load.
        ImportError: `transformers` is not installed.
    """
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise TeacherError(f"cannot load the tokenizer {name!r}: {error}") from error
