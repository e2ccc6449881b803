"""Held-out evaluation during and after a run, through the task's ``evaluate(model, split)``."""
from __future__ import annotations

from typing import Any

from torch import nn


def is_due(every: int, step: int, is_last: bool) -> bool:
    """Whether something done every ``every`` steps (0: only at the end) is due after 1-based ``step``."""
    return bool(every and step % every == 0) or is_last


def evaluate(task, model: nn.Module, split: str) -> dict[str, Any]:
    """The task's metrics on ``split``, keyed ``<split>_<metric>``."""
    return {f"{split}_{k}": v for k, v in task.evaluate(model, split).items()}
