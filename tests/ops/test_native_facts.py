"""The ops layer reads the compiled core's codes and limits once, and never calls into it to decide a path.

`kdfast.ops._native.facts()` is read from attributes `kdfast._C` exports; the device predicates
the losses consult on every call (`has_cuda_kernels`, the top-k kernels' availability, the CUDA
limits) must not call `build_info()` (a pybind function that rebuilds a dict per call and that
torch.compile cannot trace), and must compile away under `torch.compile(fullgraph=True)`.
"""

import pytest
import torch

from kdfast.contract.options import COMBINE_MODES, DIVERGENCES, REDUCTIONS, TAIL_MODES
from kdfast.ops import _native
from kdfast.ops import sparse as sparse_ops

pytestmark = pytest.mark.skipif(not _native.native_available(), reason="needs the compiled core")


def test_mode_names_agree_with_the_core():
    facts = _native.facts()
    assert set(facts.divergence_codes) == set(DIVERGENCES)
    assert set(facts.reduction_codes) == set(REDUCTIONS)
    assert set(facts.tail_codes) == set(TAIL_MODES)
    assert set(facts.combine_codes) == set(COMBINE_MODES)
    assert set(facts.dtype_codes) == {torch.float32, torch.bfloat16, torch.float16, torch.float64}
    assert set(facts.index_dtype_codes) == {torch.int64, torch.int32, torch.int16, torch.uint16}
    assert facts.has_cuda == bool(_native.native_module().build_info()["cuda"])


def test_device_predicates_do_not_call_build_info(monkeypatch):
    calls = []
    core = _native.native_module()
    original = core.build_info

    def counting_build_info():
        calls.append(1)
        return original()

    monkeypatch.setattr(core, "build_info", counting_build_info)
    for _ in range(3):
        _native.has_cuda_kernels()
        _native.has_cuda_topk_kernels()
        sparse_ops.uses_kernels(torch.device("cuda"))
        _native.cuda_limit("max_teachers")
    assert calls == []


def test_device_predicates_compile_without_graph_break():
    torch._dynamo.reset()

    def step(x):
        scale = 2.0 if _native.has_cuda_kernels() else 3.0
        if sparse_ops.uses_kernels(torch.device("cuda")) and _native.cuda_limit("max_topk") > 0:
            scale = scale + 1.0
        return x * scale + _native.row_stats_width("multi_teacher", 2)

    x = torch.randn(4)
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x), step(x))
