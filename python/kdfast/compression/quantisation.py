"""Quantisation-aware training (QAT) of a student with torchao's fake quantisation.

`prepare_qat(model, scheme)` swaps every `nn.Linear` of `model` (in place) for torchao's
`FakeQuantizedLinear`, which rounds weights (and, for the `a8*` schemes, activations) to the
scheme's integer grid in the forward pass and lets gradients through the rounding
(straight-through estimator). The prepared model trains like any float model, with any kdfast
loss, through `kdfast.Distiller` or a plain loop, and checkpoints like one (its state_dict
has the same keys as the float model's). `convert_qat(model)` then replaces the fake
quantisation by real integer weights (torchao tensor subclasses holding int8 storage and
scales); the converted model computes what the fake-quantised one computed. `quantise_ptq`
quantises a float model directly (post-training quantisation, the baseline QAT improves on).

Schemes (`QuantScheme`, or one of the names in `SCHEMES`): weights int4 or int8 (or int3, int2), symmetric,
one scale per group of `group_size` input features (None: per output channel); activations
int8 asymmetric per token, computed on the fly ("dynamic"), or none (weight-only).
Only `nn.Linear` layers are quantised, all but those named in `skip`. With `strict=True` (default) a model holding other
layers with weights that would stay in float (convolutions, embeddings) is refused with a
ValueError naming them; `strict=False` leaves them in float. A Linear whose `in_features` is
not a multiple of `group_size` is always refused.

torchao is an optional dependency (the `quant` extra), imported on first use; when it is
missing the functions raise ImportError with the `pip` line that installs it.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from kdfast.contract.install import install_hint

__all__ = ["SCHEMES", "QuantScheme", "convert_qat", "is_fake_quantised", "load_torchao", "prepare_qat",
           "quantisable_layers", "quantise_ptq"]

INSTALL_HINT = install_hint("quant", ["torchao"])
SCHEME_ATTRIBUTE = "_kdfast_qat_scheme"
WEIGHT_BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8}
# Layers with weights that the scheme does not quantise: refused under strict=True.
FLOAT_ONLY = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Embedding, nn.EmbeddingBag,
              nn.MultiheadAttention, nn.RNNBase)


@dataclass(frozen=True)
class QuantScheme:
    """What the quantised student stores and computes in.

    Attributes:
        weights: "int4" or "int8" (symmetric integer weights); "int3" and "int2" for very low-bit
            students (stored, like int4, one value per int8 byte by torchao's CPU layout).
        activations: "int8" (dynamic, asymmetric, one scale per token) or None (weight-only).
        group_size: input features sharing one weight scale; None for one scale per output row.
    """

    weights: str = "int4"
    activations: Optional[str] = "int8"
    group_size: Optional[int] = 32

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_BITS:
            raise ValueError(f"weights must be one of {sorted(WEIGHT_BITS)}, got {self.weights!r}")
        if self.activations not in ("int8", None):
            raise ValueError(f"activations must be 'int8' or None (weight-only), got {self.activations!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int or None (per channel), got {self.group_size!r}")

    @property
    def name(self) -> str:
        prefix = "a8" if self.activations else ""
        group = f"g{self.group_size}" if self.group_size else "pc"
        return f"{prefix}w{WEIGHT_BITS[self.weights]}-{group}"

    def torchao_config(self) -> Any:
        """The torchao `quantize_` config (post-training form) this scheme stands for."""
        quantization = load_torchao()
        granularity = importlib.import_module("torchao.quantization.granularity")
        dtype = getattr(torch, self.weights)
        grain = granularity.PerGroup(self.group_size) if self.group_size else granularity.PerAxis(0)
        if self.activations == "int8":
            return quantization.Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=grain)
        return quantization.IntxWeightOnlyConfig(weight_dtype=dtype, granularity=grain)


SCHEMES: Dict[str, QuantScheme] = {
    "a8w4": QuantScheme("int4", "int8", 32),
    "a8w8": QuantScheme("int8", "int8", None),
    "a8w2": QuantScheme("int2", "int8", None),
    "w4": QuantScheme("int4", None, 32),
    "w8": QuantScheme("int8", None, None),
}


def as_scheme(scheme: Union[str, QuantScheme]) -> QuantScheme:
    """A `QuantScheme` from itself or from a name in `SCHEMES`."""
    if isinstance(scheme, QuantScheme):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; use a QuantScheme or one of {sorted(SCHEMES)}")
    return SCHEMES[scheme]


def load_torchao() -> Any:
    """Import and return `torchao.quantization`, or raise ImportError with the install line.

    On a CPU-only torch, torchao logs that its CUDA kernels cannot load; those lines are
    silenced during the import (the CPU paths used here do not need them).
    """
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module("torchao.quantization")
    except ImportError as error:
        raise ImportError(f"quantisation-aware training needs torchao: {INSTALL_HINT}") from error
    finally:
        logger.setLevel(level)


def _qat_module() -> Any:
    load_torchao()
    return importlib.import_module("torchao.quantization.qat")


def is_fake_quantised(model: nn.Module) -> bool:
    """True when `model` holds torchao fake-quantised layers (prepared by `prepare_qat`, not converted)."""
    return any(type(module).__name__.startswith("FakeQuantized") for module in model.modules())


def quantisable_layers(model: nn.Module, scheme: Union[str, QuantScheme] = "a8w4", strict: bool = True,
                       skip: Sequence[str] = ()) -> List[str]:
    """Names of the `nn.Linear` layers `scheme` quantises in `model`: all of them but those named in
    `skip` (names from `named_modules()`, kept in float, e.g. an lm_head tied to the embedding).

    Raises:
        ValueError: a Linear's `in_features` is not a multiple of the scheme's `group_size`;
            with `strict`, the model holds layers with weights that would stay in float (named);
            the model holds no Linear at all; `skip` names a module that is not a Linear of the model.
    """
    scheme = as_scheme(scheme)
    linear, float_only = [], []
    modules = dict(model.named_modules())
    unknown = [name for name in skip if not isinstance(modules.get(name), nn.Linear)]
    if unknown:
        raise ValueError(f"skip names modules that are not nn.Linear layers of the model: {', '.join(unknown)}")
    for name, module in model.named_modules():
        if name in skip:
            continue
        if type(module).__name__.startswith("FakeQuantized"):
            raise ValueError(f"layer {name!r} is already fake-quantised: prepare_qat runs once per model")
        if isinstance(module, nn.Linear):
            if scheme.group_size and module.in_features % scheme.group_size:
                raise ValueError(f"layer {name!r} has in_features={module.in_features}, not a multiple of "
                                 f"group_size={scheme.group_size}; use a group size that divides it or None")
            linear.append(name)
        elif isinstance(module, FLOAT_ONLY):
            float_only.append(f"{name} ({type(module).__name__})")
    if strict and float_only:
        raise ValueError(f"only nn.Linear layers are quantised; these would stay in float: {', '.join(float_only)}. "
                         "Pass strict=False to keep them in float.")
    if not linear:
        raise ValueError("the model has no nn.Linear layer to quantise")
    return linear


def _only(names: List[str]):
    wanted = set(names)
    # torchao calls the filter with (module, fully qualified name)
    return lambda module, fqn: isinstance(module, nn.Linear) and fqn in wanted


def prepare_qat(model: nn.Module, scheme: Union[str, QuantScheme] = "a8w4", strict: bool = True,
                skip: Sequence[str] = ()) -> List[str]:
    """Insert fake quantisation into every `nn.Linear` of `model` not named in `skip`, in place.

    Parameters keep their names, shapes and float32 dtype (the optimizer and checkpoints see
    the same tensors); the forward pass uses their quantised values (weights rounded to the
    scheme's grid, activations `[..., in_features]` rounded per token for the a8 schemes). The
    scheme is recorded on the model for `convert_qat`. Returns the names of the prepared layers.
    Raises ValueError for the cases of `quantisable_layers` and ImportError without torchao.
    """
    scheme = as_scheme(scheme)
    names = quantisable_layers(model, scheme, strict, skip)
    config = scheme.torchao_config()
    load_torchao().quantize_(model, _qat_module().QATConfig(config, step="prepare"), filter_fn=_only(names))
    setattr(model, SCHEME_ATTRIBUTE, scheme)  # what convert_qat must use (copied by copy.deepcopy)
    return names


def convert_qat(model: nn.Module, scheme: Union[str, QuantScheme, None] = None) -> nn.Module:
    """Turn a model prepared by `prepare_qat` into the real quantised model, in place.

    Each prepared Linear's weight becomes a torchao tensor holding int8 values in the scheme's
    range (e.g. [-8, 7] for int4) with float32 scales per group or row; the outputs equal the
    fake-quantised model's up to float rounding. `scheme` defaults to the one `prepare_qat`
    used; another one is refused. Returns `model` (in eval mode).
    Raises ValueError when `model` was not prepared for QAT or `scheme` differs from the prepared one.
    """
    prepared = {name for name, module in model.named_modules() if type(module).__name__.startswith("FakeQuantized")}
    if not prepared:
        raise ValueError("convert_qat needs a model prepared by prepare_qat (it holds no fake-quantised layer)")
    recorded = getattr(model, SCHEME_ATTRIBUTE, None)
    if scheme is None and recorded is None:
        raise ValueError("this model was not prepared by prepare_qat: pass the scheme it was prepared with")
    chosen = as_scheme(scheme) if scheme is not None else recorded
    if recorded is not None and chosen != recorded:
        raise ValueError(f"the model was prepared for scheme {recorded.name}, not {chosen.name}")
    qat = _qat_module()
    # only the fake-quantised layers are converted (layers skipped by prepare_qat stay float)
    load_torchao().quantize_(model, qat.QATConfig(chosen.torchao_config(), step="convert"),
                             filter_fn=lambda module, fqn: isinstance(module, (qat.FakeQuantizedLinear, nn.Linear))
                             and fqn in prepared)
    return model.eval()


def quantise_ptq(model: nn.Module, scheme: Union[str, QuantScheme] = "a8w4", strict: bool = True,
                 skip: Sequence[str] = ()) -> nn.Module:
    """Post-training quantisation of a float `model`, in place: the same integer model
    `convert_qat` produces, without training under fake quantisation first. Returns `model` (eval mode)."""
    scheme = as_scheme(scheme)
    names = quantisable_layers(model, scheme, strict, skip)
    load_torchao().quantize_(model, scheme.torchao_config(), filter_fn=_only(names))
    return model.eval()
