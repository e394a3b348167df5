"""`DataFreeDistiller`: the distillation loop without a data loader, for `kdfast.methods.DataFreeKD`.

A `Distiller` whose `fit_data_free(steps)` trains the student on inputs made by the method's
generator: each step is `student_steps` student updates on L_S (a fresh noise batch each)
followed by one generator step on L_G (`DataFreeKD.generator_step`), as in DFAD. Everything
else is the `Distiller`'s: evaluation on a real held-out loader (measurement only; it never
changes the training trajectory), callbacks, the history and the checkpoints, which hold the
student, its optimiser and scheduler, the method's `state_dict` (the generator), the
generator's optimiser and scheduler (the loss-owned entries), the step and the random-generator
states, written atomically and sealed (`kdfast.trainer.checkpoint`) every `checkpoint_every`
steps and at the end (an interrupted step saves nothing: the last checkpoint stands). Save at
step k, load and continue gives the uninterrupted run bit for bit on the same hardware.
Single process only.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from kdfast.methods.data_free import DataFreeKD
from kdfast.trainer.batches import Batch
from kdfast.trainer.distiller import Distiller
from kdfast.trainer.gradients import average_and_clip, step_parameters
from kdfast.trainer.rng import capture_rng, seed_everything

__all__ = ["DataFreeDistiller"]


class DataFreeDistiller(Distiller):
    """Train `student` against one frozen `teacher` with a `DataFreeKD` method, without data.

    Args:
        student: the model being trained, logits `[N, V]`.
        teacher: one frozen module, logits `[N, V]`, accepting the generator's inputs; put
            in eval mode (its BatchNorm running statistics are the prior's reference).
        method: a `DataFreeKD` (e.g. `kdfast.methods.build_method("data_free", ...)`).
        optimizer, scheduler: the student's (default AdamW(lr=1e-3, weight_decay=0.01));
            the scheduler steps once per step (after the step's student updates).
        batch_size: generated inputs per student update and per generator step (default 64).
        student_steps: student updates per step (default 5, as in DFAD).
        max_grad_norm: clip the student's and, separately, the generator's gradient norm
            before each of their steps (default None).
        seed, checkpoint_path, checkpoint_every, eval_every, progress, callbacks: as for
            `Distiller` (`checkpoint_every` and `eval_every` count steps).

    Attributes:
        step: steps done (generator steps).
        history: `"train"` has one dict per step with `loss` (mean L_S of the step), `discrepancy`
            (D before the generator step), `bn`, `balance`, `lr`, `generator_lr`; `"eval"` one dict
            per evaluation.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, method: DataFreeKD,
                 optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Optional[Any] = None, *,
                 batch_size: int = 64, student_steps: int = 5, max_grad_norm: Optional[float] = None,
                 seed: Optional[int] = None, checkpoint_path: Union[str, os.PathLike, None] = None,
                 checkpoint_every: Optional[int] = None, eval_every: Optional[int] = None, progress: bool = True,
                 callbacks: Iterable[Any] = ()) -> None:
        if not isinstance(method, DataFreeKD):
            raise TypeError(f"method must be a kdfast.methods.DataFreeKD (build_method('data_free', ...)), "
                            f"got {type(method).__name__}")
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be one torch.nn.Module, got {type(teacher).__name__}")
        for name, value in (("batch_size", batch_size), ("student_steps", student_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        super().__init__(student, teacher, method, optimizer, scheduler, max_grad_norm=max_grad_norm, seed=seed,
                         checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, eval_every=eval_every,
                         progress=progress, callbacks=callbacks, ddp=False)
        self.method = method
        self.batch_size = batch_size
        self.student_steps = student_steps

    def _data_free_step(self) -> Dict[str, float]:
        """`student_steps` student updates, then one generator step; returns the step's metrics."""
        teacher = self.teachers[0]
        self.student.train()
        started = time.perf_counter()
        losses: List[float] = []
        for _ in range(self.student_steps):
            loss = self.method.student_loss(self.student, teacher, self.batch_size)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_and_clip(step_parameters(self.student, self.optimizer), 1, self.max_grad_norm)
            self.optimizer.step()
            losses.append(float(loss.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        terms = self.method.generator_step(self.student, teacher, self.batch_size, self.max_grad_norm)
        elapsed = max(time.perf_counter() - started, 1e-9)
        return {"loss": sum(losses) / len(losses), "discrepancy": terms["discrepancy"], "bn": terms["bn"],
                "balance": terms["balance"], "lr": float(self.optimizer.param_groups[0]["lr"]),
                "generator_lr": float(self.method.optimizer.param_groups[0]["lr"]),
                "samples_per_second": (self.student_steps + 1) * self.batch_size / elapsed}

    def fit_data_free(self, steps: int, eval_loader: Optional[Iterable[Batch]] = None,
                      resume_from: Union[str, os.PathLike, None] = None) -> Dict[str, List[Dict[str, float]]]:
        """Train until `steps` steps in total are done (counted from the start of training).

        Args:
            steps: the budget of steps (generator steps), ≥ 1; calling again with the same
                value after `load_checkpoint` (or with `resume_from`) finishes the same run.
            eval_loader: real labelled batches, evaluated every `eval_every` steps and at the
                end (default None). Only measured: generator states are kept around it.
            resume_from: checkpoint to load first (default None).

        Returns:
            `self.history`.
        """
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif self.step == 0 and self.seed is not None:
            seed_everything(self.seed)
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        try:
            while self.step < steps:
                metrics = self._data_free_step()
                self.step += 1
                self._boundary_rng = capture_rng()
                metrics = {"step": self.step, "epoch": 0, **metrics}
                self.history["train"].append(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                self._call_callbacks("on_step", metrics)
                at_end = self.step == steps
                if eval_loader is not None and ((self.eval_every and self.step % self.eval_every == 0) or at_end):
                    self._evaluate_in_fit(eval_loader, None)
                if self.checkpoint_path is not None and (at_end or (self.checkpoint_every
                                                                    and self.step % self.checkpoint_every == 0)):
                    self.save_checkpoint()
        finally:
            bar.close()
            self.optimizer.zero_grad(set_to_none=True)
        return self.history
