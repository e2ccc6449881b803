"""Named presets: largebatch's Lamb and Lars with the defaults of each library, as data.

The rows live in the one optimizer registry (:mod:`largebatch.optim.registry`); a preset is a row
whose class is ours. ``create_optimizer(name, model)`` applies them; ``largebatch presets`` prints them.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .registry import OPTIMIZERS, OptimizerInfo, describe_optimizers

Preset = OptimizerInfo
PRESETS: Mapping[str, Preset] = MappingProxyType({n: r for n, r in OPTIMIZERS.items() if r.is_preset})


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Invalid preset: {name!r} (allowed: {' | '.join(PRESETS)})") from None


def describe_presets() -> str:
    return describe_optimizers(PRESETS)
