"""Classic knowledge-distillation methods in plain PyTorch.

Public names only. Logit-level losses (`logit_mse_loss`, `dkd_loss`), feature-level
losses (`hint_loss`/`HintLoss`, `attention_transfer_loss`, `similarity_preserving_loss`),
relational KD (`rkd_distance_loss`, `rkd_angle_loss`, `relational_kd_loss`), adversarial
KD (`Discriminator`, `AdversarialKD`), data-free adversarial KD with a generator of inputs
(`Generator`, `DataFreeKD`), multi-teacher KD (`multi_teacher_kd_loss`),
`FeatureCapture`, which records intermediate outputs by module name with forward hooks,
and a registry (`build_method(name, ...)`, `available_methods()`) that turns a method name
into a loss module usable by `kdfast.Distiller`.
Every loss treats teacher inputs as constants, computes in float32 (float64 for float64
inputs) and documents its paper, formula, shapes, reductions and defaults.
"""

from kdfast.methods.adversarial import AdversarialKD, Discriminator
from kdfast.methods.data_free import DataFreeKD, Generator
from kdfast.methods.feature import (
    HintLoss,
    attention_map,
    attention_transfer_loss,
    hint_loss,
    similarity_preserving_loss,
)
from kdfast.methods.hooks import FeatureCapture
from kdfast.methods.logit import dkd_loss, logit_mse_loss
from kdfast.methods.multi_teacher import multi_teacher_kd_loss
from kdfast.methods.registry import METHODS, DistillationMethod, MethodSpec, available_methods, build_method
from kdfast.methods.relational import relational_kd_loss, rkd_angle_loss, rkd_distance_loss

__all__ = [
    "METHODS",
    "DistillationMethod",
    "MethodSpec",
    "available_methods",
    "build_method",
    "AdversarialKD",
    "Discriminator",
    "DataFreeKD",
    "Generator",
    "FeatureCapture",
    "HintLoss",
    "attention_map",
    "attention_transfer_loss",
    "dkd_loss",
    "hint_loss",
    "logit_mse_loss",
    "multi_teacher_kd_loss",
    "relational_kd_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_preserving_loss",
]
