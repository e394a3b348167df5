"""A thin, readable distillation loop: `Distiller`.

`Distiller` trains one student against one or more frozen teachers with a loss object
(by default `kdfast.KDLoss(temperature=4.0, alpha=0.5)`). It is a loop, not a framework:
the caller owns the models, the data loaders, the optimizer and the scheduler; the loop adds
gradient accumulation, gradient clipping, bf16 autocast, evaluation metrics (loss, accuracy,
teacher accuracy, teacher/student agreement), atomic checkpoints that resume bit-identically
mid-epoch, a progress bar, seeding, logging callbacks and DistributedDataParallel when
`torch.distributed` is initialised (e.g. under `torchrun`).

Contract at the boundary:
- A batch is a tensor (inputs only), a tuple/list `(inputs,)`, `(inputs, labels)` or
  `(inputs, labels, teacher_logits)`, or a mapping whose `"labels"` and `"teacher_logits"`
  entries are taken out and whose remaining entries are passed as keyword arguments.
  `inputs` is a tensor (`model(inputs)`), a tuple/list (`model(*inputs)`) or a mapping
  (`model(**inputs)`). Precomputed `teacher_logits` in the batch replace the live teachers.
- A model returns logits `[..., V]`: a tensor, or an object/mapping with a `logits` entry,
  or a tuple whose first element is the logits. Labels are int64 `[...]` with the logits'
  leading shape; rows whose label equals the loss's `ignore_index` are left out of metrics.
- The loss is called as `loss(student_logits, teacher_logits, labels)` and must return
  a scalar that is the mean over valid rows (the `KDLoss` default, `reduction="mean"`).
- Checkpoints are single files written to a temporary file in the same directory, synced,
  then moved over the destination with `os.replace`: a checkpoint path always holds either
  the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Callback", "Distiller", "atomic_save", "seed_everything"]

CHECKPOINT_FORMAT = "kdfast.distiller/1"

Batch = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]


# --------------------------------------------------------------------------------------
# Seeding and random-number-generator state
# --------------------------------------------------------------------------------------


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


def _loader_generators(loader: Any) -> List[torch.Generator]:
    """The explicit torch generators a DataLoader draws from (its own and its sampler's)."""
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


def _capture_rng(loader: Any = None) -> Dict[str, Any]:
    numpy_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        # Stored as plain types so that `torch.load(weights_only=True)` accepts it.
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()), int(numpy_state[2]),
                  int(numpy_state[3]), float(numpy_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "loader": [g.get_state() for g in _loader_generators(loader)] if loader is not None else [],
    }
    return state


def _restore_rng(state: Mapping[str, Any], loader: Any = None) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader is not None:
        generators = _loader_generators(loader)
        if len(generators) != len(state["loader"]):
            raise RuntimeError(
                f"the data loader has {len(generators)} explicit generator(s) but the checkpoint "
                f"recorded {len(state['loader'])}; resume with a loader built the same way"
            )
        for generator, generator_state in zip(generators, state["loader"]):
            generator.set_state(generator_state)


# --------------------------------------------------------------------------------------
# Atomic checkpoint files
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Batches and model outputs
# --------------------------------------------------------------------------------------


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {key: _to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(value, device) for value in obj)
    return obj


def _split_batch(batch: Batch) -> Tuple[Any, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Returns (inputs, labels or None, teacher_logits or None)."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        rest = {key: value for key, value in batch.items() if key not in ("labels", "teacher_logits")}
        return rest, batch.get("labels"), batch.get("teacher_logits")
    if isinstance(batch, (list, tuple)) and 1 <= len(batch) <= 3:
        items = list(batch) + [None] * (3 - len(batch))
        return items[0], items[1], items[2]
    raise TypeError(
        "a batch must be a tensor, a mapping, or a tuple/list (inputs[, labels[, teacher_logits]]); "
        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
    )


def _call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    if isinstance(inputs, Mapping):
        output = model(**inputs)
    elif isinstance(inputs, (list, tuple)):
        output = model(*inputs)
    else:
        output = model(inputs)
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"{type(model).__name__} returned {type(output).__name__}; expected logits as a tensor, "
        "an object or mapping with 'logits', or a tuple whose first element is the logits"
    )


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _batch_size(inputs: Any, logits: torch.Tensor) -> int:
    if isinstance(inputs, torch.Tensor) and inputs.dim() > 0:
        return int(inputs.shape[0])
    return int(logits.shape[0]) if logits.dim() > 1 else 1


# --------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------


class Callback:
    """Logging hooks. Subclass and override any of them; plain objects with some of these
    methods work too. They run on the main process only (rank 0 under DDP).

    - `on_step(distiller, metrics)` after every optimizer step; metrics has `step`, `epoch`,
      `loss` (mean training loss of the step's micro-batches on this process), `lr`,
      `samples_per_second` and, with clipping, `grad_norm` (the norm before clipping).
    - `on_eval(distiller, metrics)` after every evaluation inside `fit`; metrics are those of
      `Distiller.evaluate` plus `step` and `epoch`.
    - `on_epoch_end(distiller, metrics)` after every completed epoch; metrics has `epoch`
      (the number of completed epochs), `step` and `loss` (mean step loss over the epoch).
    """

    def on_step(self, distiller: "Distiller", metrics: Dict[str, float]) -> None:
        pass

    def on_eval(self, distiller: "Distiller", metrics: Dict[str, float]) -> None:
        pass

    def on_epoch_end(self, distiller: "Distiller", metrics: Dict[str, float]) -> None:
        pass


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


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
            T², averaged half-and-half with hard-label cross-entropy (labels required).
        optimizer: default `torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.01)`.
        scheduler: optional learning-rate scheduler, stepped after every optimizer step
            (`scheduler_interval="step"`, default) or after every epoch (`"epoch"`).
        teacher_weights: one non-negative weight per teacher (default: equal). The teacher
            signal is the weighted mean of the teachers' logits, weights normalised to sum 1.
            Because softmax ignores a per-row constant, this equals the weighted mean of the
            teachers' log-probabilities at any temperature (a normalised geometric mixture).
        accumulation_steps: micro-batches per optimizer step (default 1). Gradients of the
            micro-batch losses are summed and divided by the number of micro-batches in the
            step, so each step uses the mean of its micro-batch losses; a shorter last group in
            an epoch is averaged over its own count.
        max_grad_norm: clip the global L2 gradient norm to this value before each step
            (default None: no clipping).
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
        step: optimizer steps done. epoch: epochs completed. history: dict with lists
        `"train"` (one dict per step), `"eval"` and `"epoch"`; saved in checkpoints.
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
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
        if teachers is None:
            teacher_list: List[nn.Module] = []
        elif isinstance(teachers, nn.Module):
            teacher_list = [teachers]
        else:
            teacher_list = list(teachers)
        for index, teacher in enumerate(teacher_list):
            if not isinstance(teacher, nn.Module):
                raise TypeError(f"teachers[{index}] must be a torch.nn.Module, got {type(teacher).__name__}")
            if teacher is student:
                raise ValueError("the student cannot also be one of its teachers")
        if teacher_weights is not None:
            weights = [float(w) for w in teacher_weights]
            if len(weights) != len(teacher_list):
                raise ValueError(f"teacher_weights has {len(weights)} entries for {len(teacher_list)} teacher(s)")
            if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"teacher_weights must be finite, non-negative and not all zero, got {weights}")
        else:
            weights = [1.0] * len(teacher_list)
        total_weight = sum(weights) if weights else 1.0
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {max_grad_norm!r}")
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}")
        for name, value in (("checkpoint_every", checkpoint_every), ("eval_every", eval_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        if checkpoint_every is not None and checkpoint_path is None:
            raise ValueError("checkpoint_every needs a checkpoint_path")

        self.student = student
        self.teachers = teacher_list
        self.teacher_weights = [w / total_weight for w in weights]
        for teacher in self.teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        if loss is None:
            from kdfast.losses import KDLoss

            loss = KDLoss(temperature=4.0, alpha=0.5)
        self.loss = loss
        self.ignore_index = int(getattr(loss, "ignore_index", -100))
        self.optimizer = optimizer if optimizer is not None else torch.optim.AdamW(
            student.parameters(), lr=1e-3, weight_decay=0.01)
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
        self.device = _model_device(student)

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if ddp and not distributed:
            raise RuntimeError("ddp=True needs torch.distributed initialised with world size > 1 "
                               "(launch with torchrun and call torch.distributed.init_process_group)")
        self.distributed = distributed if ddp is None else bool(ddp)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

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

    # ---------------------------------------------------------------- properties
    @property
    def is_main(self) -> bool:
        """True on the process that logs, shows progress and writes checkpoints (rank 0)."""
        return self.rank == 0

    # ---------------------------------------------------------------- forward passes
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def teacher_logits(self, inputs: Any) -> torch.Tensor:
        """Teacher signal for `inputs`: the (weighted) mean of the teachers' logits.

        Returns logits `[..., V]` on the student's device: the teacher's own dtype with one
        teacher, float32 with several. Raises RuntimeError when there are no teachers.
        """
        if not self.teachers:
            raise RuntimeError("no teachers: pass teachers to Distiller or put 'teacher_logits' in every batch")
        combined: Optional[torch.Tensor] = None
        with self._autocast():
            for teacher, weight in zip(self.teachers, self.teacher_weights):
                logits = _call_model(teacher, _to_device(inputs, _model_device(teacher))).to(self.device)
                if len(self.teachers) == 1:
                    return logits
                term = logits.float() * weight
                combined = term if combined is None else combined + term
        assert combined is not None
        return combined

    def _teacher_and_student(self, batch: Batch, model: nn.Module):
        inputs, labels, teacher_logits = _split_batch(batch)
        inputs = _to_device(inputs, self.device)
        if labels is not None:
            labels = labels.to(self.device, non_blocking=True)
        if teacher_logits is None:
            teacher_logits = self.teacher_logits(inputs)
        else:
            teacher_logits = teacher_logits.to(self.device, non_blocking=True)
        with self._autocast():
            student_logits = _call_model(model, inputs)
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} must have the same shape [..., V]"
            )
        return inputs, labels, teacher_logits, student_logits

    # ---------------------------------------------------------------- evaluation
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
        totals = torch.zeros(7, dtype=torch.float64)
        # [loss_sum, rows, correct, teacher_correct, agree, ce_sum, labelled_batches]
        try:
            for batch in loader:
                _, labels, teacher_logits, student_logits = self._teacher_and_student(batch, self.student)
                student_logits = student_logits.float()
                vocab = student_logits.shape[-1]
                flat_student = student_logits.reshape(-1, vocab)
                flat_teacher = teacher_logits.float().reshape(-1, vocab)
                student_pred = flat_student.argmax(-1)
                teacher_pred = flat_teacher.argmax(-1)
                if labels is not None:
                    flat_labels = labels.reshape(-1)
                    if flat_labels.numel() != flat_student.shape[0]:
                        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(student_logits.shape)}")
                    valid = flat_labels != self.ignore_index
                    rows = int(valid.sum())
                    if rows == 0:
                        continue
                    totals[2] += (student_pred[valid] == flat_labels[valid]).sum().item()
                    totals[3] += (teacher_pred[valid] == flat_labels[valid]).sum().item()
                    totals[5] += torch.nn.functional.cross_entropy(
                        flat_student, flat_labels, ignore_index=self.ignore_index, reduction="sum").item()
                    totals[6] += 1
                else:
                    valid = torch.ones_like(student_pred, dtype=torch.bool)
                    rows = int(valid.numel())
                totals[4] += (student_pred[valid] == teacher_pred[valid]).sum().item()
                totals[0] += float(self.loss(student_logits, teacher_logits, labels)) * rows
                totals[1] += rows
        finally:
            self.student.train(was_training)
        if self.distributed:
            device_totals = totals.to(self.device)
            dist.all_reduce(device_totals)
            totals = device_totals.cpu()
        rows = totals[1].item()
        if rows == 0:
            raise ValueError("the evaluation loader produced no valid rows")
        metrics = {"loss": totals[0].item() / rows, "agreement": totals[4].item() / rows, "rows": int(rows)}
        if totals[6].item() > 0:
            metrics.update(accuracy=totals[2].item() / rows, teacher_accuracy=totals[3].item() / rows,
                           ce=totals[5].item() / rows)
        return metrics

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume, for this process (generator states of this rank only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "world_size": self.world_size,
            "rng_boundary": [self._boundary_rng if self._boundary_rng is not None else _capture_rng()],
            "rng_epoch_start": [self._epoch_rng],
            "history": self.history,
        }

    def save_checkpoint(self, path: Union[str, os.PathLike, None] = None) -> None:
        """Write a checkpoint atomically (see `atomic_save`) to `path` (default `checkpoint_path`).

        It holds the student's state_dict, optimizer, scheduler, step, epoch, the position in
        the current epoch, the history and the random-generator states of every rank, all as of
        the last completed optimizer step. Under DDP every rank must call this (the generator
        states are gathered); rank 0 writes the file.
        """
        path = path if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("no checkpoint path: pass one or set Distiller(checkpoint_path=...)")
        state = self.state_dict()
        if self.distributed:
            # Serialised to bytes first: all_gather_object cannot carry tensors reliably.
            buffer = io.BytesIO()
            torch.save((state["rng_boundary"][0], state["rng_epoch_start"][0]), buffer)
            gathered: List[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, buffer.getvalue())
            states = [torch.load(io.BytesIO(item), weights_only=True) for item in gathered]
            state["rng_boundary"] = [item[0] for item in states]
            state["rng_epoch_start"] = [item[1] for item in states]
        if self.is_main:
            atomic_save(state, path)
        if self.distributed:
            dist.barrier()

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Restore a checkpoint written by `save_checkpoint`; the next `fit` resumes from it.

        Restores the student, optimizer, scheduler, counters, history and this rank's random
        generator states. Raises FileNotFoundError if `path` is missing and ValueError if it is
        not a Distiller checkpoint.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint at {path!r}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path!r} is not a kdfast Distiller checkpoint (expected format {CHECKPOINT_FORMAT!r})")
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            if state["scheduler"] is None:
                raise ValueError(f"{path!r} has no scheduler state but this Distiller has a scheduler")
            self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self._batch_in_epoch = int(state["batch_in_epoch"])
        self.history = state["history"]
        if len(state["rng_boundary"]) == self.world_size:
            rank = self.rank
        else:  # different world size: the data order changes anyway; reuse rank 0's states
            rank = 0
        self._boundary_rng = state["rng_boundary"][rank]
        self._epoch_rng = state["rng_epoch_start"][rank]
        _restore_rng(self._boundary_rng)
        self._pending_resume = self._batch_in_epoch > 0

    # ---------------------------------------------------------------- training
    def _call_callbacks(self, hook: str, metrics: Dict[str, float]) -> None:
        if not self.is_main:
            return
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, metrics)

    def _evaluate_in_fit(self, eval_loader: Iterable[Batch], train_loader: Any) -> None:
        # Evaluation must not change the training trajectory: keep the generator states.
        saved = _capture_rng(train_loader)
        metrics = self.evaluate(eval_loader)
        _restore_rng(saved, train_loader)
        metrics = {"step": self.step, "epoch": self.epoch, **metrics}
        self.history["eval"].append(metrics)
        self._call_callbacks("on_eval", metrics)

    def _optimizer_step(self, micro_batches: int) -> Optional[float]:
        if micro_batches > 1:
            for parameter in self.student.parameters():
                if parameter.grad is not None:
                    parameter.grad.div_(micro_batches)
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm))
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
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be an int >= 1 or None, got {max_steps!r}")
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif self.step == 0 and self.epoch == 0 and self._batch_in_epoch == 0 and self.seed is not None:
            seed_everything(self.seed)
        if self._boundary_rng is None:
            self._boundary_rng = _capture_rng(train_loader)

        try:
            batches_per_epoch: Optional[int] = len(train_loader)  # type: ignore[arg-type]
        except TypeError:
            batches_per_epoch = None
        total_steps = None
        if batches_per_epoch is not None:
            total_steps = epochs * math.ceil(batches_per_epoch / self.accumulation_steps)
        if max_steps is not None:
            total_steps = max_steps if total_steps is None else min(total_steps, max_steps)

        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=self.step, disable=not (self.progress and self.is_main),
                   unit="step", dynamic_ncols=True, leave=True)
        self.model.train()
        try:
            while self.epoch < epochs and (max_steps is None or self.step < max_steps):
                finished = self._run_epoch(train_loader, batches_per_epoch, eval_loader, max_steps, bar)
                if not finished:
                    break
                self._updating = True
                self.epoch += 1
                self._batch_in_epoch = 0
                steps_this_epoch = [entry["loss"] for entry in self.history["train"]
                                    if entry["epoch"] == self.epoch - 1]
                if self.scheduler is not None and self.scheduler_interval == "epoch":
                    self.scheduler.step()
                self._boundary_rng = _capture_rng(train_loader)
                self._updating = False
                if eval_loader is not None:
                    self._evaluate_in_fit(eval_loader, train_loader)
                summary = {"epoch": self.epoch, "step": self.step,
                           "loss": float(np.mean(steps_this_epoch)) if steps_this_epoch else float("nan")}
                self.history["epoch"].append(summary)
                self._call_callbacks("on_epoch_end", summary)
                if self.checkpoint_path is not None:
                    self.save_checkpoint()
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

    def _run_epoch(self, loader, batches_per_epoch, eval_loader, max_steps, bar) -> bool:
        """One (possibly resumed) epoch. Returns True when the loader was exhausted."""
        for sampler in (getattr(loader, "sampler", None),
                        getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
                break
        if self._pending_resume:
            assert self._epoch_rng is not None and self._boundary_rng is not None
            _restore_rng(self._epoch_rng, loader)
            iterator = iter(loader)
            for skipped in range(self._batch_in_epoch):
                try:
                    next(iterator)
                except StopIteration:
                    raise RuntimeError(
                        f"cannot resume: the checkpoint is {self._batch_in_epoch} batches into epoch "
                        f"{self.epoch} but the loader has only {skipped} batches") from None
            _restore_rng(self._boundary_rng, loader)
            self._pending_resume = False
        else:
            self._epoch_rng = _capture_rng(loader)
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
            with sync:
                inputs, labels, teacher_logits, student_logits = self._teacher_and_student(batch, self.model)
                loss = self.loss(student_logits, teacher_logits, labels)
                if loss.dim() != 0:
                    raise ValueError(f"the loss must return a scalar, got shape {tuple(loss.shape)}; "
                                     "use reduction='mean'")
                loss.backward()
            loss_sum += loss.detach().double()
            samples += _batch_size(inputs, student_logits)
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
        self.step += 1
        self._batch_in_epoch = position
        self._boundary_rng = _capture_rng(loader)
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
