"""Logging hooks of `kdfast.Distiller`: the `Callback` base class and its dispatch.

A callback is any object with some of `on_step`, `on_eval` and `on_epoch_end`, each called
as `hook(distiller, metrics)` with a dict of Python numbers; missing hooks are skipped.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable

__all__ = ["Callback", "call_callbacks"]


class Callback:
    """Logging hooks. Subclass and override any of them; plain objects with some of these
    methods work too. They run on the main process only (rank 0 under DDP).

    - `on_step(distiller, metrics)` after every optimizer step; metrics has `step`, `epoch`,
      `loss` (mean training loss of the step's micro-batches on this process), `lr`,
      `samples_per_second` and, with clipping, `grad_norm` (the joint L2 norm, before
      clipping, of the gradients the step applies: the student's and any other parameters
      of the optimizer).
    - `on_eval(distiller, metrics)` after every evaluation inside `fit`; metrics are those of
      `Distiller.evaluate` plus `step` and `epoch`.
    - `on_epoch_end(distiller, metrics)` after every completed epoch; metrics has `epoch`
      (the number of completed epochs), `step` and `loss` (mean step loss over the epoch).
    """

    def on_step(self, distiller: Any, metrics: Dict[str, float]) -> None:
        pass

    def on_eval(self, distiller: Any, metrics: Dict[str, float]) -> None:
        pass

    def on_epoch_end(self, distiller: Any, metrics: Dict[str, float]) -> None:
        pass


def call_callbacks(callbacks: Iterable[Any], hook: str, distiller: Any, metrics: Dict[str, float]) -> None:
    """Call `callback.<hook>(distiller, metrics)` on every callback that has that method."""
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(distiller, metrics)
