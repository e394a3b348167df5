"""Capture intermediate outputs of a model by module name, for feature-level distillation.

`FeatureCapture(model, names)` resolves the names with `model.named_modules()` when it is
built (an unknown name raises ValueError listing close matches), registers one forward
hook per module when attached (`with capture:` or `capture.attach()`), and removes every
hook it registered on `remove()` or when the `with` block exits, also when it raises.
Each forward pass of a captured module overwrites its entry; the model's own outputs are
never changed. The same class serves teacher and student: run the teacher under
`torch.no_grad()` (or pass `detach=True`) and the student normally so its captured
features keep their graph.
"""

from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable, Iterator, List, Union

import torch
from torch import nn

__all__ = ["FeatureCapture"]


def _detach_output(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(_detach_output(item) for item in output)
    if isinstance(output, list):
        return [_detach_output(item) for item in output]
    if isinstance(output, dict):
        return {key: _detach_output(item) for key, item in output.items()}
    return output


class FeatureCapture:
    """Records the forward outputs of named submodules while attached.

    Example::

        with FeatureCapture(teacher, ["layer3"]) as teacher_features, \\
             FeatureCapture(student, ["layer2"]) as student_features:
            with torch.no_grad():
                teacher(images)
            logits = student(images)
            loss = hint(student_features["layer2"], teacher_features["layer3"])

    Args:
        model: the module whose submodules are captured.
        names: one name or an iterable of names as listed by `model.named_modules()`
            (e.g. "layer2.1.conv2"; "" is the model itself). Duplicates are ignored.
        detach: store detached outputs (default False: outputs keep their autograd graph).

    Attributes:
        names: the captured module names, in the given order.
        features: dict name → latest output, for the modules that have run while attached.

    Raises:
        TypeError: `model` is not an `nn.Module`, or a name is not a string.
        ValueError: no name given, or a name does not match any submodule.
    """

    def __init__(self, model: nn.Module, names: Union[str, Iterable[str]], *, detach: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(names, str):
            names = [names]
        names = list(dict.fromkeys(names))
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"names must be strings, got {name!r} of type {type(name).__name__}")
        if not names:
            raise ValueError("names must contain at least one module name")
        modules = dict(model.named_modules())
        unknown = [name for name in names if name not in modules]
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, list(modules), n=3)
                hints.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
            raise ValueError(f"{type(model).__name__} has no submodule named {', '.join(hints)}; "
                             f"names come from model.named_modules(), e.g. "
                             f"{[n for n in modules if n][:8]}")
        self.model = model
        self.names: List[str] = names
        self.detach = bool(detach)
        self.features: Dict[str, Any] = {}
        self._modules = {name: modules[name] for name in names}
        self._handles: list = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are currently registered."""
        return bool(self._handles)

    def attach(self) -> "FeatureCapture":
        """Register the forward hooks and forget earlier captures; returns self."""
        if self._handles:
            raise RuntimeError("FeatureCapture is already attached; call remove() before attaching again")
        self.features = {}
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def remove(self) -> None:
        """Remove every hook this capture registered (captured features are kept)."""
        while self._handles:
            self._handles.pop().remove()

    def _make_hook(self, name: str):
        def record_output(module: nn.Module, inputs: Any, output: Any) -> None:
            self.features[name] = _detach_output(output) if self.detach else output
        return record_output

    def clear(self) -> None:
        """Forget the captured outputs (the hooks stay registered)."""
        self.features = {}

    def __getitem__(self, name: str) -> Any:
        if name in self.features:
            return self.features[name]
        if name not in self._modules:
            raise KeyError(f"{name!r} is not captured; captured names are {self.names}")
        raise KeyError(f"module {name!r} has not run a forward pass since the capture was attached "
                       f"or cleared")

    def __contains__(self, name: object) -> bool:
        return name in self.features

    def __iter__(self) -> Iterator[str]:
        return iter(self.features)

    def __len__(self) -> int:
        return len(self.features)

    def __enter__(self) -> "FeatureCapture":
        return self.attach()

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"FeatureCapture(model={type(self.model).__name__}, names={self.names}, "
                f"attached={self.attached}, captured={list(self.features)})")
