"""The peers the drop-ins mirror, loaded from their installed sources when present (else None).

Only the loss definitions are loaded, so that they run on a CPU-only torch without the peers'
heavy package imports: torchtune 0.6.1's `modules/loss/kd_losses.py` (its package import needs
a torchao version it pins), TRL's `GKDTrainer.generalized_jsd_loss` (its module imports
`datasets`) compiled from the installed source, and torchdistill's `KDLoss` by plain import.
Liger-Kernel needs Triton and CUDA, so it is never loaded; its conventions are tested against
float64 formulas only.
"""

import ast
import importlib.util
import pathlib

import torch
import torch.nn.functional as F


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def torchtune_losses():
    root = _package_dir("torchtune")
    path = root / "modules" / "loss" / "kd_losses.py" if root else None
    if path is None or not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("peer_torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trl_generalized_jsd_loss():
    root = _package_dir("trl")
    path = root / "experimental" / "gkd" / "gkd_trainer.py" if root else None
    if path is None or not path.exists():
        return None
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "generalized_jsd_loss"),
                None)
    if node is None:
        return None
    node.decorator_list = []
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    return namespace["generalized_jsd_loss"]


def torchdistill_kd_loss():
    try:
        from torchdistill.losses.mid_level import KDLoss
    except Exception:  # not installed, or its imports fail on this machine
        return None
    return KDLoss


def assert_close(actual, expected, dtype, what=""):
    """Agreement within the accuracy the student's dtype allows (values computed in float32).

    Relative to the largest expected magnitude: 2e-5 for float32; 3e-2 for bfloat16, whose
    gradients (and, for the fused linear loss, logits) are rounded to 8 significant bits
    (Liger's own bfloat16 tests use rtol 5e-2)."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().clamp_min(1e-30) if expected.numel() else 1.0
    tol = 2e-5 if dtype in (torch.float32, torch.float64) else 3e-2
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    err = (actual - expected).abs().masked_fill(both_nan, 0)
    assert not torch.isnan(err).any() and float(err.max()) <= tol * float(scale) + 1e-7, (
        f"{what}: max error {float(err.max()):.3g} vs scale {float(scale):.3g}")
