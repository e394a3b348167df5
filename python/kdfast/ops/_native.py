"""Lazy access to the compiled core and the integer codes of its enums.

`native_module()` imports `kdfast._C` on first use and raises a clear ImportError naming
the fix when it is missing; importing kdfast itself never fails for that reason. The codes
below mirror csrc/include/kdfast/types.h and are part of the binding contract.
"""

from __future__ import annotations

import functools

import torch

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3}
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2, "batchmean": 3}


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from kdfast import _C
    except ImportError as error:  # pragma: no cover - depends on the installation
        return None, error
    return _C, None


def native_available() -> bool:
    """True when the compiled core `kdfast._C` can be imported."""
    return _load()[0] is not None


def native_module():
    """The compiled core; raises ImportError with the reason when it is missing."""
    module, error = _load()
    if module is None:
        raise ImportError(
            "kdfast's compiled kernels (kdfast._C) could not be loaded: "
            f"{error}. Reinstall kdfast (pip install --force-reinstall kdfast, or "
            "pip install -e . in a source checkout); kdfast.reference.* works without them."
        ) from error
    return module


def has_cuda_kernels() -> bool:
    """True when the compiled core was built with CUDA kernels."""
    module = _load()[0]
    return bool(module is not None and module.build_info()["cuda"])


def device_and_stream(tensor: torch.Tensor) -> tuple[int, int]:
    """(device_index, stream handle) for the core: (-1, 0) on the CPU."""
    if tensor.device.type == "cuda":
        index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
        return index, torch.cuda.current_stream(index).cuda_stream
    return -1, 0


def compute_dtype(student: torch.Tensor) -> torch.dtype:
    """The kernels' compute (and loss) dtype: float64 for a float64 student, else float32."""
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def divergence_scale(temperature: float, t2_scale: bool) -> float:
    """tau of the loss contract: T^2 when t2_scale, else 1."""
    return temperature * temperature if t2_scale else 1.0
