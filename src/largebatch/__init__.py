"""largebatch: LAMB and LARS exactly as the paper defines them, and the large-batch training recipe.

The optimizers need torch alone; training, tasks, studies and reports come with ``largebatch[train]``.
Subpackages are imported on first access (``largebatch.schedules``, ``largebatch.train``, ...), so
``import largebatch`` stays as light as the optimizers and a missing extra only matters when its
subpackage is used.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .optim import (
    PRESETS,
    Lamb,
    Lars,
    Preset,
    StepInBackward,
    create_optimizer,
    describe_groups,
    get_preset,
    param_groups,
    step_in_backward,
    trust_ratio,
)

__version__ = "0.1.0"
__all__ = ["Lamb", "Lars", "create_optimizer", "param_groups", "describe_groups", "PRESETS", "Preset",
           "get_preset", "trust_ratio", "step_in_backward", "StepInBackward", "__version__"]

#: subpackages reachable as attributes of the package, imported on first access (PEP 562)
SUBMODULES = ("optim", "schedules", "checkpoint", "train", "tasks", "study", "bench", "cli", "plots")


def __getattr__(name: str) -> ModuleType:
    if name in SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *SUBMODULES})
