"""What the trainer does to an optimizer from the run plan: write the LR of a step, apply a phase boundary.

The LR itself is a pure function of the step (:meth:`largebatch.train.run_plan.RunPlan.lr`, built on
``largebatch.schedules``); this module is the only place that writes it into the optimizer's groups.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..schedules import OPTIMIZER_STATE_POLICIES, OptimizerStatePolicy

def reset_optimizer_state(optimizer: torch.optim.Optimizer, mode: OptimizerStatePolicy) -> None:
    """Apply a phase boundary's optimizer policy (see :class:`largebatch.schedules.Phase`) in place.

    Tensors are zeroed rather than dropped so the state keeps its keys and dtypes (fp32 masters of bf16
    parameters are weights, not moments: they are never touched).
    """
    if mode not in OPTIMIZER_STATE_POLICIES:
        raise ValueError(f"Invalid mode: {mode!r} (allowed: {' | '.join(repr(p) for p in OPTIMIZER_STATE_POLICIES)})")
    if mode == "keep":
        return
    reset_step = mode in ("reset_step", "reset")
    reset_moments = mode in ("reset_moments", "reset")
    for state in optimizer.state.values():
        for key, value in state.items():
            if key == "master_param" or not torch.is_tensor(value):
                continue
            if key == "step" and reset_step or key != "step" and reset_moments:
                value.zero_()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write the schedule's LR into every group (times the group's optional ``lr_scale``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class ScheduledLR:
    """Drive any ``torch.optim.Optimizer`` from a pure function of the global step.

    ``ScheduledLR(opt, lambda t: warmup_poly_decay(t, ...)).apply(step)`` before ``opt.step()``. Unlike
    ``torch.optim.lr_scheduler`` it keeps no counter of its own: the LR of step t is ``lr_at(t)`` however
    the run got there (resume, skipped steps), so there is no scheduler state to save. Groups with an
    ``lr_scale`` entry keep their relative multiplier.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float]):
        self.optimizer = optimizer
        self.lr_at = lr_at
        self.last_lr: float | None = None

    def apply(self, step: int) -> float:
        """Set every group's LR for global ``step`` (0-based) and return the schedule's value."""
        lr = float(self.lr_at(step))
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"Invalid lr from the schedule at step {step}: {lr!r} (allowed: a finite number >= 0)")
        set_lr(self.optimizer, lr)
        self.last_lr = lr
        return lr
