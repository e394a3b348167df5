"""`Distiller`, the distillation loop (with `Callback`, its logging hooks, from `callbacks`).

The contract at the boundary (batches, model outputs, the loss call, gradient accumulation
and clipping, checkpoints) is the one documented in `kdfast.trainer`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdfast.losses import KDLoss
from kdfast.trainer.batches import (
    Batch,
    batch_size,
    call_model,
    mean_teacher_logits,
    model_device,
    set_sampler_epoch,
    split_batch,
    to_device,
)
from kdfast.trainer.callbacks import Callback, call_callbacks
from kdfast.trainer.checkpoint import (
    CHECKPOINT_FORMAT,
    atomic_save,
    check_loss_state,
    gather_from_ranks,
    load_loss_state,
    loss_state,
    owned_optimizers,
    read_checkpoint,
)
from kdfast.trainer.evaluation import add_batch, metrics_from_totals, new_totals
from kdfast.trainer.gradients import average_and_clip, clip_at_each_step, step_parameters, trainable_parameters
from kdfast.trainer.rng import capture_rng, replay_epoch, restore_rng, seed_everything
from kdfast.trainer.settings import check_loop_settings, planned_steps, teachers_and_weights

__all__ = ["Callback", "Distiller"]


class Distiller:
    """Train `student` to match frozen `teachers` under a KD loss.

    Args:
        student: the model being trained; put it on its device before constructing (under DDP,
            `cuda:LOCAL_RANK` or CPU). Its logits are `[..., V]`.
        teachers: one module, a sequence of modules, or None/empty when every batch carries
            `teacher_logits` (offline soft labels). Teachers are put in eval mode, their
            parameters get `requires_grad=False`, and they run under `torch.no_grad()` on the
            device they are on; their logits are moved to the student's device.
        loss: callable `(student_logits, teacher_logits, labels) -> scalar` (mean over valid rows).
            Default `kdfast.KDLoss(temperature=4.0, alpha=0.5)`: forward KL at T = 4 scaled by
            T², averaged half-and-half with hard-label cross-entropy (labels required). A loss
            module with state (a `kdfast.methods.build_method` method) is checkpointed with it.
        optimizer: default `torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)` over the
            student's parameters and, when the loss has `trainable_parameters()`, those.
        scheduler: optional learning-rate scheduler, stepped after every optimizer step
            (`scheduler_interval="step"`, default) or after every epoch (`"epoch"`).
        teacher_weights: one non-negative weight per teacher (default: equal). The teacher
            signal is the weighted mean of the teachers' logits, weights normalised to sum 1.
            Because softmax ignores a per-row constant, this equals the weighted mean of the
            teachers' log-probabilities at any temperature (a normalised geometric mixture).
        accumulation_steps: micro-batches per optimizer step (default 1). Gradients of the
            micro-batch losses are summed and divided by the number of micro-batches in the
            step, so each step uses the mean of its micro-batch losses; a shorter last group in
            an epoch is averaged over its own count. This holds for every parameter the
            optimizer updates (the student's and, say, a FitNets regressor's).
        max_grad_norm: clip the global L2 norm of the gradients of the student and of every
            other parameter the optimizer updates to this value before each step (default
            None: no clipping). Optimizers the loss module holds (an adversarial
            discriminator's) are clipped to the same value before each of their own steps
            inside `fit`, each separately.
        bf16: run student and teacher forward passes under `torch.autocast(dtype=bfloat16)`
            on the student's device type (default False). The loss itself runs outside autocast.
        seed: if given, `seed_everything(seed)` runs at the start of a fresh `fit` (not when
            resuming, where the checkpoint's generator states are restored instead).
        checkpoint_path: file that `fit` writes checkpoints to (atomically): every
            `checkpoint_every` steps, after every epoch, at the end, and when interrupted by
            KeyboardInterrupt (single process). Default None: no automatic checkpoints.
        checkpoint_every: optimizer steps between checkpoints (default None: epochs only).
        eval_every: optimizer steps between evaluations inside `fit` (default None: after
            every epoch only, when an eval loader is given).
        progress: show a tqdm bar with loss, learning rate, samples/s and ETA (default True).
        callbacks: objects with `on_step` / `on_eval` / `on_epoch_end` (see `Callback`).
        ddp: wrap the student in DistributedDataParallel. None (default) wraps when
            `torch.distributed` is initialised with world size > 1; True requires it. Release
            the Distiller before `torch.distributed.destroy_process_group()`: a DDP wrapper that
            outlives its process group can hang in its destructor.

    Attributes:
        step: optimizer steps done.
        epoch: epochs completed.
        history: dict with lists `"train"` (one dict per step), `"eval"` and `"epoch"`; saved in checkpoints.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: Union[nn.Module, Sequence[nn.Module], None] = None,
        loss: Optional[Callable[..., torch.Tensor]] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler: Optional[Any] = None,
        *,
        teacher_weights: Optional[Sequence[float]] = None,
        scheduler_interval: str = "step",
        accumulation_steps: int = 1,
        max_grad_norm: Optional[float] = None,
        bf16: bool = False,
        seed: Optional[int] = None,
        checkpoint_path: Optional[Union[str, os.PathLike]] = None,
        checkpoint_every: Optional[int] = None,
        eval_every: Optional[int] = None,
        progress: bool = True,
        callbacks: Iterable[Any] = (),
        ddp: Optional[bool] = None,
    ) -> None:
        teacher_list, weights = teachers_and_weights(student, teachers, teacher_weights)
        check_loop_settings(accumulation_steps, max_grad_norm, scheduler_interval, checkpoint_path, checkpoint_every,
                            eval_every)

        self.student = student
        self.teachers = teacher_list
        self.teacher_weights = weights
        for teacher in self.teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        if loss is None:
            loss = KDLoss(temperature=4.0, alpha=0.5)
        self.loss = loss
        self.ignore_index = int(getattr(loss, "ignore_index", -100))
        if optimizer is None:
            optimizer = torch.optim.AdamW(trainable_parameters(student, loss), lr=1e-3, weight_decay=0.01)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.bf16 = bool(bf16)
        self.seed = seed
        self.checkpoint_path = os.fspath(checkpoint_path) if checkpoint_path is not None else None
        self.checkpoint_every = checkpoint_every
        self.eval_every = eval_every
        self.progress = progress
        self.callbacks = list(callbacks)
        self.device = model_device(student)

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if ddp and not distributed:
            raise RuntimeError("ddp=True needs torch.distributed initialised with world size > 1 "
                               "(launch with torchrun and call torch.distributed.init_process_group)")
        self.distributed = distributed if ddp is None else bool(ddp)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if self.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(student, device_ids=device_ids)
        else:
            self.model = student

        self.step = 0
        self.epoch = 0
        self.history: Dict[str, List[Dict[str, float]]] = {"train": [], "eval": [], "epoch": []}
        # Position and generator states at the last optimizer-step boundary (what a checkpoint
        # records), and generator states at the start of the current epoch (to replay its order).
        self._batch_in_epoch = 0
        self._boundary_rng: Optional[Dict[str, Any]] = None
        self._epoch_rng: Optional[Dict[str, Any]] = None
        self._pending_resume = False
        self._updating = False
        # The loss's own optimizers step inside the loss call: their state at the last step
        # boundary is kept while a group of micro-batches is under way.
        self._owned_optimizers = owned_optimizers(loss, self.optimizer)
        self._boundary_loss_state: Optional[Dict[str, Any]] = None

    @property
    def is_main(self) -> bool:
        """True on the process that logs, shows progress and writes checkpoints (rank 0)."""
        return self.rank == 0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def teacher_logits(self, inputs: Any) -> torch.Tensor:
        """Teacher signal for `inputs`: the (weighted) mean of the teachers' logits.

        Returns logits `[..., V]` on the student's device: the teacher's own dtype with one
        teacher, float32 with several. Raises RuntimeError when there are no teachers.
        """
        with self._autocast():
            return mean_teacher_logits(self.teachers, self.teacher_weights, inputs, self.device)

    def _teacher_and_student(self, batch: Batch, model: nn.Module):
        inputs, labels, teacher_logits = split_batch(batch)
        inputs = to_device(inputs, self.device)
        if labels is not None:
            labels = labels.to(self.device, non_blocking=True)
        if teacher_logits is None:
            teacher_logits = self.teacher_logits(inputs)
        else:
            teacher_logits = teacher_logits.to(self.device, non_blocking=True)
        with self._autocast():
            student_logits = call_model(model, inputs)
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} must have the same shape [..., V]"
            )
        return inputs, labels, teacher_logits, student_logits

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Batch]) -> Dict[str, float]:
        """Evaluate the student on `loader` (under DDP: on every rank's shard, summed).

        Returns a dict of Python floats:
            `loss`: the loss object's value, averaged over all valid rows (each batch's mean
                weighted by its number of valid rows; every row when labels are absent);
            `agreement`: fraction of valid rows where the student's and the teacher's argmax match;
            `rows`: number of valid rows;
            with labels also `accuracy` (student argmax == label), `teacher_accuracy` and `ce`
            (the student's mean hard-label cross-entropy at temperature 1).
        Rows whose label equals the loss's `ignore_index` are left out. The student's mode
        (train/eval) is restored afterwards.
        """
        was_training = self.student.training
        self.student.eval()
        totals = new_totals()
        try:
            for batch in loader:
                _, labels, teacher_logits, student_logits = self._teacher_and_student(batch, self.student)
                add_batch(totals, student_logits, teacher_logits, labels, self.loss, self.ignore_index)
        finally:
            self.student.train(was_training)
        if self.distributed:
            device_totals = totals.to(self.device)
            dist.all_reduce(device_totals)
            totals = device_totals.cpu()
        return metrics_from_totals(totals)

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume, for this process (generator states of this rank only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            **(self._boundary_loss_state if self._boundary_loss_state is not None else loss_state(self.loss)),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "world_size": self.world_size,
            "rng_boundary": [self._boundary_rng if self._boundary_rng is not None else capture_rng()],
            "rng_epoch_start": [self._epoch_rng],
            "history": self.history,
        }

    def save_checkpoint(self, path: Union[str, os.PathLike, None] = None) -> None:
        """Write a checkpoint atomically (see `atomic_save`) to `path` (default `checkpoint_path`).

        It holds the student's state_dict, optimizer, scheduler, the loss module's state_dict
        and the states of the optimisers and schedulers it owns, step, epoch, the position in
        the current epoch, the history and the random-generator states of every rank, all as of
        the last completed optimizer step. Under DDP every rank must call this (the generator
        states are gathered); rank 0 writes the file.
        """
        path = path if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path: pass one or set Distiller(checkpoint_path=...)")
        state = self.state_dict()
        if self.distributed:
            states = gather_from_ranks((state["rng_boundary"][0], state["rng_epoch_start"][0]), self.world_size)
            state["rng_boundary"] = [item[0] for item in states]
            state["rng_epoch_start"] = [item[1] for item in states]
        if self.is_main:
            atomic_save(state, path)
        if self.distributed:
            dist.barrier()

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Restore a checkpoint written by `save_checkpoint`; the next `fit` resumes from it.

        Restores the student, optimizer, scheduler, the loss module and the optimisers and
        schedulers it owns, counters, history and this rank's random generator states. A
        checkpoint without loss entries leaves the loss as it is.

        Raises:
            FileNotFoundError: nothing at `path`. CheckpointError (a ValueError): the file is
                damaged, truncated, empty or not a Distiller checkpoint (see `read_checkpoint`).
            ValueError: it does not fit this Distiller (no scheduler state for its scheduler;
                loss state for another kind of loss). Nothing is restored in either case.
        """
        path = os.fspath(path)
        state = read_checkpoint(path)
        if self.scheduler is not None and state["scheduler"] is None:
            raise ValueError(f"{path!r} has no scheduler state but this Distiller has a scheduler")
        check_loss_state(self.loss, state, path)
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        load_loss_state(self.loss, state)
        self._boundary_loss_state = None
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self._batch_in_epoch = int(state["batch_in_epoch"])
        self.history = state["history"]
        # Under another world size the data order changes anyway: reuse rank 0's states.
        rank = self.rank if len(state["rng_boundary"]) == self.world_size else 0
        self._boundary_rng = state["rng_boundary"][rank]
        self._epoch_rng = state["rng_epoch_start"][rank]
        restore_rng(self._boundary_rng)
        self._pending_resume = self._batch_in_epoch > 0

    def _call_callbacks(self, hook: str, metrics: Dict[str, float]) -> None:
        if self.is_main:
            call_callbacks(self.callbacks, hook, self, metrics)

    def _evaluate_in_fit(self, eval_loader: Iterable[Batch], train_loader: Any) -> None:
        # Evaluation must not change the training trajectory: keep the generator states.
        saved = capture_rng(train_loader)
        metrics = self.evaluate(eval_loader)
        restore_rng(saved, train_loader)
        metrics = {"step": self.step, "epoch": self.epoch, **metrics}
        self.history["eval"].append(metrics)
        self._call_callbacks("on_eval", metrics)

    def _optimizer_step(self, micro_batches: int) -> Optional[float]:
        parameters = step_parameters(self.student, self.optimizer)
        grad_norm = average_and_clip(parameters, micro_batches, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        return grad_norm

    def fit(
        self,
        train_loader: Iterable[Batch],
        epochs: int = 1,
        eval_loader: Optional[Iterable[Batch]] = None,
        max_steps: Optional[int] = None,
        resume_from: Union[str, os.PathLike, None] = None,
    ) -> Dict[str, List[Dict[str, float]]]:
        """Train until `epochs` epochs in total (or `max_steps` optimizer steps) are done.

        `epochs` and `max_steps` count from the start of training, so calling `fit` again with
        the same arguments after `load_checkpoint` (or with `resume_from`) finishes the same
        run: the data order, dropout masks and updates are bit-identical to an uninterrupted
        run on the same hardware, provided the loader is built the same way (its shuffling
        draws from torch's global generator or an explicit `generator`, which are restored).
        Under DDP use a `DistributedSampler`; its `set_epoch` is called every epoch.

        Args:
            train_loader: an iterable of batches (see the module docstring), usually a DataLoader.
            epochs: total number of epochs (default 1).
            eval_loader: evaluated after every epoch and every `eval_every` steps (default None).
            max_steps: stop after this many optimizer steps in total (default None).
            resume_from: checkpoint to load first (default None).

        Returns:
            `self.history`: `{"train": [...], "eval": [...], "epoch": [...]}`.
        """
        batches_per_epoch, total_steps = planned_steps(train_loader, epochs, self.accumulation_steps, max_steps)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif self.step == 0 and self.epoch == 0 and self._batch_in_epoch == 0 and self.seed is not None:
            seed_everything(self.seed)
        if self._boundary_rng is None:
            self._boundary_rng = capture_rng(train_loader)

        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=self.step, disable=not (self.progress and self.is_main),
                   unit="step", dynamic_ncols=True, leave=True)
        self.model.train()
        try:
            with clip_at_each_step(self._owned_optimizers, self.max_grad_norm):
                while self.epoch < epochs and (max_steps is None or self.step < max_steps):
                    finished = self._run_epoch(train_loader, batches_per_epoch, eval_loader, max_steps, bar)
                    if not finished:
                        break
                    self._end_epoch(train_loader, eval_loader)
        except KeyboardInterrupt:
            # Keep the work done up to the last completed optimizer step. Skipped when the
            # interrupt hit the update itself (the state may be half-written) and under DDP
            # (the other ranks may not reach the collective).
            if self.checkpoint_path is not None and not self._updating and not self.distributed:
                self.save_checkpoint()
                bar.write(f"interrupted: checkpoint at step {self.step} saved to {self.checkpoint_path}")
            raise
        finally:
            bar.close()
            self.optimizer.zero_grad(set_to_none=True)
        if self.checkpoint_path is not None and self._batch_in_epoch > 0:
            self.save_checkpoint()  # stopped mid-epoch by max_steps
        return self.history

    def _end_epoch(self, train_loader: Any, eval_loader: Optional[Iterable[Batch]]) -> None:
        self._updating = True
        self.epoch += 1
        self._batch_in_epoch = 0
        steps_this_epoch = [entry["loss"] for entry in self.history["train"] if entry["epoch"] == self.epoch - 1]
        if self.scheduler is not None and self.scheduler_interval == "epoch":
            self.scheduler.step()
        self._boundary_rng = capture_rng(train_loader)
        self._updating = False
        if eval_loader is not None:
            self._evaluate_in_fit(eval_loader, train_loader)
        summary = {"epoch": self.epoch, "step": self.step,
                   "loss": float(np.mean(steps_this_epoch)) if steps_this_epoch else float("nan")}
        self.history["epoch"].append(summary)
        self._call_callbacks("on_epoch_end", summary)
        if self.checkpoint_path is not None:
            self.save_checkpoint()

    def _run_epoch(self, loader, batches_per_epoch, eval_loader, max_steps, bar) -> bool:
        """One (possibly resumed) epoch. Returns True when the loader was exhausted."""
        set_sampler_epoch(loader, self.epoch)
        if self._pending_resume:
            assert self._epoch_rng is not None and self._boundary_rng is not None
            iterator = replay_epoch(loader, self._epoch_rng, self._boundary_rng, self._batch_in_epoch, self.epoch)
            self._pending_resume = False
        else:
            self._epoch_rng = capture_rng(loader)
            iterator = iter(loader)

        micro_batches = 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # read once per step
        samples = 0
        started = time.perf_counter()
        position = self._batch_in_epoch  # batches consumed, including the current group
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            position += 1
            closes_group = (micro_batches + 1 == self.accumulation_steps
                            or (batches_per_epoch is not None and position == batches_per_epoch))
            sync = (contextlib.nullcontext() if closes_group or not self.distributed
                    else self.model.no_sync())  # type: ignore[operator]
            if micro_batches == 0 and self._owned_optimizers:
                self._boundary_loss_state = copy.deepcopy(loss_state(self.loss))
            with sync:
                inputs, labels, teacher_logits, student_logits = self._teacher_and_student(batch, self.model)
                loss = self.loss(student_logits, teacher_logits, labels)
                if loss.dim() != 0:
                    raise ValueError(f"the loss must return a scalar, got shape {tuple(loss.shape)}; "
                                     "use reduction='mean'")
                loss.backward()
            loss_sum += loss.detach().double()
            samples += batch_size(inputs, student_logits)
            micro_batches += 1
            if closes_group:
                self._finish_step(micro_batches, loss_sum, samples, started, position, loader, bar)
                micro_batches, samples = 0, 0
                loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                started = time.perf_counter()
                if eval_loader is not None and self.eval_every and self.step % self.eval_every == 0:
                    self._evaluate_in_fit(eval_loader, loader)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save_checkpoint()
                if max_steps is not None and self.step >= max_steps:
                    if batches_per_epoch is not None and position == batches_per_epoch:
                        continue  # the epoch is complete too: let it end normally
                    return False
        if micro_batches > 0:  # loader without len(): close the last, shorter group
            self._finish_step(micro_batches, loss_sum, samples, started, position, loader, bar)
        return True

    def _finish_step(self, micro_batches, loss_sum, samples, started, position, loader, bar) -> None:
        self._updating = True
        grad_norm = self._optimizer_step(micro_batches)
        self._boundary_loss_state = None
        self.step += 1
        self._batch_in_epoch = position
        self._boundary_rng = capture_rng(loader)
        self._updating = False
        elapsed = max(time.perf_counter() - started, 1e-9)
        metrics = {"step": self.step, "epoch": self.epoch, "loss": loss_sum.item() / micro_batches,
                   "lr": float(self.optimizer.param_groups[0]["lr"]), "samples_per_second": samples / elapsed}
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        self.history["train"].append(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                        samples_s=f"{metrics['samples_per_second']:.0f}", refresh=False)
        self._call_callbacks("on_step", metrics)
