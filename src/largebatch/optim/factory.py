"""``create_optimizer(name_or_preset, model_or_params, **overrides)``: one entry point for every optimizer."""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .lamb import Lamb
from .lars import Lars
from .param_groups import param_groups
from .presets import PRESETS, get_preset

_CLASSES = {"lamb": Lamb, "lars": Lars}
_ALIASES = {"lamb": "paper", "lars": "lars_paper"}
#: torch optimizers offered as baselines: (class, defaults)
_TORCH = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}),
}
_GROUP_KEYS = set(inspect.signature(param_groups).parameters) - {"model", "weight_decay", "group_options"}


def optimizer_names() -> list[str]:
    return [*_ALIASES, *_TORCH, *PRESETS]


def create_optimizer(name: str, model_or_params: nn.Module | Any, **overrides: Any) -> torch.optim.Optimizer:
    """Build an optimizer by name (``lamb``, ``lars``, ``adamw``, ``adam``, ``sgd``) or preset name.

    With an ``nn.Module``, parameter groups come from :func:`param_groups` with the preset's exclusion
    rules; ``overrides`` may change flags (``lr=...``, ``phi=...``) and group rules
    (``no_weight_decay=[...]``, ``no_trust_ratio_if=...``). With an iterable of parameters or groups,
    those are used as given.
    """
    if not isinstance(name, str):
        raise TypeError(f"Invalid optimizer name: {name!r} (allowed: {' | '.join(optimizer_names())})")
    key = name.lower().replace("-", "_")
    group_rules = {k: overrides.pop(k) for k in list(overrides) if k in _GROUP_KEYS}
    if key in _TORCH:
        cls, defaults = _TORCH[key]
        options = {**defaults, **overrides}
        rules: dict[str, Any] = {}
    else:
        preset = get_preset(_ALIASES.get(key, key)) if key in _ALIASES or key in PRESETS else None
        if preset is None:
            raise ValueError(f"Invalid optimizer name: {name!r} (allowed: {' | '.join(optimizer_names())})")
        cls = _CLASSES[preset.optimizer]
        options = {**preset.options, **overrides}
        rules = dict(preset.groups)
    rules.update(group_rules)
    if isinstance(model_or_params, nn.Module):
        sig = inspect.signature(cls).parameters
        wd = options.get("weight_decay", sig["weight_decay"].default if "weight_decay" in sig else 0.0)
        params = param_groups(model_or_params, weight_decay=wd, **rules)
        if cls is not Lamb and cls is not Lars:  # torch optimizers do not know our group keys
            for g in params:
                g.pop("trust_ratio", None)
    else:
        if group_rules:
            raise ValueError(f"Invalid overrides {sorted(group_rules)}: parameter-group rules need an nn.Module")
        params = model_or_params
    try:
        return cls(params, **options)
    except TypeError as exc:
        raise TypeError(f"{name}: {exc}") from None
