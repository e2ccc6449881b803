"""The optimizer registry: every optimizer and preset the package can build, as one table of data.

Each row says which class, which constructor flags and which parameter-group rules make it, its aliases,
what it reproduces, its label in reports and whether it can keep fp32 master weights (precision
``"bf16"``). :func:`largebatch.create_optimizer`, ``largebatch presets``, the precision rules
(:func:`largebatch.train.precision.optimizer_overrides`) and the CLI's optimizer choices read it.
The tests compare each row with a ``checked_against`` library where that library can be installed.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .lamb import Lamb
from .lars import Lars
from .param_groups import bias_or_norm, is_norm


@dataclass(frozen=True)
class OptimizerInfo:
    """One row of the registry."""

    name: str
    cls: type[torch.optim.Optimizer]
    optimizer: str                      # family: "lamb" | "lars" | "adamw" | "adam" | "sgd"
    options: Mapping[str, Any]          # constructor flags (the class's defaults for the rest)
    groups: Mapping[str, Any]           # param_groups() rules used when a model is given
    reproduces: str                     # what it is / what it matches, with version
    label: str                          # short name in reports and plots
    aliases: tuple[str, ...] = ()
    notes: str = ""
    checked_against: str | None = field(default=None)  # library the tests compare it with

    @property
    def master_weights(self) -> bool:
        """Whether it can keep fp32 master weights of bf16 parameters (largebatch's own optimizers)."""
        return self.cls in (Lamb, Lars)

    @property
    def is_preset(self) -> bool:
        """largebatch's own optimizers with a library's (or paper's) flags; the torch baselines are not."""
        return self.master_weights


def _row(name, cls, options, groups, reproduces, label, aliases=(), notes="", checked_against=None):
    family = {Lamb: "lamb", Lars: "lars"}.get(cls, name)
    return OptimizerInfo(name, cls, family, MappingProxyType(dict(options)), MappingProxyType(dict(groups)),
                         reproduces, label, tuple(aliases), notes, checked_against)


_NO_EXCLUSIONS = {"no_weight_decay_if": None}
_BERT_EXCLUSIONS = {"no_weight_decay_if": bias_or_norm}
_BIAS_NORM_NO_RATIO = {"no_weight_decay_if": bias_or_norm, "no_trust_ratio_if": bias_or_norm}

OPTIMIZERS: Mapping[str, OptimizerInfo] = MappingProxyType({r.name: r for r in [
    _row("paper", Lamb, {}, _BERT_EXCLUSIONS,
         "LAMB, Algorithm 2 of You et al. (ICLR 2020): bias correction inside, ε=1e-6 outside √, "
         "decoupled λ=0.01 inside the ratio, φ = identity, trust ratio on every tensor", "LAMB", ("lamb",),
         "Biases and LayerNorm get no weight decay (the BERT recipe)."),
    _row("nvlamb", Lamb,
         {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "bias_correction": "inside",
          "max_grad_norm": 1.0, "trust_ratio": "decayed", "grad_averaging": True},
         _BERT_EXCLUSIONS,
         "NVIDIA apex FusedLAMB defaults (use_nvlamb=False): global-gradient pre-normalisation to norm 1.0, "
         "trust ratio only on tensors with weight decay", "NVLAMB", (),
         "apex is CUDA-only and not installable here; the maths is apex's multi_tensor_lamb."),
    _row("torch_optimizer", Lamb,
         {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "bias_correction": "none",
          "phi": "clamp_norm", "phi_min": 0.0, "phi_max": 10.0},
         _NO_EXCLUSIONS,
         "torch-optimizer 0.3.0 `Lamb` defaults (debias=False, clamp_value=10, adam=False)", "LAMB (torch-optimizer)",
         checked_against="torch_optimizer.Lamb"),
    _row("timm", Lamb,
         {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "bias_correction": "inside",
          "max_grad_norm": 1.0, "trust_ratio": "decayed", "grad_averaging": True},
         _BERT_EXCLUSIONS,
         "timm 1.0.31 `timm.optim.Lamb` defaults (max_grad_norm=1.0, trust_clip=False, always_adapt=False); "
         "groups as timm's create_optimizer (no decay for biases and 1-D tensors)", "LAMB (timm)",
         checked_against="timm.optim.Lamb"),
    _row("authors_resnet", Lamb,
         {"weight_decay": 1.5, "bias_correction": "none", "max_grad_norm": 1.0, "trust_ratio": "decayed"},
         {"no_weight_decay_if": is_norm},
         "The LAMB authors' ResNet-50 code (docs/algorithms.md, \"Presets\"): no bias correction, decoupled "
         "λ=1.5 inside the ratio, no decay and no trust ratio for BatchNorm, biases decayed, global gradient "
         "clipping at 1.0", "LAMB (authors' ResNet)", (),
         "Use with label smoothing 0.1, LR 0.04·√(batch/32768)... and 782 warmup steps at 32K (see docs)."),
    _row("lars_paper", Lars, {}, _BERT_EXCLUSIONS,
         "LARS, Algorithm 1 of You et al. (ICLR 2020): decay inside the momentum, ratio ‖x‖/‖m‖", "LARS", ("lars",)),
    _row("lars_2017", Lars,
         {"mode": "2017", "momentum": 0.9, "weight_decay": 5e-4, "trust_coefficient": 0.001},
         _BIAS_NORM_NO_RATIO,
         "LARS of You, Gitman & Ginsburg 2017: local LR η_tc·‖w‖/(‖g‖+λ‖w‖+ε) inside heavy-ball momentum",
         "LARS (2017)", (),
         "Biases and BatchNorm excluded from decay and adaptation, as in the common ImageNet recipes."),
    _row("larc", Lars,
         {"mode": "2017", "larc_clip": True, "momentum": 0.9, "weight_decay": 5e-4, "trust_coefficient": 0.02,
          "eps": 1e-8},
         _BIAS_NORM_NO_RATIO,
         "NVIDIA apex LARC (clip=True, trust_coefficient=0.02, eps=1e-8) wrapped around SGD with momentum", "LARC"),
    _row("adamw", torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}, {},
         "torch.optim.AdamW (the baseline)", "AdamW"),
    _row("adam", torch.optim.Adam, {"lr": 1e-3}, {}, "torch.optim.Adam", "Adam"),
    _row("sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}, {},
         "torch.optim.SGD with momentum 0.9", "SGD"),
]})
_BY_NAME = {**{a: info for info in OPTIMIZERS.values() for a in info.aliases}, **OPTIMIZERS}


def _key(name: str) -> str:
    return name.lower().replace("-", "_")


def optimizer_names(family: str | None = None) -> list[str]:
    """Every name :func:`largebatch.create_optimizer` accepts (aliases first), or those of one family."""
    names = [a for info in OPTIMIZERS.values() for a in info.aliases] + list(OPTIMIZERS)
    return [n for n in names if family is None or _BY_NAME[n].optimizer == family]


def optimizer_info(name: str) -> OptimizerInfo:
    """The registry row of a name or alias (case and ``-``/``_`` ignored); ValueError naming the choices."""
    if not isinstance(name, str):
        raise TypeError(f"Invalid optimizer name: {name!r} (allowed: {' | '.join(optimizer_names())})")
    info = _BY_NAME.get(_key(name))
    if info is None:
        raise ValueError(f"Invalid optimizer name: {name!r} (allowed: {' | '.join(optimizer_names())})")
    return info


def describe_optimizers(rows: Mapping[str, OptimizerInfo] = OPTIMIZERS) -> str:
    """The table as text (``largebatch presets``)."""
    lines = []
    for p in rows.values():
        opts = ", ".join(f"{k}={v!r}" for k, v in p.options.items()) or "(class defaults)"
        aliases = f" (alias {', '.join(p.aliases)})" if p.aliases else ""
        lines.append(f"{p.name:<16} {p.optimizer:<5} {opts}\n{'':<23}{p.label}{aliases}: {p.reproduces}")
        if p.notes:
            lines.append(f"{'':<23}{p.notes}")
    return "\n".join(lines)


def as_json(info: OptimizerInfo) -> dict[str, Any]:
    """One row as JSON-ready data (predicates by name)."""
    return {"optimizer": info.optimizer, "class": f"{info.cls.__module__}.{info.cls.__qualname__}",
            "label": info.label, "aliases": list(info.aliases), "options": dict(info.options),
            "groups": {k: getattr(v, "__name__", v) for k, v in info.groups.items()},
            "reproduces": info.reproduces, "notes": info.notes, "checked_against": info.checked_against,
            "master_weights": info.master_weights}
