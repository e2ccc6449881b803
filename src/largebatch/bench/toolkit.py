"""`largebatch train` beside a minimal hand-written loop and HF ``Trainer``, on the same work (issue 15).

The work: a training config (by default the main job, ``largebatch train`` with no arguments), its task,
model, batch, micro-batch, precision, optimizer, schedule and threads. Four runners train their own copy of
the same initial model on the same step batches (the samples and masks of ``largebatch.train.data``):

- ``train (main-job logging)``: :func:`largebatch.train.loop.train` with the config as given (held-out
  evaluation every ``eval_every`` steps, trust-ratio summaries, metrics.jsonl, progress bar, checkpoints);
- ``train (logging off)``: the same with evaluation, trust ratios, checkpoints, progress bar and plot off
  (metrics.jsonl is still written: the loop always logs its steps);
- ``minimal loop``: :func:`minimal_loop`, the ~25 lines a user would write (same optimizer, parameter
  groups, LR schedule and exact accumulation; nothing else);
- ``HF Trainer``: ``transformers.Trainer`` with ``optimizers=(the same optimizer, LRSchedulerAdapter)``,
  ``per_device_train_batch_size`` = the micro-batch, ``gradient_accumulation_steps`` = batch ÷ micro-batch,
  ``bf16`` for bf16-autocast, no gradient clipping (``max_grad_norm=0``: our loop does not clip), and the
  model's loss normalised by the Trainer's ``num_items_in_batch`` (the exact accumulation our loop does).

Interleaving: each runner runs its own unmodified loop in its own Python thread, and a baton
(:class:`RoundRobin`) lets one runner at a time do one optimizer step, the order of each round shuffled
with a fixed seed (as the other benchmarks do), so every runner sees the same machine noise. A step's time
is from taking the baton to the end of the step (the loop's own per-step work included: data, schedule,
logging, evaluation when due); the first ``warmup`` steps (setup, first allocations) are not counted.
"""
from __future__ import annotations

import copy
import dataclasses
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RUNNERS = ("train (main-job logging)", "train (logging off)", "minimal loop", "HF Trainer")
#: the config fields that describe the work, recorded with the results
WORK_FIELDS = ("task", "task_options", "optimizer", "optimizer_options", "batch_size", "micro_batch_size", "lr",
               "precision", "threads", "seed", "eval_every", "log_every", "trust_every", "checkpoint_every")
#: issue 15's targets, in samples/s: train ≥ 0.97 × the minimal loop and ≥ 1.0 × the Trainer
TARGETS = {"minimal loop": 0.97, "HF Trainer": 1.0}
#: the config fields a ``train (logging off)`` runner turns off
LOGGING_OFF = dict(eval_every=0, log_every=0, trust_every=0, checkpoint_every=0, progress=False, plot=False,
                   tensorboard=False)


class Aborted(Exception):
    """Another runner failed: this one stops too."""


class Finished(Exception):
    """Raised from ``train``'s ``on_step`` to end a runner after its steps (the config's schedule is kept)."""


class RoundRobin:
    """A baton passed between runner threads: one optimizer step each, in turn, rounds shuffled with a seed.

    A runner calls :meth:`wait_turn` once before its loop and :meth:`tick` after every step; ``tick``
    returns True after the runner's last step, once every other runner has finished too (so its teardown
    overlaps nobody's timed steps).
    """

    def __init__(self, names, steps: int, seed: int = 0):
        self.steps = steps
        self.cond = threading.Condition()
        self.rng = random.Random(seed)
        self.active = list(names)
        self.queue: list[str] = []
        self.current: str | None = None
        self.error: BaseException | None = None
        self.times: dict[str, list[float]] = {n: [] for n in names}
        self.t0: dict[str, float] = {}
        self._advance()

    def _advance(self) -> None:
        """The next runner of this round; a new shuffled round when the last one is over."""
        if not self.queue:
            self.queue = sorted(self.active)
            self.rng.shuffle(self.queue)
        self.current = self.queue.pop(0) if self.queue else None

    def _wait(self, ready: Callable[[], bool]) -> None:
        self.cond.wait_for(lambda: ready() or self.error is not None)
        if self.error is not None:
            raise Aborted(f"another runner failed: {self.error!r}")

    def wait_turn(self, name: str) -> None:
        with self.cond:
            self._wait(lambda: self.current == name)
            self.t0[name] = time.perf_counter()

    def tick(self, name: str) -> bool:
        """Record this runner's step, pass the baton; True when the runner has done all its steps."""
        elapsed = time.perf_counter() - self.t0[name]
        with self.cond:
            self.times[name].append(elapsed)
            finished = len(self.times[name]) >= self.steps
            if finished:
                self.active.remove(name)
            self._advance()
            self.cond.notify_all()
            if finished:
                self._wait(lambda: not self.active)
                return True
            self._wait(lambda: self.current == name)
            self.t0[name] = time.perf_counter()
        return False

    def leave(self, name: str, error: BaseException | None = None) -> None:
        """A runner's thread ends: out of the rotation (and, after an error, everyone stops)."""
        with self.cond:
            if error is not None and self.error is None:
                self.error = error
            if name in self.active:
                self.active.remove(name)
                if self.current == name:
                    self._advance()
                else:
                    self.queue = [n for n in self.queue if n != name]
            self.cond.notify_all()


def run_interleaved(runners: dict[str, Callable[[RoundRobin, str], None]], steps: int, threads: int,
                    seed: int = 0) -> dict[str, list[float]]:
    """Run every ``runner(baton, name)`` in its own thread under one baton; each runner's step times."""
    baton = RoundRobin(runners, steps, seed)

    def work(name: str, fn) -> None:
        torch.set_num_threads(threads)  # per thread: OpenMP's thread count is a per-thread setting
        error = None
        try:
            baton.wait_turn(name)
            fn(baton, name)
        except (Finished, Aborted):
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread below
            error = exc
        finally:
            baton.leave(name, error)

    workers = [threading.Thread(target=work, args=(n, fn), name=f"toolkit {n}") for n, fn in runners.items()]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if baton.error is not None:
        raise baton.error
    short = {n: len(t) for n, t in baton.times.items() if len(t) < steps}
    if short:
        raise RuntimeError(f"runners ended before their {steps} steps: {short}")
    return baton.times


def check_config(cfg) -> None:
    """What the comparison can run (checked before the task is built): one phase, one process, a precision
    the Trainer has, equal micro-batches."""
    if cfg.phases:
        raise ValueError("Invalid phases: a multi-phase run (allowed: one phase; the Trainer has one batch size)")
    if cfg.precision not in ("fp32", "bf16-autocast"):
        raise ValueError(f"Invalid precision: {cfg.precision!r} (allowed: fp32 | bf16-autocast on CPU, which the "
                         "Trainer has too)")
    if cfg.step_in_backward or cfg.noise_scale:
        raise ValueError("Invalid config: step_in_backward / noise_scale (allowed: off; the other loops have neither)")
    if cfg.batch_size % cfg.micro_batch_size:
        raise ValueError(f"Invalid micro_batch_size: {cfg.micro_batch_size} (allowed: a divisor of the batch "
                         f"{cfg.batch_size}: the Trainer's accumulation has equal micro-batches)")


def check_steps(plan, steps: int) -> None:
    if plan.total_steps < steps:
        raise ValueError(f"Invalid steps: {steps} warm-up and timed steps (allowed: at most the config's "
                         f"{plan.total_steps} steps)")


def task_copy(task):
    """The task with its own copy of the initial model (the data and held-out sets are shared, read-only)."""
    twin = copy.copy(task)
    twin.model = copy.deepcopy(task.model)
    return twin


def micro_batches(task, cfg, plan, step: int) -> list[dict]:
    """The micro-batches of ``step``, as ``largebatch train`` draws them (its own function, one process)."""
    from largebatch.train.data import step_micro_batches
    from largebatch.train.distributed import DistContext

    return step_micro_batches(task, plan, cfg.seed, step, DistContext())


def minimal_loop(task, cfg, plan, model: nn.Module, steps: int, after_step: Callable[[], Any] = lambda: None):
    """The loop a user would write by hand: the same batches, optimizer, groups, schedule and exact
    accumulation as ``largebatch train``, and nothing else (no logging, checks, evaluation)."""
    from largebatch import create_optimizer

    optimizer = create_optimizer(cfg.optimizer, model, lr=plan.lr(0), **cfg.optimizer_options)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = plan.lr(step) * group.get("lr_scale", 1.0)
        batches = micro_batches(task, cfg, plan, step)
        total = sum(task.count(b) for b in batches)
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16-autocast"):
                summed, _ = task.loss(model, batch)
            (summed / total).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after_step()
    return optimizer


class LossModel(nn.Module):
    """A task's model as the Trainer wants it: ``forward(**batch)`` returns ``{"loss": ...}``, the summed
    loss over the Trainer's ``num_items_in_batch`` (the effective batch's count: exact accumulation)."""

    accepts_loss_kwargs = True  # the Trainer then passes num_items_in_batch and does not divide by the steps

    def __init__(self, task, model: nn.Module):
        super().__init__()
        self.model = model
        self.__dict__["task"] = task  # not a submodule

    def forward(self, num_items_in_batch=None, **batch):
        summed, count = self.task.loss(self.model, batch)
        return {"loss": summed / (num_items_in_batch if num_items_in_batch is not None else count)}


class StepOrder(torch.utils.data.IterableDataset):
    """The training samples in ``largebatch train``'s order, one index at a time."""

    def __init__(self, task, cfg, plan, steps: int):
        self.task, self.cfg, self.plan, self.steps = task, cfg, plan, steps

    def __iter__(self):
        from largebatch.train.data import sample_indices

        batch = self.plan.phases[0].batch_size
        for step in range(self.steps):
            yield from sample_indices(step, batch, self.task.train_size, self.plan.data_seed(self.cfg.seed, 0)).tolist()


class Collate:
    """Indices → a micro-batch drawn as ``largebatch train`` draws it (same masks: the generator of its
    step and micro-batch, counted in the order the Trainer asks)."""

    def __init__(self, task, cfg, per_step: int):
        self.task, self.seed, self.per_step, self.calls = task, cfg.seed, per_step, 0

    def __call__(self, indices: list[int]) -> dict:
        from largebatch.train.data import step_generator

        step, micro = divmod(self.calls, self.per_step)
        self.calls += 1
        return self.task.batch(torch.tensor(indices), step_generator(self.seed, step, micro))


def hf_trainer(task, cfg, plan, model: nn.Module, steps: int, out: str, callbacks=()):
    """``transformers.Trainer`` set up for the same work (see the module docstring)."""
    from transformers import Trainer, TrainingArguments

    from largebatch import create_optimizer
    from largebatch.schedules import LRSchedulerAdapter

    phase = plan.phases[0]
    wrapped = LossModel(task, model)
    optimizer = create_optimizer(cfg.optimizer, wrapped.model, lr=plan.lr(0), **cfg.optimizer_options)
    args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=phase.micro_batch_size,
                             gradient_accumulation_steps=phase.batch_size // phase.micro_batch_size,
                             bf16=cfg.precision == "bf16-autocast", max_grad_norm=0.0, use_cpu=True,
                             report_to=[], save_strategy="no", seed=cfg.seed, dataloader_pin_memory=False)
    return Trainer(model=wrapped, args=args, train_dataset=StepOrder(task, cfg, plan, steps),
                   data_collator=Collate(task, cfg, phase.batch_size // phase.micro_batch_size),
                   optimizers=(optimizer, LRSchedulerAdapter(optimizer, plan.lr)), callbacks=list(callbacks))


def build_runners(task, cfg, plan, steps: int, out: Path) -> dict[str, Callable[[RoundRobin, str], None]]:
    """The four runners of the comparison, each on its own copy of the task's initial model."""
    from transformers import TrainerCallback

    from largebatch.train.loop import train

    def train_runner(config):
        def run(baton: RoundRobin, name: str) -> None:
            def on_step(step: int, record: dict) -> None:
                if baton.tick(name):
                    raise Finished

            train(config, task=task_copy(task), on_step=on_step)
        return run

    def minimal(baton: RoundRobin, name: str) -> None:
        minimal_loop(task, cfg, plan, copy.deepcopy(task.model), steps, lambda: baton.tick(name))

    def trainer(baton: RoundRobin, name: str) -> None:
        class Tick(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                control.should_training_stop = baton.tick(name)

        hf_trainer(task, cfg, plan, copy.deepcopy(task.model), steps, str(out / "trainer"), [Tick()]).train()

    main = dataclasses.replace(cfg, out=str(out / "train-main"), threads=torch.get_num_threads())
    off = dataclasses.replace(main, out=str(out / "train-off"), **LOGGING_OFF)
    return dict(zip(RUNNERS, (train_runner(main), train_runner(off), minimal, trainer)))


def compare(cfg, *, steps: int = 50, warmup: int = 5, task=None, seed: int = 0) -> dict:
    """Time the four runners on ``cfg``'s work, interleaved; the summary (see :func:`summarise`)."""
    from largebatch.tasks import build_task
    from largebatch.train.run_plan import build_run_plan

    if steps < 1 or warmup < 0:
        raise ValueError(f"Invalid steps/warmup: {steps}/{warmup} (allowed: steps >= 1, warmup >= 0)")
    check_config(cfg)
    if task is None:
        torch.manual_seed(cfg.seed)
        task = build_task(cfg.task, seed=cfg.seed, **cfg.task_build_options())
    plan = build_run_plan(cfg, task)
    check_steps(plan, warmup + steps)
    with tempfile.TemporaryDirectory(prefix="lb-toolkit-") as tmp:
        runners = build_runners(task, cfg, plan, warmup + steps, Path(tmp))
        times = run_interleaved(runners, warmup + steps, torch.get_num_threads(), seed)
    return summarise({n: t[warmup:] for n, t in times.items()}, plan.phases[0].batch_size)


def summarise(times: dict[str, list[float]], batch_size: int) -> dict:
    """Per runner: median and mean step, samples/s (median step; and all steps, evaluations included), and
    the ratios the issue asks for: train ÷ minimal loop and train ÷ Trainer, in samples/s."""
    rows = {}
    for name, t in times.items():
        med = statistics.median(t)
        rows[name] = {"steps": len(t), "median_ms": med * 1e3, "min_ms": min(t) * 1e3, "max_ms": max(t) * 1e3,
                      "samples_per_s": batch_size / med, "samples_per_s_overall": batch_size * len(t) / sum(t)}
    ratios = {}
    for name in RUNNERS[:2]:
        if name in rows:
            for other in RUNNERS[2:]:
                if other in rows:
                    for key in ("samples_per_s", "samples_per_s_overall"):
                        ratios[f"{name} ÷ {other} ({key})"] = rows[name][key] / rows[other][key]
    return {"batch_size": batch_size, "rows": rows, "ratios": ratios}
