"""Loss modules validate their options when they are built, with the functional call's message.

`kdfast.KDLoss(divergence="kl")` must fail at construction, not on the first call. For
every loss module and each kind of invalid option, the constructor raises the exception the
functional call raises for the same option, with the same message (up to the function name
that opens it, for the multi-teacher loss, whose dense path checks through `kd_loss`).
Valid options, including boundary values, are accepted.
"""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast import functional

ROWS, VOCAB, HIDDEN = 5, 9, 4

COMMON_BAD_OPTIONS = [
    dict(divergence="kl"),
    dict(reduction="average"),
    dict(temperature="2"),
    dict(alpha=1.5),
    dict(alpha=float("nan")),
    dict(divergence="jsd", beta=1.0),
    dict(label_smoothing=1.0),
    dict(ignore_index=1.5),
]
DENSE_TEMPERATURES = [dict(temperature=0.0), dict(temperature=float("inf"))]
MODULE_BAD_OPTIONS = {
    "KDLoss": COMMON_BAD_OPTIONS + DENSE_TEMPERATURES,
    "SparseKDLoss": COMMON_BAD_OPTIONS + [dict(tail="drop")],
    "MultiTeacherKDLoss": COMMON_BAD_OPTIONS + DENSE_TEMPERATURES + [
        dict(combine="average"), dict(tail="drop"), dict(weights=[1.0, -1.0]), dict(weights=[0.0, 0.0]),
        dict(weights=[1.0, float("nan")]), dict(weights=["a", "b"])],
    "FusedLinearKDLoss": COMMON_BAD_OPTIONS + DENSE_TEMPERATURES + [
        dict(tail="drop"), dict(chunk_size=0), dict(chunk_size=2.5), dict(softcap=-1.0), dict(softcap=float("inf")),
        dict(vocab_mapping="pad"), dict(vocab_mapping=torch.zeros(VOCAB, dtype=torch.int32))],
}
CASES = [pytest.param(module, options, id=f"{module}-{'-'.join(f'{k}={v!r}' for k, v in options.items())}")
         for module, bad in MODULE_BAD_OPTIONS.items() for options in bad]


def _functional_call(module: str, options: dict):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(ROWS, VOCAB, generator=generator)
    teacher = torch.randn(ROWS, VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    soft = kdfast.compress_topk(teacher, 3)
    if module == "KDLoss":
        return lambda: functional.kd_loss(student, teacher, labels, **options)
    if module == "SparseKDLoss":
        return lambda: functional.sparse_kd_loss(student, soft, labels, **options)
    if module == "MultiTeacherKDLoss":
        teachers = [soft, soft] if "tail" in options else [teacher, teacher * 0.5]
        return lambda: functional.multi_teacher_kd_loss(student, teachers, labels, **options)
    hidden, weight = torch.randn(ROWS, HIDDEN, generator=generator), torch.randn(VOCAB, HIDDEN, generator=generator)
    return lambda: functional.fused_linear_kd_loss(hidden, weight, teacher, labels, **options)


def _without_function(message: str) -> str:
    head, _, rest = message.partition(": ")
    return rest if head.endswith("kd_loss") else message


@pytest.mark.parametrize("module, options", CASES)
def test_invalid_option_raises_at_construction_like_the_functional_call(module, options):
    with pytest.raises((TypeError, ValueError)) as built:
        getattr(kdfast, module)(**options)
    with pytest.raises((TypeError, ValueError)) as called:
        _functional_call(module, options)()
    assert type(built.value) is type(called.value)
    if module == "MultiTeacherKDLoss":
        assert _without_function(str(built.value)) == _without_function(str(called.value))
    else:
        assert str(built.value) == str(called.value)
    assert any(name in str(built.value) for name in options)


@pytest.mark.parametrize("module", list(MODULE_BAD_OPTIONS))
def test_messages_open_with_the_modules_function(module):
    function = {"KDLoss": "kd_loss", "SparseKDLoss": "sparse_kd_loss", "MultiTeacherKDLoss": "multi_teacher_kd_loss",
                "FusedLinearKDLoss": "fused_linear_kd_loss"}[module]
    with pytest.raises(ValueError, match=rf"^{function}: divergence must be one of"):
        getattr(kdfast, module)(divergence="kl")


def test_multi_teacher_weights_must_be_one_per_teacher_at_construction():
    with pytest.raises(ValueError, match=r"weights .* must have shape \[M\]"):
        kdfast.MultiTeacherKDLoss(weights=torch.ones(2, ROWS))


@pytest.mark.parametrize("module, options", [
    ("KDLoss", dict(alpha=1.0, label_smoothing=0.999, temperature=1e-3)),
    ("KDLoss", dict(divergence="jsd", beta=1e-6, reduction="none")),
    ("KDLoss", dict(divergence="tvd", beta=0.0)),  # beta is only checked for jsd
    ("SparseKDLoss", dict(temperature=None, tail="renormalize", reduction="batchmean")),
    ("SparseKDLoss", dict(temperature=2.0, alpha=0.0)),
    ("MultiTeacherKDLoss", dict(weights=torch.tensor([0.0, 1.0]), combine="mixture")),
    ("MultiTeacherKDLoss", dict(weights=[1, 2, 3], tail="renormalize")),
    ("FusedLinearKDLoss", dict(chunk_size=1, softcap=30.0, vocab_mapping="truncate")),
    ("FusedLinearKDLoss", dict(vocab_mapping=torch.arange(VOCAB), temperature=None)),
])
def test_valid_options_are_accepted(module, options):
    built = getattr(kdfast, module)(**options)
    assert isinstance(built, torch.nn.Module)

