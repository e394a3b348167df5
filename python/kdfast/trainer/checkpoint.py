"""Checkpoint files of `kdfast.Distiller`: atomic writes, the format, the loss module's state.

`atomic_save` writes any object with `torch.save` so that the destination always holds the
previous complete file or the new one. A Distiller checkpoint is a dict with
`"format": CHECKPOINT_FORMAT`; `read_checkpoint` loads one (`weights_only=True`, on the CPU)
and raises FileNotFoundError / ValueError for a missing file or another kind of file.

The loss's part of a checkpoint is two entries. `"loss"`: `loss.state_dict()` when the loss
is an `nn.Module`, None for a plain function. `"loss_owned"`: the `state_dict()` of every
optimiser and learning-rate scheduler held as an attribute of the loss module or one of its
submodules (the adversarial discriminator's optimiser, under `"adversary.optimizer"`), keyed
by attribute path. `check_loss_state` verifies that a checkpoint's entries fit a loss
(ValueError naming what differs) before `load_loss_state` writes them; a checkpoint without
these entries leaves the loss as it is.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from typing import Any, Dict, List, Mapping, Union

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "atomic_save", "read_checkpoint", "owned_states", "owned_optimizers", "loss_state",
           "check_loss_state", "load_loss_state", "gather_from_ranks"]

CHECKPOINT_FORMAT = "kdfast.distiller/1"

_SCHEDULER_TYPES = tuple(t for t in (getattr(torch.optim.lr_scheduler, "LRScheduler", None),
                                     getattr(torch.optim.lr_scheduler, "ReduceLROnPlateau", None)) if t is not None)


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """`torch.save(obj, path)` that never leaves a partial file at `path`.

    The object is written to a temporary file in the same directory, flushed and synced, then
    renamed over `path` with `os.replace` (atomic on POSIX and Windows). If anything fails or
    the process is interrupted, `path` still holds its previous content and the temporary file
    is removed (a hard kill may leave a hidden `.<name>.*.tmp` file, never a corrupt `path`).
    Parent directories are created.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable where the OS allows it
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Load a Distiller checkpoint onto the CPU.

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: the file is not a Distiller checkpoint.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a kdfast Distiller checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return dict(state)


def owned_states(loss: Any) -> Dict[str, Any]:
    """Optimisers and learning-rate schedulers held as attributes of a loss module.

    Args:
        loss: the loss object; anything that is not an `nn.Module` owns none.

    Returns:
        `{attribute path: object}` over the module and its submodules, e.g.
        `{"adversary.optimizer": <Adam>}`, in module order.
    """
    if not isinstance(loss, nn.Module):
        return {}
    found: Dict[str, Any] = {}
    for module_name, module in loss.named_modules():
        for attribute, value in vars(module).items():
            if isinstance(value, torch.optim.Optimizer) or isinstance(value, _SCHEDULER_TYPES):
                found[f"{module_name}.{attribute}" if module_name else attribute] = value
    return found


def owned_optimizers(loss: Any, exclude: Any = None) -> List[torch.optim.Optimizer]:
    """The optimisers among `owned_states(loss)`, leaving out `exclude` (the trainer's own)."""
    return [owner for owner in owned_states(loss).values()
            if isinstance(owner, torch.optim.Optimizer) and owner is not exclude]


def loss_state(loss: Any) -> Dict[str, Any]:
    """The checkpoint entries `"loss"` and `"loss_owned"` for `loss` (see the module docstring)."""
    return {
        "loss": loss.state_dict() if isinstance(loss, nn.Module) else None,
        "loss_owned": {name: owner.state_dict() for name, owner in owned_states(loss).items()},
    }


def check_loss_state(loss: Any, state: Mapping[str, Any], path: str) -> None:
    """Raise ValueError unless the loss entries of checkpoint `state` (read from `path`) fit `loss`.

    A checkpoint without a `"loss"` entry fits any loss. A recorded state fits a module with
    the same state_dict keys; an empty or absent one fits a plain function or a module
    without state. The owned optimisers and schedulers must have the same attribute paths.
    """
    if "loss" not in state:
        return
    recorded = state["loss"]
    current = loss.state_dict() if isinstance(loss, nn.Module) else None
    if recorded and current is None:
        raise ValueError(f"{path!r} holds loss state ({len(recorded)} entries) but this Distiller's loss "
                         f"is not an nn.Module")
    recorded_owned = sorted(state.get("loss_owned") or {})
    owned = sorted(owned_states(loss))
    if recorded_owned != owned:
        raise ValueError(f"{path!r} holds the states of loss-owned optimisers/schedulers {recorded_owned} but "
                         f"this Distiller's loss owns {owned}")
    if recorded:
        missing, unexpected = sorted(set(current) - set(recorded)), sorted(set(recorded) - set(current))
        if missing or unexpected:
            raise ValueError(f"{path!r} holds loss state that does not fit this Distiller's loss: missing "
                             f"{missing}, unexpected {unexpected}")
    elif current:
        raise ValueError(f"{path!r} holds no loss state but this Distiller's loss module has state "
                         f"({', '.join(list(current)[:4])}{', ...' if len(current) > 4 else ''})")


def load_loss_state(loss: Any, state: Mapping[str, Any]) -> None:
    """Write the loss entries of a checkpoint (checked by `check_loss_state`) into `loss`."""
    if "loss" not in state:
        return
    if state["loss"] and isinstance(loss, nn.Module):
        loss.load_state_dict(state["loss"])
    recorded_owned = state.get("loss_owned") or {}
    for name, owner in owned_states(loss).items():
        owner.load_state_dict(recorded_owned[name])


def gather_from_ranks(obj: Any, world_size: int) -> List[Any]:
    """`obj` of every rank, in rank order (a collective: every rank must call it).

    Serialised with `torch.save` first, since `all_gather_object` cannot carry tensors
    reliably; the result is read back with `weights_only=True`.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    gathered: List[Any] = [None] * world_size
    dist.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(item), weights_only=True) for item in gathered]
