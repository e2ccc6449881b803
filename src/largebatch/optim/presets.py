"""Named presets: the defaults of each library, as data.

Each row says which optimizer class, which flags and which parameter-group rules reproduce a library
(or a paper recipe). ``create_optimizer(name, model)`` applies them; ``largebatch presets`` prints them.
The tests compare each "reproduces a library" preset with that library where it can be installed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .param_groups import bias_or_norm, is_norm


@dataclass(frozen=True)
class Preset:
    name: str
    optimizer: str                      # "lamb" | "lars"
    options: Mapping[str, Any]          # constructor flags
    groups: Mapping[str, Any]           # param_groups() rules used when a model is given
    reproduces: str                     # what it matches, with version
    notes: str = ""
    checked_against: str | None = field(default=None)  # library the tests compare it with


def _p(name, optimizer, options, groups, reproduces, notes="", checked_against=None) -> Preset:
    return Preset(name, optimizer, MappingProxyType(dict(options)), MappingProxyType(dict(groups)),
                  reproduces, notes, checked_against)


_NO_EXCLUSIONS = {"no_weight_decay_if": None}
_BERT_EXCLUSIONS = {"no_weight_decay_if": bias_or_norm}

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in [
    _p("paper", "lamb", {}, _BERT_EXCLUSIONS,
       "LAMB, Algorithm 2 of You et al. (ICLR 2020): bias correction inside, ε=1e-6 outside √, "
       "decoupled λ=0.01 inside the ratio, φ = identity, trust ratio on every tensor",
       "Biases and LayerNorm get no weight decay (the BERT recipe)."),
    _p("nvlamb", "lamb",
       {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "bias_correction": "inside",
        "max_grad_norm": 1.0, "trust_ratio": "decayed", "grad_averaging": True},
       _BERT_EXCLUSIONS,
       "NVIDIA apex FusedLAMB defaults (use_nvlamb=False): global-gradient pre-normalisation to norm 1.0, "
       "trust ratio only on tensors with weight decay",
       "apex is CUDA-only and not installable here; the maths is apex's multi_tensor_lamb."),
    _p("torch_optimizer", "lamb",
       {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "bias_correction": "none",
        "phi": "clamp_norm", "phi_min": 0.0, "phi_max": 10.0},
       _NO_EXCLUSIONS,
       "torch-optimizer 0.3.0 `Lamb` defaults (debias=False, clamp_value=10, adam=False)",
       checked_against="torch_optimizer.Lamb"),
    _p("timm", "lamb",
       {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "bias_correction": "inside",
        "max_grad_norm": 1.0, "trust_ratio": "decayed", "grad_averaging": True},
       _BERT_EXCLUSIONS,
       "timm 1.0.31 `timm.optim.Lamb` defaults (max_grad_norm=1.0, trust_clip=False, always_adapt=False); "
       "groups as timm's create_optimizer (no decay for biases and 1-D tensors)",
       checked_against="timm.optim.Lamb"),
    _p("authors_resnet", "lamb",
       {"weight_decay": 1.5, "bias_correction": "none", "max_grad_norm": 1.0, "trust_ratio": "decayed"},
       {"no_weight_decay_if": is_norm},
       "The LAMB authors' ResNet-50 code (SPEC §4): no bias correction, decoupled λ=1.5 inside the ratio, "
       "no decay and no trust ratio for BatchNorm, biases decayed, global gradient clipping at 1.0",
       "Use with label smoothing 0.1, LR 0.04·√(batch/32768)... and 782 warmup steps at 32K (see docs)."),
    _p("lars_paper", "lars", {}, _BERT_EXCLUSIONS,
       "LARS, Algorithm 1 of You et al. (ICLR 2020): decay inside the momentum, ratio ‖x‖/‖m‖"),
    _p("lars_2017", "lars",
       {"mode": "2017", "momentum": 0.9, "weight_decay": 5e-4, "trust_coefficient": 0.001},
       {"no_weight_decay_if": bias_or_norm, "no_trust_ratio_if": bias_or_norm},
       "LARS of You, Gitman & Ginsburg 2017: local LR η_tc·‖w‖/(‖g‖+λ‖w‖+ε) inside heavy-ball momentum",
       "Biases and BatchNorm excluded from decay and adaptation, as in the common ImageNet recipes."),
    _p("larc", "lars",
       {"mode": "2017", "larc_clip": True, "momentum": 0.9, "weight_decay": 5e-4, "trust_coefficient": 0.02,
        "eps": 1e-8},
       {"no_weight_decay_if": bias_or_norm, "no_trust_ratio_if": bias_or_norm},
       "NVIDIA apex LARC (clip=True, trust_coefficient=0.02, eps=1e-8) wrapped around SGD with momentum"),
]})


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Invalid preset: {name!r} (allowed: {' | '.join(PRESETS)})") from None


def describe_presets() -> str:
    lines = []
    for p in PRESETS.values():
        opts = ", ".join(f"{k}={v!r}" for k, v in p.options.items()) or "(class defaults)"
        lines.append(f"{p.name:<16} {p.optimizer:<5} {opts}\n{'':<23}reproduces: {p.reproduces}")
        if p.notes:
            lines.append(f"{'':<23}{p.notes}")
    return "\n".join(lines)
