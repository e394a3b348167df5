"""Seeding and random-generator state for `kdfast.Distiller`.

`seed_everything` seeds Python's `random`, NumPy's global generator and torch. `capture_rng`
returns the state of those generators, of every initialised CUDA device and of the explicit
`torch.Generator`s a data loader draws from, as plain types that `torch.load(weights_only=True)`
accepts; `restore_rng` puts such a state back (and raises RuntimeError when the loader has a
different number of explicit generators than the state recorded). `replay_epoch` positions
a loader in the middle of an epoch by replaying its order from the epoch's starting state.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Iterator, List, Mapping

import numpy as np
import torch

__all__ = ["seed_everything", "loader_generators", "capture_rng", "restore_rng", "replay_epoch"]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's `random`, NumPy's global generator and torch (CPU and every CUDA device).

    Args:
        seed: a non-negative integer.
        deterministic: also call `torch.use_deterministic_algorithms(True)` and turn off the
            cuDNN autotuner (default False). This is process-wide and makes operations without a
            deterministic implementation raise.

    Raises:
        ValueError: if `seed` is negative or not an integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def loader_generators(loader: Any) -> List[torch.Generator]:
    """The explicit torch generators a DataLoader draws from (its own and its sampler's), each once.

    Args:
        loader: any object; `generator`, `sampler.generator` and `batch_sampler.sampler.generator`
            are looked up and kept when they are `torch.Generator`s.

    Returns:
        The generators found, in that order.
    """
    found: List[torch.Generator] = []
    candidates = [
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
        getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None),
    ]
    for generator in candidates:
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def capture_rng(loader: Any = None) -> Dict[str, Any]:
    """The current state of every random generator a training step may draw from.

    Args:
        loader: a data loader whose explicit generators are recorded too (default None: none).

    Returns:
        A dict with entries "python", "numpy", "torch", "cuda" and "loader".
    """
    numpy_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        # Stored as plain types so that `torch.load(weights_only=True)` accepts it.
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()), int(numpy_state[2]),
                  int(numpy_state[3]), float(numpy_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "loader": [g.get_state() for g in loader_generators(loader)] if loader is not None else [],
    }
    return state


def restore_rng(state: Mapping[str, Any], loader: Any = None) -> None:
    """Put back a state returned by `capture_rng`.

    Args:
        state: the captured state.
        loader: the data loader whose explicit generators get the recorded states (default
            None: loader generators are left alone).

    Raises:
        RuntimeError: the loader has a different number of explicit generators than recorded.
    """
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader is not None:
        generators = loader_generators(loader)
        if len(generators) != len(state["loader"]):
            raise RuntimeError(
                f"the data loader has {len(generators)} explicit generator(s) but the checkpoint "
                f"recorded {len(state['loader'])}; resume with a loader built the same way"
            )
        for generator, generator_state in zip(generators, state["loader"]):
            generator.set_state(generator_state)


def replay_epoch(loader: Any, epoch_rng: Mapping[str, Any], boundary_rng: Mapping[str, Any], batches: int,
                 epoch: int) -> Iterator[Any]:
    """An iterator over `loader` that resumes an epoch after its first `batches` batches.

    Args:
        loader: the data loader, built as in the interrupted run.
        epoch_rng: the generator states captured when the epoch started (they fix its order).
        boundary_rng: the generator states to continue with (those at the interruption).
        batches: batches of the epoch already consumed.
        epoch: the epoch's index, for the error message.

    Raises:
        RuntimeError: the loader has fewer than `batches` batches.
    """
    restore_rng(epoch_rng, loader)
    iterator = iter(loader)
    for skipped in range(batches):
        try:
            next(iterator)
        except StopIteration:
            raise RuntimeError(f"cannot resume: the checkpoint is {batches} batches into epoch {epoch} but the "
                               f"loader has only {skipped} batches") from None
    restore_rng(boundary_rng, loader)
    return iterator
