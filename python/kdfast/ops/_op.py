"""One pattern for every kdfast custom op: an out-variant body, a trivial fake, one launcher.

An op is a plain Python function, its *body*, that writes into output tensors its caller
allocated and returns nothing. `define_op` registers the body as a `torch.library` custom op
whose schema is read from the body's own signature (every parameter but the last) followed by
the fields of `KDOptions` when the body's last parameter is `options: KDOptions`; the output
parameters are declared mutated, so the fake kernel does nothing and fake and real outputs
cannot disagree (the allocation is the caller's, the same under tracing and in eager mode).
`launch` calls the op under `torch.compile` and the body directly otherwise, skipping the
dispatcher's per-call cost in eager mode. Each argument list is thus written once: in the
body's `def`.
"""

from __future__ import annotations

import inspect
import typing
from typing import Callable, Optional, Sequence

import torch

from kdfast.contract.options import FIELD_NAMES, FIELD_TYPES, KDOptions

__all__ = ["define_op", "launch"]

DEVICE_TYPES = ("cpu", "cuda")


def _parameters(body: Callable) -> tuple[list, bool]:
    hints = typing.get_type_hints(body)
    names = list(inspect.signature(body).parameters)
    takes_options = bool(names) and hints.get(names[-1]) is KDOptions
    if takes_options:
        names = names[:-1]
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(name, kind, annotation=hints[name]) for name in names]
    if takes_options:
        parameters += [inspect.Parameter(name, kind, annotation=FIELD_TYPES[name]) for name in FIELD_NAMES]
    return parameters, takes_options


def define_op(name: str, body: Callable, mutates: Sequence[str]):
    """Registers `body` as the custom op `name` (e.g. "kdfast::kd_loss_forward").

    Args:
        name: the op's qualified name.
        body: `body(*arguments[, options: KDOptions]) -> None`, annotated; writes its outputs
            into the tensors named in `mutates`.
        mutates: names of the output parameters the body writes.

    Returns:
        The `torch.library.CustomOpDef`; call it with the body's arguments followed by
        `options.values()` (what `launch` does under `torch.compile`).
    """
    parameters, takes_options = _parameters(body)
    count = len(parameters) - (len(FIELD_NAMES) if takes_options else 0)

    def entry(*arguments):
        if takes_options:
            body(*arguments[:count], KDOptions(*arguments[count:]))
        else:
            body(*arguments)

    entry.__signature__ = inspect.Signature(parameters, return_annotation=None)
    entry.__name__ = body.__name__
    entry.__doc__ = body.__doc__
    op = torch.library.custom_op(name, entry, mutates_args=tuple(mutates), device_types=DEVICE_TYPES)
    op.register_fake(_writes_nothing)
    return op


def _writes_nothing(*arguments) -> None:
    """The fake kernel of every out-variant op: the outputs already exist."""
    return None


def launch(op, body: Callable, arguments: Sequence, options: Optional[KDOptions] = None) -> None:
    """Runs one op: through the dispatcher when compiling, else its body directly."""
    if torch.compiler.is_compiling():
        if options is None:
            op(*arguments)
        else:
            op(*arguments, *options.values())
    elif options is None:
        body(*arguments)
    else:
        body(*arguments, options)
