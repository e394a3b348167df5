"""Distillation into quantised and pruned students.

- Quantisation-aware training with torchao's fake quantisation (`prepare_qat`, `convert_qat`,
  `quantise_ptq`; schemes int8 dynamic activations with int4 or int8 weights, or weight-only),
  trained with any kdfast loss through `kdfast.Distiller` or a plain loop.
- Magnitude pruning, unstructured or 2:4, on a schedule (`prepare_pruning`, the
  `PruningSchedule` Distiller callback, or `apply_masks` in one shot; `finish_pruning`), with
  KD in the recovery phase.
- `distil_into_quantised(model, loader)`: the float model teaches its quantised copy, in one call.
- `model_bytes`, `nonzero_parameters`, `latency_ms`: what the compressed student costs.

torchao is optional (the `quant` extra) and imported on first use; pruning needs only torch.
"""

from kdfast.compression.measure import latency_ms, model_bytes, nonzero_parameters
from kdfast.compression.pruning import (
    PATTERNS,
    PruningSchedule,
    apply_masks,
    finish_pruning,
    mask_2_4,
    mask_unstructured,
    prepare_pruning,
    pruned_layers,
    sparsity,
)
from kdfast.compression.quantisation import (
    SCHEMES,
    QuantScheme,
    convert_qat,
    is_fake_quantised,
    load_torchao,
    prepare_qat,
    quantisable_layers,
    quantise_ptq,
)
from kdfast.compression.self_distil import distil_into_quantised, evaluate_against

__all__ = ["PATTERNS", "SCHEMES", "PruningSchedule", "QuantScheme", "apply_masks", "convert_qat",
           "distil_into_quantised", "evaluate_against", "finish_pruning", "is_fake_quantised", "latency_ms",
           "load_torchao", "mask_2_4", "mask_unstructured", "model_bytes", "nonzero_parameters", "prepare_pruning",
           "prepare_qat", "pruned_layers", "quantisable_layers", "quantise_ptq", "sparsity"]
