"""Input validation of every kdfast loss, from metadata only where it can be.

`check_kd_inputs`, `check_compress_inputs` and `check_sparse_kd_inputs` look only at types,
shapes, dtypes, devices and Python-scalar options, never at tensor data, so they run inside
`torch.compile(fullgraph=True)` without a graph break or a device synchronisation; the
functional API, the reference implementation and the custom ops' callers share them.
`check_label_range` and `check_labels` read label data and serve the reference path and the
method losses. Wrong tensor dtypes and argument types raise `TypeError`; every other bad
input raises `ValueError`. Each message names the argument and shows the shapes, dtypes or
values seen; the loss checks take an `ArgumentNames` (the function the user called and its
argument names: `KD_NAMES`, `SPARSE_NAMES`, `MULTI_TEACHER_NAMES`, `FUSED_LINEAR_NAMES`), so an
entry point built on another's checks reports its own names. `check_kd_options`,
`check_tail_options` and the fused linear checks look at options only: the loss modules run
them when they are built. The `require_*` functions are the small checks of the method family.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Iterable, Optional

import torch

from kdfast.contract.options import DIVERGENCES, REDUCTIONS, TAIL_MODES, TEMPERATURE_RANGE, temperature_in_range
from kdfast.contract.softlabels import INDEX_DTYPE_MAX_VOCAB, INDEX_DTYPES, SoftLabels, smallest_index_dtype

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

def check_temperature(function: str, temperature) -> None:
    """Raises ValueError unless temperature is finite and in TEMPERATURE_RANGE."""
    low, high = TEMPERATURE_RANGE
    if not temperature_in_range(temperature):
        raise ValueError(f"{function}: temperature must be finite and in [{low:g}, {high:g}] (T > 0; the float32 "
                         f"kernels' range), got temperature={temperature!r}")


@dataclasses.dataclass(frozen=True)
class ArgumentNames:
    """How the caller's function and arguments are called in the messages of the checks.

    Attributes:
        function: the public function the message starts with (e.g. "fused_linear_kd_loss").
        student: the argument whose leading shape [...] the labels must have.
        teacher: the teacher argument.
        vocab: where the student's vocabulary size V comes from (e.g. "student_weight.shape[0]").
    """

    function: str = "kd_loss"
    student: str = "student_logits"
    teacher: str = "teacher_logits"
    vocab: str = "student_logits.shape[-1]"


KD_NAMES = ArgumentNames()
SPARSE_NAMES = ArgumentNames("sparse_kd_loss", teacher="soft_labels")
MULTI_TEACHER_NAMES = ArgumentNames("multi_teacher_kd_loss")
FUSED_LINEAR_NAMES = ArgumentNames("fused_linear_kd_loss", "student_hidden", "teacher", "student_weight.shape[0]")


def _shape(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape)


def _is_real_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_logits_tensor(name: str, logits, names: ArgumentNames = KD_NAMES) -> None:
    """A floating [..., V] tensor with V >= 1, named `name` in the message of `names.function`."""
    fn = names.function
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must be a floating tensor (float32, bfloat16, float16 or float64), "
            f"got dtype {logits.dtype} ({name}.shape={_shape(logits)})"
        )
    if logits.dim() == 0:
        raise ValueError(f"{fn}: {name} must have shape [..., V] with at least one dimension, got a 0-dim tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"{fn}: {name} has vocab size 0 ({name}.shape={_shape(logits)}); V must be at least 1")


def _check_number_option(name: str, value, names: ArgumentNames) -> None:
    if not _is_real_number(value):
        raise TypeError(f"{names.function}: {name} must be a Python number, got {type(value).__name__} ({value!r})")


def check_kd_options(
    *,
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    names: ArgumentNames = KD_NAMES,
) -> None:
    """Validates the scalar options of a KD loss (no tensors): what a loss module checks when built.

    Args:
        divergence: one of `DIVERGENCES`.
        temperature: finite T in TEMPERATURE_RANGE, [1e-20, 1e20].
        alpha: cross-entropy weight in [0, 1].
        beta: JSD mixture weight in (0, 1); checked only for divergence "jsd".
        ignore_index: integer label value marking rows that contribute nothing.
        reduction: one of `REDUCTIONS`.
        label_smoothing: ε in [0, 1).
        names: the function named in the messages.

    Raises:
        TypeError: a scalar option has the wrong Python type.
        ValueError: an option value outside its range or set.
    """
    fn = names.function
    if divergence not in DIVERGENCES:
        raise ValueError(f"{fn}: divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")

    _check_number_option("temperature", temperature, names)
    check_temperature(fn, temperature)

    _check_number_option("alpha", alpha, names)
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"{fn}: alpha must be in [0, 1], got alpha={alpha!r}")

    _check_number_option("beta", beta, names)
    if divergence == "jsd" and not (0.0 < beta < 1.0):
        raise ValueError(f"{fn}: beta must be in (0, 1) for divergence 'jsd', got beta={beta!r}")

    _check_number_option("label_smoothing", label_smoothing, names)
    if not (0.0 <= label_smoothing < 1.0):
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1), got label_smoothing={label_smoothing!r}")

    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"{fn}: ignore_index must be a Python int, "
                        f"got {type(ignore_index).__name__} ({ignore_index!r})")


def check_tail(tail: str, names: ArgumentNames = SPARSE_NAMES) -> None:
    """`tail` is one of `TAIL_MODES` (the tail rule of SoftLabels teachers)."""
    if tail not in TAIL_MODES:
        raise ValueError(f"{names.function}: tail must be one of {TAIL_MODES}, got {tail!r}")


def check_tail_options(*, tail: str, temperature: Optional[float], names: ArgumentNames = SPARSE_NAMES,
                       **options) -> None:
    """`check_kd_options` for a loss that may take SoftLabels: `tail` is one of `TAIL_MODES` and
    the temperature may be None (the soft labels' own; a number must equal it, checked per call)."""
    check_tail(tail, names)
    if temperature is not None and not _is_real_number(temperature):
        raise TypeError(f"{names.function}: temperature must be a Python number or None, "
                        f"got {type(temperature).__name__}")
    check_kd_options(temperature=1.0 if temperature is None else temperature, names=names, **options)


def check_labels_metadata(student: torch.Tensor, labels: Optional[torch.Tensor], alpha: float,
                          names: ArgumentNames = KD_NAMES) -> None:
    """Labels of a KD loss from metadata: None (then α must be 0) or int64 with the leading
    shape `student.shape[:-1]` on the student's device. `student` is the tensor named
    `names.student` (logits [..., V], or hidden states [..., H] for the fused linear loss)."""
    fn, student_name = names.function, names.student
    student_shape = _shape(student)
    if labels is None:
        if _is_real_number(alpha) and alpha > 0:
            raise ValueError(
                f"{fn}: alpha={alpha!r} > 0 weights a hard-label cross-entropy, "
                f"so labels must be given (got labels=None)"
            )
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a torch.Tensor of dtype torch.int64 or None, "
                        f"got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(
            f"{fn}: labels must have dtype torch.int64 (torch.long), got {labels.dtype} "
            f"(labels.shape={_shape(labels)}); other integer dtypes are not accepted, convert with labels.long()"
        )
    if labels.shape != student.shape[:-1]:
        raise ValueError(
            f"{fn}: labels.shape={_shape(labels)} must equal the leading shape of {student_name} "
            f"{student_shape[:-1]} ({student_name}.shape={student_shape})"
        )
    if labels.device != student.device:
        raise ValueError(
            f"{fn}: labels must be on the same device as {student_name}, got labels on {labels.device} "
            f"and {student_name} on {student.device}"
        )


def check_kd_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    divergence: str,
    temperature: float,
    alpha: float,
    beta: float,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    names: ArgumentNames = KD_NAMES,
) -> None:
    """Validates the arguments of a dense KD loss call using metadata only.

    Args:
        student_logits: floating tensor [..., V].
        teacher_logits: floating tensor with the same shape as `student_logits` (its dtype may differ).
        labels: int64 tensor with the leading shape of `student_logits`, or None.
        divergence: one of `DIVERGENCES`.
        temperature: finite T in TEMPERATURE_RANGE, [1e-20, 1e20].
        alpha: cross-entropy weight in [0, 1]; alpha > 0 requires labels.
        beta: JSD mixture weight in (0, 1); checked only for divergence "jsd".
        ignore_index: integer label value marking rows that contribute nothing.
        reduction: one of `REDUCTIONS`.
        label_smoothing: ε in [0, 1).
        names: how the messages call the function and the two logits arguments (default:
            `kd_loss(student_logits, teacher_logits, ...)`).

    Raises:
        TypeError: a logits tensor is not float32/bfloat16/float16/float64, labels are not
            int64, or a scalar option has the wrong Python type.
        ValueError: any other invalid shape, device or option value.
    """
    fn, student_name, teacher_name = names.function, names.student, names.teacher
    check_logits_tensor(student_name, student_logits, names)
    check_logits_tensor(teacher_name, teacher_logits, names)

    student_shape = _shape(student_logits)
    teacher_shape = _shape(teacher_logits)
    both_shapes = f"({student_name}.shape={student_shape}, {teacher_name}.shape={teacher_shape})"
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise ValueError(
            f"{fn}: {teacher_name} has vocab size {teacher_logits.shape[-1]} but {student_name} has "
            f"{student_logits.shape[-1]} {both_shapes}"
        )
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"{fn}: {teacher_name} has leading (row) shape {teacher_shape[:-1]} but {student_name} has "
            f"{student_shape[:-1]} {both_shapes}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"{fn}: {student_name} and {teacher_name} must be on the same device, got "
            f"{student_name} on {student_logits.device} and {teacher_name} on {teacher_logits.device}"
        )
    check_kd_options(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                     ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, names=names)
    check_labels_metadata(student_logits, labels, alpha, names)


def check_label_range(labels: Optional[torch.Tensor], vocab_size: int, ignore_index: int,
                      names: ArgumentNames = KD_NAMES) -> None:
    """Raises ValueError unless every label is `ignore_index` or lies in [0, vocab_size).

    Reads tensor data (one device synchronisation), so it is for the reference path only
    (and for callers on the CPU, where reading the labels costs no synchronisation).
    """
    if labels is None or labels.numel() == 0:
        return
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(out_of_range.any()):
        offending_value = int(labels[out_of_range].reshape(-1)[0])
        count = int(out_of_range.sum())
        raise ValueError(
            f"{names.function}: labels out of range: found label {offending_value} ({count} out-of-range label(s) "
            f"in total); labels must be in [0, {vocab_size}) for vocab size V={vocab_size}, or equal "
            f"ignore_index={ignore_index}"
        )


def check_compress_inputs(teacher_logits, k, temperature, index_dtype) -> None:
    """Validates `compress_topk` arguments from metadata only (no tensor data is read)."""
    if not isinstance(teacher_logits, torch.Tensor):
        raise TypeError(f"compress_topk: teacher_logits must be a torch.Tensor, got {type(teacher_logits).__name__}")
    if teacher_logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(
            "compress_topk: teacher_logits must be a floating tensor (float32, bfloat16, float16 or float64), got "
            f"{teacher_logits.dtype} (shape {tuple(teacher_logits.shape)})"
        )
    if teacher_logits.dim() == 0:
        raise ValueError("compress_topk: teacher_logits must have shape [..., V], got a 0-dim tensor")
    vocab_size = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"compress_topk: k must be an int, got {type(k).__name__} ({k!r})")
    if not 1 <= k <= vocab_size:
        raise ValueError(
            f"compress_topk: k must satisfy 1 <= k <= V, got k={k} and V={vocab_size} "
            f"(teacher_logits.shape={tuple(teacher_logits.shape)})"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"compress_topk: temperature must be a Python number, got {type(temperature).__name__}")
    check_temperature("compress_topk", temperature)
    if index_dtype not in INDEX_DTYPES:
        raise TypeError(f"compress_topk: index_dtype must be one of {INDEX_DTYPES}, got {index_dtype}")
    if vocab_size > INDEX_DTYPE_MAX_VOCAB[index_dtype]:
        raise ValueError(
            f"compress_topk: index_dtype {index_dtype} cannot hold indices of V={vocab_size}; "
            f"use {smallest_index_dtype(vocab_size)} or wider"
        )


def check_sparse_kd_inputs(
    student_logits,
    soft_labels,
    labels,
    *,
    divergence: str,
    temperature: Optional[float],
    alpha: float,
    beta: float,
    tail: str,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    names: ArgumentNames = SPARSE_NAMES,
    vocab_size: Optional[int] = None,
) -> float:
    """Validates `sparse_kd_loss` arguments from metadata only; returns the temperature to use.

    The dense-loss options (divergence, reduction, alpha, beta, label_smoothing, labels) are
    checked as in `check_kd_inputs`; this adds the soft-label checks.

    Args:
        student_logits: the tensor named `names.student`, whose leading shape [...] the soft
            labels and labels must have: the student logits [..., V] (or the hidden states
            [..., H] of the fused linear loss, which passes `vocab_size`).
        vocab_size: the student's V when it is not `student_logits.shape[-1]`; None to read it there.
        names: how the messages call the function and its arguments (default: `sparse_kd_loss`).
    """
    fn, student_name = names.function, names.student
    if not isinstance(soft_labels, SoftLabels):
        raise TypeError(f"{fn}: {names.teacher} must be a kdfast.SoftLabels, got {type(soft_labels).__name__}")
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"{fn}: {student_name} must be a torch.Tensor, got {type(student_logits).__name__}")
    check_tail(tail, names)
    if temperature is None:
        temperature = soft_labels.temperature
    else:
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"{fn}: temperature must be a Python number or None, got {type(temperature).__name__}")
        if not math.isclose(float(temperature), soft_labels.temperature, rel_tol=1e-6, abs_tol=0.0):
            raise ValueError(
                f"{fn}: temperature={temperature!r} differs from the soft labels' temperature "
                f"{soft_labels.temperature!r}; top-k log-probabilities computed at one temperature cannot be "
                "rescaled to another without the teacher's raw logits, which SoftLabels does not keep. "
                "Pass temperature=None, or compress the teacher again at the temperature you want."
            )
        temperature = float(temperature)
    check_logits_tensor(student_name, student_logits, names)
    student_shape = tuple(student_logits.shape)
    vocab = student_shape[-1] if vocab_size is None else vocab_size
    if vocab != soft_labels.vocab_size:
        raise ValueError(
            f"{fn}: the student has vocab size {vocab} ({names.vocab}) but the soft labels were made for "
            f"V={soft_labels.vocab_size} ({student_name}.shape={student_shape})"
        )
    if tuple(soft_labels.shape) != student_shape[:-1]:
        raise ValueError(
            f"{fn}: soft labels have leading (row) shape {tuple(soft_labels.shape)} but {student_name} has "
            f"{student_shape[:-1]} ({student_name}.shape={student_shape}, "
            f"soft_labels.indices.shape={tuple(soft_labels.indices.shape)})"
        )
    if soft_labels.device != student_logits.device:
        raise ValueError(f"{fn}: soft labels are on {soft_labels.device} but {student_name} is on "
                         f"{student_logits.device}")
    check_kd_options(divergence=divergence, temperature=temperature, alpha=alpha, beta=beta,
                     ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, names=names)
    check_labels_metadata(student_logits, labels, alpha, names)
    return temperature


def check_chunk_size(chunk_size, names: ArgumentNames = FUSED_LINEAR_NAMES) -> None:
    """None or a positive int: the rows per chunk of the fused linear loss."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"{names.function}: chunk_size must be None or a positive int, got {chunk_size!r}")


def check_softcap(softcap, names: ArgumentNames = FUSED_LINEAR_NAMES) -> None:
    """None or a finite number c > 0 (logits soft-capped to c·tanh(s/c))."""
    if softcap is not None and not (_is_real_number(softcap) and 0 < softcap < float("inf")):
        raise ValueError(f"{names.function}: softcap must be None or a finite number > 0, got {softcap!r}")


def check_vocab_mapping_kind(vocab_mapping, names: ArgumentNames = FUSED_LINEAR_NAMES) -> None:
    """None, "truncate" or an int64 tensor (its shape and values are checked against the vocabularies per call)."""
    if isinstance(vocab_mapping, str):
        if vocab_mapping != "truncate":
            raise ValueError(f"{names.function}: vocab_mapping must be None, 'truncate' or an int64 tensor, "
                             f"got {vocab_mapping!r}")
    elif vocab_mapping is not None and (not isinstance(vocab_mapping, torch.Tensor)
                                        or vocab_mapping.dtype != torch.int64):
        raise TypeError(f"{names.function}: vocab_mapping must be None, 'truncate' or an int64 tensor, got "
                        f"{getattr(vocab_mapping, 'dtype', type(vocab_mapping).__name__)}")


# --------------------------------------------------------------------------------------
# Checks of the method family
# --------------------------------------------------------------------------------------


def require_float_tensor(name: str, value) -> torch.Tensor:
    """Return `value` if it is a floating-point tensor, else raise TypeError naming it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def require_positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def require_non_negative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def require_choice(name: str, value: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def require_same_device(**tensors: Optional[torch.Tensor]) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        seen = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all inputs must be on one device, got {seen}")


def check_labels(labels, leading_shape: torch.Size, vocab_size: int, ignore_index: int,
                 device: torch.device, logits_name: str = "student_logits") -> torch.Tensor:
    """Validate int64 class labels of shape `leading_shape`; return them unchanged."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must have dtype torch.int64, got {labels.dtype} "
                        f"(labels.shape={tuple(labels.shape)}); convert with labels.long()")
    if labels.shape != leading_shape:
        raise ValueError(f"labels must have shape {tuple(leading_shape)} (the leading shape of "
                         f"{logits_name}), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {logits_name} is on {device}")
    valid = labels != ignore_index
    if bool(((labels < 0) | (labels >= vocab_size))[valid].any()):
        bad = labels[valid & ((labels < 0) | (labels >= vocab_size))][0].item()
        raise ValueError(f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}, "
                         f"got {bad}")
    return labels
