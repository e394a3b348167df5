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

The backward ops compute first-order gradients only, and their outputs have no graph. When a
backward pass runs with `create_graph=True` (`creating_graph()`), each autograd wrapper
instead recomputes its loss from the saved inputs with differentiable PyTorch operations
(`kdfast.reference`) and returns `differentiable_gradients` of it, so second-order gradients
(gradient penalties, `gradgradcheck`) are exact rather than silently zero.
"""

from __future__ import annotations

import inspect
import typing
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from kdfast.contract.options import FIELD_NAMES, FIELD_TYPES, KDOptions

__all__ = ["creating_graph", "define_op", "differentiable_gradients", "inplace_gradient_gone", "launch",
           "save_with_gradient", "saved_gradient"]

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


def creating_graph() -> bool:
    """True inside a backward pass that records a graph of its own (`create_graph=True`) in eager
    mode. Under torch.compile the backward is traced once, for first-order gradients."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def differentiable_gradients(loss_fn: Callable[[], Tensor], inputs: Sequence[Optional[Tensor]],
                             needs_grad: Sequence[bool], grad_output: Tensor) -> tuple:
    """d(grad_output · loss_fn())/d input for each input with `needs_grad`, with create_graph=True.

    `loss_fn` recomputes the loss from `inputs` (saved tensors, still attached to the caller's
    graph) with differentiable operations, so the gradients are differentiable in the inputs
    and in `grad_output`. Returns one entry per input: None where no gradient is needed, zeros
    where the loss does not depend on the input.
    """
    wanted = [index for index, (tensor, needed) in enumerate(zip(inputs, needs_grad)) if needed and tensor is not None]
    result = [None] * len(inputs)
    if not wanted:
        return tuple(result)
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, [inputs[i] for i in wanted], grad_output.to(loss.dtype),
                                    create_graph=True, allow_unused=True)
    for index, grad in zip(wanted, grads):
        result[index] = grad if grad is not None else torch.zeros_like(inputs[index])
    return tuple(result)


def save_with_gradient(ctx, tensors: tuple, gradient: Tensor) -> None:
    """Saves `tensors` for the backward pass and keeps the one-pass `gradient` beside them. In
    eager mode the gradient is a plain attribute, outside autograd's saved-tensor version
    checks: the first backward pass scales it where it lies and hands it out, and a later pass
    does not read it (the dense and sparse ops). Under torch.compile it is saved like the rest."""
    if torch.compiler.is_compiling():
        ctx.save_for_backward(*tensors, gradient)
    else:
        ctx.save_for_backward(*tensors)
        ctx.gradient = gradient


def saved_gradient(ctx, extra: Sequence[Tensor]) -> Optional[Tensor]:
    """The one-pass gradient `save_with_gradient` kept: the saved tensor after the others
    (`extra`, the tail of ctx.saved_tensors) under torch.compile, else the context attribute
    (None once the first backward pass has handed it out, or when none was kept)."""
    return extra[0] if extra else getattr(ctx, "gradient", None)


def inplace_gradient_gone(loss: str, second_pass: bool) -> RuntimeError:
    """The error of a backward pass through `loss` that needs what `inplace_backward=True`
    overwrote: the logits (create_graph=True recomputes the loss from them) or, for a second
    backward pass, the gradient (the student's storage) already handed out."""
    if second_pass:
        return RuntimeError(f"{loss}: inplace_backward=True hands its gradient (the student's storage) out once; "
                            "a second backward pass through this loss cannot reuse it")
    return RuntimeError(f"{loss}: inplace_backward=True overwrote the student logits with their gradient; "
                        "a backward pass with create_graph=True needs them (use inplace_backward=False)")
