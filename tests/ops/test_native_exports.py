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
