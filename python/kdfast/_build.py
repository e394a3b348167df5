"""`kdfast.build_info()`: what the compiled core contains and what this machine runs.

Reads the description compiled into `kdfast._C` (CPU instruction-set variants and the one
selected at run time, OpenMP, CUDA version and architectures) and adds the Python-side
facts (torch version and thread count, visible CUDA devices). Never raises: a missing
native library is reported in the result.
"""

from __future__ import annotations

from typing import Any

import torch

from kdfast.ops import _native


def build_info() -> dict[str, Any]:
    """Build and runtime description of kdfast.

    Returns:
        dict with keys: `native` (bool: compiled core importable), `native_error` (str, when
        not), `compiler`, `cpu_variants` (compiled instruction-set variants, best first),
        `cpu_variant_selected` (the one used on this machine), `openmp`,
        `openmp_max_threads`, `cuda` (CUDA kernels compiled), `cuda_version`,
        `cuda_architectures`, `torch_version`, `torch_num_threads` (threads kdfast's CPU
        kernels use per call), `cuda_devices` (names of visible GPUs).
    """
    info: dict[str, Any] = {"native": _native.native_available()}
    if info["native"]:
        info.update(_native.native_module().build_info())
    else:
        try:
            _native.native_module()
        except ImportError as error:
            info["native_error"] = str(error)
    info["torch_version"] = torch.__version__
    info["torch_num_threads"] = torch.get_num_threads()
    info["cuda_devices"] = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return info
