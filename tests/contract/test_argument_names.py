"""Error messages name the caller's function and arguments, whichever entry point was called.

`fused_linear_kd_loss` builds on the dense and sparse checks, `sparse_kd_loss` on the dense
ones; their messages must still say `fused_linear_kd_loss: ... student_hidden ...` or
`sparse_kd_loss: ...`, never another function's name or an argument the caller did not pass
(`student_logits` for the fused linear loss). The checks take the names as an
`ArgumentNames` parameter.
"""

from __future__ import annotations

import re

import pytest
import torch

import kdfast
from kdfast.contract import validation
from kdfast.functional import fused_linear_kd_loss, kd_loss, sparse_kd_loss

ROWS, HIDDEN, VOCAB = 6, 5, 11


def _fused_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 3, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    teacher = torch.randn(2, 3, VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (2, 3), generator=generator)
    return hidden, weight, teacher, labels


def _message(error_type, call) -> str:
    with pytest.raises(error_type) as raised:
        call()
    return str(raised.value)


FUSED_CASES = {
    "labels dtype": (TypeError, lambda h, w, t, y: fused_linear_kd_loss(h, w, t, y.int(), alpha=0.5),
                     r"fused_linear_kd_loss: labels must have dtype torch.int64"),
    "labels shape": (ValueError, lambda h, w, t, y: fused_linear_kd_loss(h, w, t, y[:1], alpha=0.5),
                     r"fused_linear_kd_loss: labels.shape=\(1, 3\) must equal the leading shape of student_hidden "
                     r"\(2, 3\) \(student_hidden.shape=\(2, 3, 5\)\)"),
    "labels not a tensor": (TypeError, lambda h, w, t, y: fused_linear_kd_loss(h, w, t, [0, 1], alpha=0.5),
                            r"fused_linear_kd_loss: labels must be a torch.Tensor"),
    "alpha without labels": (ValueError, lambda h, w, t, y: fused_linear_kd_loss(h, w, t, None, alpha=0.5),
                             r"fused_linear_kd_loss: alpha=0.5 > 0 .* labels must be given"),
    "divergence": (ValueError, lambda h, w, t, y: fused_linear_kd_loss(h, w, t, y, divergence="kl"),
                   r"fused_linear_kd_loss: divergence must be one of"),
    "temperature": (ValueError, lambda h, w, t, y: fused_linear_kd_loss(h, w, t, y, temperature=-1.0),
                    r"fused_linear_kd_loss: temperature must be finite and in \[1e-20, 1e\+20\]"),
    "tail": (ValueError, lambda h, w, t, y: fused_linear_kd_loss(h, w, t, y, tail="drop"),
             r"fused_linear_kd_loss: tail must be one of"),
    "teacher dtype": (TypeError, lambda h, w, t, y: fused_linear_kd_loss(h, w, t.long(), y),
                      r"fused_linear_kd_loss: teacher must be a floating tensor"),
    "soft labels vocabulary": (ValueError, lambda h, w, t, y: fused_linear_kd_loss(
        h, w, kdfast.compress_topk(torch.randn(2, 3, VOCAB + 1), 3), y),
        r"fused_linear_kd_loss: the student has vocab size 11 \(student_weight.shape\[0\]\) but the soft labels "
        r"were made for V=12"),
    "soft labels rows": (ValueError, lambda h, w, t, y: fused_linear_kd_loss(
        h, w, kdfast.compress_topk(t[:1], 3), y),
        r"fused_linear_kd_loss: soft labels have leading \(row\) shape \(1, 3\) but student_hidden has \(2, 3\)"),
    "soft labels temperature": (ValueError, lambda h, w, t, y: fused_linear_kd_loss(
        h, w, kdfast.compress_topk(t, 3, temperature=2.0), y, temperature=1.0),
        r"fused_linear_kd_loss: temperature=1.0 differs from the soft labels' temperature"),
    "labels out of range": (ValueError, lambda h, w, t, y: fused_linear_kd_loss(h, w, t, y + VOCAB, alpha=0.5),
                            r"fused_linear_kd_loss: labels out of range: found label \d+ .* V=11"),
    "soft labels labels dtype": (TypeError, lambda h, w, t, y: fused_linear_kd_loss(
        h, w, kdfast.compress_topk(t, 3), y.int(), alpha=0.5), r"fused_linear_kd_loss: labels must have dtype"),
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_linear_errors_name_its_own_arguments(case):
    error_type, call, pattern = FUSED_CASES[case]
    message = _message(error_type, lambda: call(*_fused_inputs()))
    assert re.search(pattern, message), message
    assert "student_logits" not in message and not message.startswith("kd_loss")


SPARSE_CASES = {
    "labels dtype": (TypeError, lambda s, soft, y: sparse_kd_loss(s, soft, y.int(), alpha=0.5),
                     r"sparse_kd_loss: labels must have dtype torch.int64"),
    "labels shape": (ValueError, lambda s, soft, y: sparse_kd_loss(s, soft, y[:2], alpha=0.5),
                     r"sparse_kd_loss: labels.shape=\(2,\) must equal the leading shape of student_logits"),
    "alpha": (ValueError, lambda s, soft, y: sparse_kd_loss(s, soft, y, alpha=2.0),
              r"sparse_kd_loss: alpha must be in \[0, 1\]"),
    "label smoothing": (ValueError, lambda s, soft, y: sparse_kd_loss(s, soft, y, label_smoothing=1.0),
                        r"sparse_kd_loss: label_smoothing must be in \[0, 1\)"),
    "student dtype": (TypeError, lambda s, soft, y: sparse_kd_loss(s.long(), soft, y),
                      r"sparse_kd_loss: student_logits must be a floating tensor"),
    "not soft labels": (TypeError, lambda s, soft, y: sparse_kd_loss(s, soft.logprobs, y),
                        r"sparse_kd_loss: soft_labels must be a kdfast.SoftLabels"),
}


@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_sparse_errors_name_sparse_kd_loss(case):
    error_type, call, pattern = SPARSE_CASES[case]
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(ROWS, VOCAB, generator=generator)
    soft = kdfast.compress_topk(torch.randn(ROWS, VOCAB, generator=generator), 4)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    message = _message(error_type, lambda: call(student, soft, labels))
    assert re.search(pattern, message), message


def test_dense_messages_are_unchanged_by_default():
    student, teacher = torch.randn(ROWS, VOCAB), torch.randn(ROWS, VOCAB)
    message = _message(TypeError, lambda: kd_loss(student, teacher, torch.zeros(ROWS, dtype=torch.int32), alpha=0.5))
    assert message.startswith("kd_loss: labels must have dtype torch.int64")


@pytest.mark.parametrize("names", [validation.KD_NAMES, validation.MULTI_TEACHER_NAMES,
                                   validation.ArgumentNames("my_loss", "student_scores", "teacher_scores")],
                         ids=lambda names: names.function)
def test_check_kd_inputs_uses_the_names_given(names):
    student, teacher = torch.randn(ROWS, VOCAB), torch.randn(ROWS, VOCAB + 1)
    message = _message(ValueError, lambda: validation.check_kd_inputs(
        student, teacher, None, divergence="forward_kl", temperature=1.0, alpha=0.0, beta=0.5, ignore_index=-100,
        reduction="mean", label_smoothing=0.0, names=names))
    assert message.startswith(f"{names.function}: {names.teacher} has vocab size {VOCAB + 1} but {names.student}")
    assert f"{names.student}.shape=({ROWS}, {VOCAB})" in message
