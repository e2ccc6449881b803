"""The configuration of a training run: one dataclass, checked on construction.

Phases given as dicts (YAML) are checked here structurally; :func:`largebatch.train.run_plan.build_run_plan`
turns them into :class:`largebatch.schedules.Phase` once the task's size is known.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..schedules import SCHEDULES
from . import distributed as D
from .precision import NONFINITE_POLICIES, check_precision


@dataclass
class TrainConfig:
    task: str = "mlm"
    task_options: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "lamb"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 512            # effective batch (samples per optimizer step, all ranks)
    micro_batch_size: int = 128      # per forward/backward
    lr: float = 0.01                 # peak LR
    warmup_steps: int = 10
    epochs: float = 3.0              # fixed epoch budget -> steps = ceil(epochs * N / batch)
    steps: int | None = None         # overrides epochs
    schedule: str = "poly"           # "poly" (warmup + polynomial decay) | "constant"; per phase unless overridden
    power: float = 1.0
    end_lr: float = 0.0
    seed: int = 0
    eval_every: int = 0              # steps between held-out evaluations (0: only at the end)
    eval_split: str = "validation"   # evaluated during training; the final summary adds "test"
    log_every: int = 1
    trust_every: int = 0             # steps between per-tensor trust-ratio records in trust.jsonl (0: none)
    checkpoint_every: int = 0        # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    out: str = "runs/latest"
    threads: int | None = None
    precision: str = "fp32"          # "fp32" | "bf16-autocast" | "bf16" (fp32 masters in Lamb/Lars) | "fp16"
    nonfinite: str = "skip"          # non-finite gradients: "skip" the step or "raise"
    strategy: str = "ddp"            # with several processes: "ddp" (replicated) | "fsdp" (FSDP2, sharded)
    # multi-phase ("mixed batch") training, docs/training.md: a list of phases, each a dict with batch_size, lr,
    # warmup_steps, steps or epochs, and optionally seq_len, micro_batch_size, power, end_lr, schedule and
    # optimizer_state ("keep" | "reset_step" | "reset_moments" | "reset"). Replaces batch_size/lr/epochs;
    # schedule, power, end_lr and micro_batch_size are the defaults of every phase.
    phases: list[dict[str, Any]] | None = None
    progress: bool = True
    plot: bool = True
    tensorboard: bool = False        # also write the metrics as TensorBoard scalars to <out>/tensorboard

    def __post_init__(self) -> None:
        for name in ("batch_size", "micro_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {name}: {v!r} (allowed: an integer >= 1)")
        if self.micro_batch_size > self.batch_size and not self.phases:
            raise ValueError(f"Invalid micro_batch_size: {self.micro_batch_size} (allowed: <= batch_size = {self.batch_size})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"Invalid lr: {self.lr!r} (allowed: a finite number > 0)")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"Invalid epochs: {self.epochs!r} (allowed: > 0)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"Invalid steps: {self.steps!r} (allowed: >= 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps: {self.warmup_steps!r} (allowed: >= 0)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Invalid schedule: {self.schedule!r} (allowed: {' | '.join(SCHEDULES)})")
        check_precision(self.precision)
        if self.strategy not in D.STRATEGIES:
            raise ValueError(f"Invalid strategy: {self.strategy!r} (allowed: {' | '.join(D.STRATEGIES)})")
        for i, ph in enumerate(self.phases or []):
            check_phase(i, ph)
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite: {self.nonfinite!r} (allowed: {' | '.join(NONFINITE_POLICIES)})")


PHASE_KEYS = ("batch_size", "lr", "warmup_steps", "steps", "epochs", "seq_len", "micro_batch_size", "power",
              "end_lr", "schedule", "optimizer_state")


def check_phase(i: int, ph: dict[str, Any]) -> None:
    """Structural checks of one phase dict (epochs become steps once the task's size is known)."""
    if not isinstance(ph, dict):
        raise ValueError(f"Invalid phases[{i}]: {ph!r} (allowed: a dict with keys {', '.join(PHASE_KEYS)})")
    unknown = sorted(set(ph) - set(PHASE_KEYS))
    if unknown:
        raise ValueError(f"Invalid phases[{i}] key(s): {', '.join(unknown)} (allowed: {', '.join(PHASE_KEYS)})")
    missing = [k for k in ("batch_size", "lr", "warmup_steps") if k not in ph]
    if missing or ("steps" in ph) == ("epochs" in ph):
        raise ValueError(f"Invalid phases[{i}]: needs batch_size, lr, warmup_steps and exactly one of steps | "
                         f"epochs (missing: {', '.join(missing) or 'steps | epochs'})")
    for k in ("batch_size", "steps", "micro_batch_size", "seq_len"):
        v = ph.get(k, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"Invalid phases[{i}] {k}: {v!r} (allowed: an integer >= 1)")
    if not (ph["lr"] > 0 and math.isfinite(ph["lr"])):
        raise ValueError(f"Invalid phases[{i}] lr: {ph['lr']!r} (allowed: a finite number > 0)")
    if ph.get("schedule", "poly") not in SCHEDULES:
        raise ValueError(f"Invalid phases[{i}] schedule: {ph['schedule']!r} (allowed: {' | '.join(SCHEDULES)})")
    if "epochs" in ph and not ph["epochs"] > 0:
        raise ValueError(f"Invalid phases[{i}] epochs: {ph['epochs']!r} (allowed: > 0)")
