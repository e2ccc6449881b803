"""The run plan: built once from the config and the task's sizes, the only source of phases, batch,
micro-batch, sequence length, steps and learning rate.

A plain config is a one-phase plan; ``phases:`` gives several. The plan is frozen and holds plain numbers,
so "which phase, which batch, which LR at step t" is answered by pure methods of it, the same way in a
straight run and after a resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .. import schedules
from ..schedules import Phase
from .config import TrainConfig

#: phase i draws its samples from permutations seeded by ``seed + PHASE_SEED_STRIDE * i``; phase 0 draws
#: exactly the samples of a single-phase run
PHASE_SEED_STRIDE = 7_919


@dataclass(frozen=True)
class RunPlan:
    phases: tuple[Phase, ...]
    train_sizes: tuple[int, ...]   # training samples of each phase (at its sequence length)
    multi_phase: bool              # the config gave ``phases:`` (records and logs then name the phase)

    @property
    def starts(self) -> tuple[int, ...]:
        """The first global step of each phase."""
        out, start = [], 0
        for ph in self.phases:
            out.append(start)
            start += ph.steps
        return tuple(out)

    @property
    def total_steps(self) -> int:
        return sum(ph.steps for ph in self.phases)

    def locate(self, step: int) -> tuple[int, int]:
        """(phase index, step within that phase) of global ``step``."""
        return schedules.phase_at(list(self.phases), step)

    def lr(self, step: int) -> float:
        """The learning rate of global ``step`` (0-based), a pure function of the plan."""
        return schedules.multi_phase_lr(list(self.phases), step)

    def samples_before(self, index: int) -> int:
        """Samples seen in the phases before phase ``index``."""
        return sum(ph.steps * ph.batch_size for ph in self.phases[:index])

    def data_seed(self, seed: int, index: int) -> int:
        return seed + PHASE_SEED_STRIDE * index

    def describe(self, world_size: int) -> list[str]:
        """One line per phase: batch = micro-batch × accumulation × processes, steps, epochs, LR."""
        lines = []
        for i, (ph, n) in enumerate(zip(self.phases, self.train_sizes)):
            accum = math.ceil(math.ceil(ph.batch_size / world_size) / ph.micro_batch_size)
            lines.append("  " + (f"phase {i + 1}: " if self.multi_phase else "")
                         + f"global effective batch {ph.batch_size} = micro-batch {ph.micro_batch_size} × {accum} "
                         f"accumulation steps × {world_size} process(es); {ph.steps} steps "
                         f"({ph.steps * ph.batch_size / n:.2f} epochs"
                         + (f" of {ph.seq_len}-token sequences" if ph.seq_len else "")
                         + f"), peak LR {ph.peak_lr:g}, warmup {ph.warmup_steps} steps"
                         + (f", optimizer state: {ph.optimizer_state}" if i else ""))
        return lines


def phase_settings(cfg: TrainConfig) -> list[dict[str, Any]]:
    """The config's phases as dicts (a plain config is one phase); the config's fields are their defaults."""
    if not cfg.phases:
        return [{"batch_size": cfg.batch_size, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                 **({"steps": cfg.steps} if cfg.steps else {"epochs": cfg.epochs})}]
    return cfg.phases


def build_run_plan(cfg: TrainConfig, task) -> RunPlan:
    """The plan of ``cfg`` on ``task`` (which only reports sizes: it is left at its own sequence length)."""
    phases, sizes = [], []
    for d in phase_settings(cfg):
        n = task.set_train_seq_len(d.get("seq_len")) if cfg.phases else task.train_size
        steps = d.get("steps") or schedules.steps_for_epochs(d["epochs"], n, d["batch_size"])
        phases.append(Phase(steps=steps, batch_size=d["batch_size"], peak_lr=d["lr"],
                            warmup_steps=min(d["warmup_steps"], steps), seq_len=d.get("seq_len"),
                            power=d.get("power", cfg.power), end_lr=d.get("end_lr", cfg.end_lr),
                            optimizer_state=d.get("optimizer_state", "keep"),
                            micro_batch_size=min(d.get("micro_batch_size", cfg.micro_batch_size), d["batch_size"]),
                            schedule=d.get("schedule", cfg.schedule)))
        sizes.append(n)
    if cfg.phases:
        task.set_train_seq_len(None)
    return RunPlan(tuple(phases), tuple(sizes), multi_phase=bool(cfg.phases))
