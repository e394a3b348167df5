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
- An optimizer step updates the parameters of the optimizer, which should include those of
  the student and those a loss module asks for with `trainable_parameters()` (the FitNets
  regressor of `kdfast.methods.build_method`; the default optimizer includes both). All of
  them get the same treatment: their gradients are summed over the step's micro-batches,
  divided by the number of micro-batches, and clipped together to `max_grad_norm`.
- Optimizers held by the loss module (the adversarial discriminator's, which steps inside
  every training call of the loss) step once per micro-batch on that micro-batch's gradient
  alone, so nothing of theirs is accumulated or divided; during `fit` each of them is
  clipped to `max_grad_norm` separately, just before its own step.
- Checkpoints are single files written to a temporary file in the same directory, sealed
  with the SHA-256 of their bytes (stored as the archive's zip comment, so `torch.load`
  still reads them), synced, then moved over the destination with `os.replace`: a
  checkpoint path always holds either the previous complete checkpoint or the new one.
  Loading verifies the checksum first: a damaged, truncated, empty or foreign file raises
  `CheckpointError` (a ValueError) naming it and restores nothing; a checkpoint written
  before the seal existed loads with a warning that it cannot be verified. They hold the state as of the last
  completed optimizer step: student, optimizer, scheduler, the loss's `state_dict()` when
  it is an `nn.Module` (None for a plain function), the `state_dict()` of every optimizer
  and learning-rate scheduler the loss module holds (by attribute path, e.g.
  `"adversary.optimizer"`), counters, history and every rank's generator states.
  `load_checkpoint` restores all of them; a checkpoint without loss entries leaves the
  loss as it is.

`DataFreeDistiller` (a `Distiller`) trains without a data loader against one teacher with a
`kdfast.methods.DataFreeKD`: `fit_data_free(steps)` alternates student updates and generator
steps on generated inputs; its checkpoints add nothing new to the format (the generator is
the loss module's state, its optimiser and scheduler loss-owned entries).
"""

from kdfast.trainer.batches import Batch  # noqa: F401  (the batch type, for annotations)
from kdfast.trainer.checkpoint import CHECKPOINT_FORMAT, CheckpointError, atomic_save  # noqa: F401  (format tag)
from kdfast.trainer.data_free import DataFreeDistiller
from kdfast.trainer.distiller import Callback, Distiller
from kdfast.trainer.rng import seed_everything

__all__ = ["Callback", "CheckpointError", "DataFreeDistiller", "Distiller", "atomic_save", "seed_everything"]
