"""``create_optimizer(name_or_preset, model_or_params, **overrides)``: one entry point for every optimizer."""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .param_groups import param_groups
from .registry import optimizer_info

_GROUP_KEYS = set(inspect.signature(param_groups).parameters) - {"model", "weight_decay", "group_options"}


def create_optimizer(name: str, model_or_params: nn.Module | Any, **overrides: Any) -> torch.optim.Optimizer:
    """Build an optimizer by a name of the registry (:data:`largebatch.optim.registry.OPTIMIZERS`:
    ``lamb``, ``lars``, ``adamw``, ``adam``, ``sgd`` or a preset).

    With an ``nn.Module``, parameter groups come from :func:`param_groups` with the row's exclusion
    rules; ``overrides`` may change flags (``lr=...``, ``phi=...``) and group rules
    (``no_weight_decay=[...]``, ``no_trust_ratio_if=...``). With an iterable of parameters or groups,
    those are used as given.
    """
    info = optimizer_info(name)
    group_rules = {k: overrides.pop(k) for k in list(overrides) if k in _GROUP_KEYS}
    options = {**info.options, **overrides}
    if isinstance(model_or_params, nn.Module):
        sig = inspect.signature(info.cls).parameters
        wd = options.get("weight_decay", sig["weight_decay"].default if "weight_decay" in sig else 0.0)
        params = param_groups(model_or_params, weight_decay=wd, **{**info.groups, **group_rules})
        if not info.master_weights:  # torch optimizers do not know our group keys
            for g in params:
                g.pop("trust_ratio", None)
    else:
        if group_rules:
            raise ValueError(f"Invalid overrides {sorted(group_rules)}: parameter-group rules need an nn.Module")
        params = model_or_params
    try:
        return info.cls(params, **options)
    except TypeError as exc:
        raise TypeError(f"{name}: {exc}") from None
