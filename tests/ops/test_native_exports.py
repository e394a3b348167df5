"""The codes, row_stats widths and limits the compiled core exports as attributes of `kdfast._C`.

They come from one table per enum and one constant per limit in csrc/include/kdfast/types.h;
the values are part of the binding contract, so they are spelled out here once more. Also:
`has_cuda` agrees with `build_info()["cuda"]` and `has_cuda_topk` with `build_info()["cuda_topk"]`.
"""

import pytest

_C = pytest.importorskip("kdfast._C", reason="needs the compiled core")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("dtype_codes", {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}),
        ("divergence_codes", {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}),
        ("reduction_codes", {"none": 0, "sum": 1, "mean": 2, "batchmean": 3}),
        ("tail_codes", {"bucket": 0, "renormalize": 1}),
        ("combine_codes", {"sum": 0, "mixture": 1}),
        ("index_dtype_codes", {"int64": 0, "int32": 1, "int16": 2, "uint16": 3}),
    ],
)
def test_enum_codes(name, expected):
    codes = getattr(_C, name)
    assert isinstance(codes, dict)
    assert codes == expected
    assert list(codes) == list(expected)  # in code order
    assert all(type(code) is int for code in codes.values())


@pytest.mark.parametrize(
    "name, expected",
    [
        ("kd_row_stats", 8),
        ("sparse_row_stats", 8),
        ("multi_teacher_row_stats_base", 6),
        ("multi_teacher_stats_per_teacher", 3),
    ],
)
def test_row_stats_widths(name, expected):
    value = getattr(_C, name)
    assert type(value) is int
    assert value == expected


def test_cuda_limits():
    assert _C.limits == {"cuda_max_teachers": 16, "cuda_max_topk": 4096, "cuda_max_sparse_vocab": 1 << 20}
    assert all(type(value) is int for value in _C.limits.values())


def test_cuda_flags_agree_with_build_info():
    info = _C.build_info()
    assert type(_C.has_cuda) is bool
    assert type(_C.has_cuda_topk) is bool
    assert _C.has_cuda == info["cuda"]
    assert _C.has_cuda_topk == info["cuda_topk"]


def test_cuda_entry_points_refuse_an_inplace_gradient():
    """The CUDA one-pass kernels re-read the student row after writing gradient elements, so a
    gradient address equal to the student's is refused (ValueError) before any device work; the
    check runs in builds with and without the CUDA kernels."""
    import torch

    from kdfast.contract import KDOptions
    from kdfast.ops import sparse as sparse_ops

    student = torch.zeros(2, 8)
    options = KDOptions(alpha=0.5)
    indices = torch.tensor([[0, 1], [2, 3]])
    logprobs = torch.full((2, 2), -1.0)
    tail = torch.full((2,), -1.0)
    outputs = sparse_ops.forward_outputs(student, options)
    arguments = sparse_ops._sparse_arguments(student, indices, logprobs, tail, None, options)
    with pytest.raises(ValueError, match="CPU-only"):
        _C.sparse_kd_forward(*arguments, *(t.data_ptr() for t in outputs), 1, 0, 0, student.data_ptr())
    codes = _C.dtype_codes
    with pytest.raises(ValueError, match="CPU-only"):
        _C.kd_forward(student.data_ptr(), codes["float32"], 8, student.data_ptr(), codes["float32"], 8, 0, 2, 8,
                      0, 2, 1.0, 0.5, 0.5, 0.0, 1.0, -100, *(t.data_ptr() for t in outputs), 1, 0, 0,
                      student.data_ptr(), False)
