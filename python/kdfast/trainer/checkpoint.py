"""Checkpoint files of `kdfast.Distiller`: atomic, checksummed writes, verified reads, the loss's state.

`atomic_save` writes any object with `torch.save` so that the destination always holds the
previous complete file or the new one, and seals it: the SHA-256 of the file's bytes is
stored as the archive's zip comment (`kdfast-sha256:<64 hex digits>`, the last 78 bytes),
so the file stays an ordinary `torch.load`-able archive. A Distiller checkpoint is a dict
with `"format": CHECKPOINT_FORMAT`; `read_checkpoint` verifies the checksum, then loads it
(`weights_only=True`, on the CPU). A damaged (even one flipped bit), truncated, empty or
foreign file raises `CheckpointError` (a ValueError) naming the file; nothing is loaded
from it. A file without the seal (written by kdfast before checkpoints carried one) still
loads, with a warning that it cannot be verified.

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
import hashlib
import io
import os
import struct
import tempfile
import warnings
from typing import IO, Any, Dict, List, Mapping, Union

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "atomic_save", "read_checkpoint", "verify_checkpoint_file",
           "owned_states", "owned_optimizers", "loss_state", "check_loss_state", "load_loss_state",
           "gather_from_ranks"]

CHECKPOINT_FORMAT = "kdfast.distiller/1"
CHECKPOINT_ENTRIES = ("student", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "history",
                      "rng_boundary", "rng_epoch_start")

_SCHEDULER_TYPES = tuple(t for t in (getattr(torch.optim.lr_scheduler, "LRScheduler", None),
                                     getattr(torch.optim.lr_scheduler, "ReduceLROnPlateau", None)) if t is not None)

_SEAL_PREFIX = b"kdfast-sha256:"
_SEAL_LENGTH = len(_SEAL_PREFIX) + 64  # the zip comment: prefix and the hex digest
_ZIP_START = b"PK\x03\x04"  # a local file header: every torch.save archive starts with one
_END_RECORD = b"PK\x05\x06"  # the zip end-of-central-directory record (22 bytes + comment), last in the file
_END_RECORD_SIZE = 22
_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint file is damaged, truncated, empty or not a kdfast checkpoint.

    Attributes:
        path: the file.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


def _sha256(handle: IO[bytes], length: int) -> str:
    """Hex SHA-256 of the first `length` bytes of an open file."""
    hasher = hashlib.sha256()
    handle.seek(0)
    remaining = length
    while remaining:
        chunk = handle.read(min(_CHUNK, remaining))
        if not chunk:
            break
        hasher.update(chunk)
        remaining -= len(chunk)
    return hasher.hexdigest()


def _seal(handle: IO[bytes]) -> None:
    """Appends the SHA-256 of a just written torch.save archive as its zip comment."""
    handle.flush()
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - _END_RECORD_SIZE))
    end = handle.read(_END_RECORD_SIZE)
    if len(end) != _END_RECORD_SIZE or end[:4] != _END_RECORD or end[20:] != b"\0\0":
        raise RuntimeError("atomic_save: torch.save wrote an archive without a plain zip end record; "
                           "cannot add the checksum")
    handle.seek(size - 2)
    handle.write(struct.pack("<H", _SEAL_LENGTH))  # the comment length, covered by the checksum
    handle.flush()
    digest = _sha256(handle, size)
    handle.seek(size)
    handle.write(_SEAL_PREFIX + digest.encode("ascii"))


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """`torch.save(obj, path)` that never leaves a partial file at `path` and seals it with a checksum.

    The object is written to a temporary file in the same directory, its SHA-256 appended as
    the archive's zip comment (see the module docstring; `torch.load` reads the file as
    usual), flushed and synced, then renamed over `path` with `os.replace` (atomic on POSIX
    and Windows). If anything fails or the process is interrupted, `path` still holds its
    previous content and the temporary file is removed (a hard kill may leave a hidden
    `.<name>.*.tmp` file, never a corrupt `path`). Parent directories are created.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w+b") as handle:
            torch.save(obj, handle)
            _seal(handle)
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


def verify_checkpoint_file(handle: IO[bytes], path: str) -> bool:
    """Checks the checksum of an open checkpoint file (see `atomic_save`).

    Returns:
        True when the file carries a checksum and matches it; False for a file written
        without one (before checkpoints were sealed), which cannot be verified.

    Raises:
        CheckpointError: the file is empty, not a torch.save archive, truncated, or does
            not match its checksum (a damaged or modified file).
    """
    size = os.fstat(handle.fileno()).st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): it was never written completely", path)
    handle.seek(0)
    if handle.read(4) != _ZIP_START:
        raise CheckpointError(f"{path!r} is not a kdfast checkpoint: it is not a torch.save archive", path)
    tail_length = min(size, _END_RECORD_SIZE + _SEAL_LENGTH)
    handle.seek(size - tail_length)
    tail = handle.read(tail_length)
    end = tail[:_END_RECORD_SIZE]
    if tail_length == _END_RECORD_SIZE + _SEAL_LENGTH and end[:4] == _END_RECORD \
            and end[20:] == struct.pack("<H", _SEAL_LENGTH) and tail[_END_RECORD_SIZE:].startswith(_SEAL_PREFIX):
        recorded = tail[_END_RECORD_SIZE + len(_SEAL_PREFIX):].decode("ascii", errors="replace")
        actual = _sha256(handle, size - _SEAL_LENGTH)
        if actual != recorded:
            raise CheckpointError(
                f"checkpoint {path!r} fails its SHA-256 checksum (recorded {recorded}, computed {actual}): the file "
                "is damaged or was modified after it was written; nothing was loaded from it", path)
        return True
    if size >= _END_RECORD_SIZE and tail[-_END_RECORD_SIZE:-18] == _END_RECORD and tail[-2:] == b"\0\0":
        return False
    raise CheckpointError(
        f"checkpoint {path!r} is truncated or damaged: it does not end with a complete archive record and its "
        "checksum; nothing was loaded from it", path)


def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Verify and load a Distiller checkpoint onto the CPU.

    Raises:
        FileNotFoundError: nothing at `path`.
        CheckpointError: (a ValueError) the file is empty, truncated, damaged (fails its
            checksum), cannot be loaded, or is not a Distiller checkpoint; the message names
            the file. A file without a checksum (older kdfast) loads with a UserWarning.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    with open(path, "rb") as handle:
        if not verify_checkpoint_file(handle, path):
            warnings.warn(f"checkpoint {path!r} carries no checksum (written by an older kdfast), so it cannot be "
                          "verified; save it again to add one", UserWarning, stacklevel=3)
        handle.seek(0)
        try:
            state = torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for a bad archive
            raise CheckpointError(f"checkpoint {path!r} cannot be loaded: {type(error).__name__}: {error}",
                                  path) from error
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path!r} is not a kdfast Distiller checkpoint (expected format {CHECKPOINT_FORMAT!r})",
                              path)
    missing = [entry for entry in CHECKPOINT_ENTRIES if entry not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks the entries {missing}", path)
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
