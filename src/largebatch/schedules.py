"""Learning-rate schedules as pure functions of the global step, LR-scaling rules, the phases of a run.

Everything here is a plain function of integers and floats (no optimizer, no state), so a resumed run
gets exactly the LR it would have had, and each piece has its own tests. What writes the LR into an
optimizer or resets its state at a phase boundary lives in ``largebatch.train.scheduling``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

#: what happens to the optimizer state at a phase boundary (see :class:`Phase`)
OptimizerStatePolicy = Literal["keep", "reset_step", "reset_moments", "reset"]
OPTIMIZER_STATE_POLICIES = ("keep", "reset_step", "reset_moments", "reset")
#: the LR shape within a phase: warmup then polynomial decay, or warmup then constant
Schedule = Literal["poly", "constant"]
SCHEDULES = ("poly", "constant")


def _check_nonneg_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: an integer >= 0)")


def warmup_poly_decay(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int,
                      power: float = 1.0, end_lr: float = 0.0) -> float:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then polynomial decay to ``end_lr``.

    η_t = peak·t/W for t < W, then end + (peak − end)·(1 − (t−W)/(T−W))^p, and end_lr for t ≥ T.
    ``power=1`` is the paper's linear decay; NVIDIA's BERT uses 0.5. ``step`` counts optimizer steps from 0.
    """
    _check_nonneg_int("step", step)
    _check_nonneg_int("warmup_steps", warmup_steps)
    _check_nonneg_int("total_steps", total_steps)
    if total_steps == 0:
        raise ValueError("Invalid total_steps: 0 (allowed: an integer >= 1)")
    if warmup_steps > total_steps:
        raise ValueError(f"Invalid warmup_steps: {warmup_steps} (allowed: <= total_steps = {total_steps})")
    if peak_lr < 0 or end_lr < 0 or power <= 0:
        raise ValueError(f"Invalid peak_lr/end_lr/power: {peak_lr}, {end_lr}, {power} (allowed: >= 0, >= 0, > 0)")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps  # step 0 already has a non-zero LR
    if step >= total_steps:
        return end_lr
    decay_steps = total_steps - warmup_steps
    remaining = 1.0 - (step - warmup_steps) / decay_steps
    return end_lr + (peak_lr - end_lr) * remaining ** power


def constant(step: int, *, peak_lr: float, warmup_steps: int = 0) -> float:
    """Constant LR after an optional linear warmup."""
    _check_nonneg_int("step", step)
    _check_nonneg_int("warmup_steps", warmup_steps)
    if peak_lr < 0:
        raise ValueError(f"Invalid peak_lr: {peak_lr} (allowed: >= 0)")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr


def scale_lr(base_lr: float, base_batch: int, batch: int, rule: Literal["sqrt", "linear", "none"] = "sqrt") -> float:
    """LR for ``batch`` from an LR tuned at ``base_batch``: ×√k (the paper's untuned rule), ×k (Goyal et al.)."""
    if base_batch <= 0 or batch <= 0:
        raise ValueError(f"Invalid batch sizes: base_batch={base_batch}, batch={batch} (allowed: > 0)")
    k = batch / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(k)
    if rule == "linear":
        return base_lr * k
    if rule == "none":
        return base_lr
    raise ValueError(f"Invalid rule: {rule!r} (allowed: 'sqrt' | 'linear' | 'none')")


def steps_for_epochs(epochs: float, dataset_size: int, batch: int) -> int:
    """Fixed epoch budget: a bigger batch means proportionally fewer steps (ceil(epochs·N / batch))."""
    if epochs <= 0 or dataset_size <= 0 or batch <= 0:
        raise ValueError(f"Invalid epochs/dataset_size/batch: {epochs}, {dataset_size}, {batch} (allowed: > 0)")
    return max(1, math.ceil(epochs * dataset_size / batch))


@dataclass(frozen=True)
class Phase:
    """One phase of a run (a plain run is one phase; several make a "mixed batch" run, docs/training.md).

    Its LR warms up from 0 to ``peak_lr`` over ``warmup_steps``, then follows ``schedule`` over ``steps``.
    ``micro_batch_size``: samples per forward/backward (``None``: the whole batch at once).

    ``optimizer_state``: what happens to the optimizer at the start of this phase:
    ``"keep"`` (m, v and step counters carry on), ``"reset_step"`` (keep m, v, restart the bias-correction
    step counters: NVIDIA's BERT phase 2), ``"reset_moments"`` (zero m, v, keep the counters) or
    ``"reset"`` (fresh moments and counters, as a new optimizer).
    """

    steps: int
    batch_size: int
    peak_lr: float
    warmup_steps: int
    seq_len: int | None = None
    power: float = 1.0
    end_lr: float = 0.0
    optimizer_state: OptimizerStatePolicy = "keep"
    micro_batch_size: int | None = None
    schedule: Schedule = "poly"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"Invalid phase: steps={self.steps}, batch_size={self.batch_size} (allowed: >= 1)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule: {self.schedule!r} (allowed: {' | '.join(repr(s) for s in SCHEDULES)})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"Invalid phase warmup_steps: {self.warmup_steps} (allowed: <= steps = {self.steps})")
        if self.optimizer_state not in OPTIMIZER_STATE_POLICIES:
            raise ValueError(f"Invalid optimizer_state: {self.optimizer_state!r} "
                             f"(allowed: {' | '.join(repr(p) for p in OPTIMIZER_STATE_POLICIES)})")


def phase_at(phases: list[Phase], step: int) -> tuple[int, int]:
    """(phase index, step within the phase) of a global step; the last phase extends past its end."""
    _check_nonneg_int("step", step)
    if not phases:
        raise ValueError("Invalid phases: [] (allowed: at least one Phase)")
    start = 0
    for i, ph in enumerate(phases):
        if step < start + ph.steps or i == len(phases) - 1:
            return i, step - start
        start += ph.steps
    raise AssertionError("unreachable")


def multi_phase_lr(phases: list[Phase], step: int) -> float:
    """The LR of global ``step``: each phase warms up again from zero to its own peak, then follows its own
    schedule over its own steps (past the last phase's end: its final LR)."""
    i, local = phase_at(phases, step)
    ph = phases[i]
    if ph.schedule == "constant":
        return constant(local, peak_lr=ph.peak_lr, warmup_steps=ph.warmup_steps)
    return warmup_poly_decay(local, peak_lr=ph.peak_lr, warmup_steps=ph.warmup_steps, total_steps=ph.steps,
                             power=ph.power, end_lr=ph.end_lr)


class LRSchedulerAdapter(torch.optim.lr_scheduler.LRScheduler):
    """A schedule of this module as a ``torch.optim.lr_scheduler.LRScheduler``, for the stacks that drive
    the LR through torch's protocol (HF ``Trainer``, accelerate, Lightning, a hand-written loop)::

        schedule = functools.partial(warmup_poly_decay, peak_lr=2e-3, warmup_steps=100, total_steps=1000)
        scheduler = LRSchedulerAdapter(optimizer, schedule)   # then scheduler.step() after optimizer.step()

    The LR of optimizer step t (0-based; ``last_epoch`` counts the ``scheduler.step()`` calls) is
    ``lr_at(t)``, times the group's ``lr_scale`` where one is set.
    ``state_dict()`` holds the step count and the last LRs but not ``lr_at`` (a function need not pickle):
    to resume, build the adapter with the same schedule and ``load_state_dict``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float], last_epoch: int = -1):
        if not callable(lr_at):
            raise TypeError(f"Invalid lr_at: {lr_at!r} (allowed: a function of the step returning the LR)")
        self.lr_at = lr_at
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]  # torch's stub allows tensors too
        step = self.last_epoch
        lr = float(self.lr_at(step))
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"Invalid lr from the schedule at step {step}: {lr!r} (allowed: a finite number >= 0)")
        return [lr * group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "lr_at")}
