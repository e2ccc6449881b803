"""Optimizers: LAMB and LARS with every variant as a flag, the optimizer registry, presets, parameter groups."""
from ._base import local_tensor
from .backward import StepInBackward, step_in_backward
from .factory import create_optimizer
from .lamb import Lamb, LambHyper, lamb_coefficients
from .lars import Lars, LarsHyper
from .param_groups import bias_or_norm, describe_groups, is_1d, is_bias, is_norm, param_groups
from .presets import PRESETS, Preset, describe_presets, get_preset
from .registry import OPTIMIZERS, OptimizerInfo, optimizer_info, optimizer_names
from .trust_ratio import lars_2017_local_lr, trust_ratio

__all__ = [
    "Lamb", "Lars", "LambHyper", "LarsHyper", "create_optimizer", "optimizer_names", "optimizer_info",
    "OPTIMIZERS", "OptimizerInfo", "param_groups", "describe_groups", "PRESETS", "Preset", "get_preset",
    "describe_presets", "trust_ratio", "lars_2017_local_lr", "lamb_coefficients", "bias_or_norm", "is_bias",
    "is_norm", "is_1d", "local_tensor", "step_in_backward", "StepInBackward",
]
