"""The training loop, readable in one sitting (nanoGPT's loop and torchtitan's trainer are the models).

One optimizer step = one *effective* batch, built from micro-batches with exact gradient accumulation.
:func:`train` reads top to bottom and hands the work to components:

- the run plan (``run_plan.py``): phases, batch, micro-batch, sequence length, steps and the LR of a step,
  built once from the config and the task's sizes;
- data (``data.py``): the samples of a step, a pure function of (seed, phase, step);
- the step (``step.py``): accumulate, check the gradients, step or skip, zero;
- scheduling (``scheduling.py``): write the plan's LR into the optimizer, apply a phase boundary's policy;
- evaluation (``evaluation.py``), checkpointing (``resume.py`` over ``checkpoint.py``) and logging
  (``metrics_log.py``: metrics.jsonl, trust.jsonl, TensorBoard, progress bar).

So "N steps straight" and "k steps, kill, resume, N−k steps" give identical parameters, optimizer state
and metrics: the data order, the masks and the LR are functions of the step, the RNGs are checkpointed.

What the trainer uses of a task is written in :class:`largebatch.tasks.base.Task`; an optional
``save_pretrained(model, directory)`` is called into ``<out>/hf/`` at the end of a run.

Adding a feature: add a field to :class:`TrainConfig` (it becomes a config key and a CLI flag) and call
the component that implements it from :func:`train`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..optim import create_optimizer, optimizer_info
from ..tasks import Task, build_task
from . import distributed as D
from . import resume as R
from ..checkpoint import write_atomically
from .config import TrainConfig
from .data import step_micro_batches
from .evaluation import evaluate, is_due
from .metrics_log import RunLog, dumps, tensorboard_writer_class, trust_summary
from .noise_scale import NoiseScaleTracker, require_two_batch_sizes
from .precision import optimizer_overrides, prepare_model
from .run_folder import last_record, run_id_for
from .run_plan import RunPlan, build_run_plan, phase_settings
from .scheduling import ScheduledLR, reset_optimizer_state
from .step import Stepper, StepResult

__all__ = ["TrainConfig", "train"]


def train(cfg: TrainConfig, *, resume: str | None = None, task: Task | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.task`` and return the summary (also written to ``<out>/summary.json``).

    ``resume``: a checkpoint file or run directory to continue from (bit-exactly).
    ``task``: an already built task (else built from ``cfg.task`` and ``cfg.task_options``).
    ``on_step(step, record)``: called after each optimizer step (tests use it to stop a run).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    writer_cls = tensorboard_writer_class() if cfg.tensorboard else None  # fail before any work, on every rank
    ctx = D.init_from_env(timeout_s=cfg.dist_timeout)
    out = Path(cfg.out)
    ckpt = R.read_resume_checkpoint(cfg, resume)
    if cfg.noise_scale:  # before any work: the estimate needs two batch sizes
        require_two_batch_sizes([(ph["batch_size"], ph.get("micro_batch_size", cfg.micro_batch_size))
                                 for ph in phase_settings(cfg)], ctx.world_size)
    if (done := R.finished_run(out, ckpt)) is not None:
        if ctx.is_main:
            print(f"the run in {out} is complete (summary.json): nothing to resume", flush=True)
        D.shutdown(ctx)
        return done
    run_id = run_id_for(out, ckpt) if ctx.is_main else None  # refuses a folder holding another run
    torch.manual_seed(cfg.seed)
    if task is None:
        with D.main_first(ctx):  # rank 0 trains and caches the tokenizer first
            task = build_task(cfg.task, seed=cfg.seed, **cfg.task_build_options())
    plan = build_run_plan(cfg, task)
    stepper = build_stepper(cfg, task, plan, ctx)
    model, optimizer = stepper.model, stepper.optimizer
    end = stop_step(cfg, plan, start_step := R.restore(ckpt, stepper, task) if ckpt is not None else 0)
    if ctx.is_main:
        R.take_folder(out, run_id, ckpt, ctx)
    log = RunLog(out, enabled=ctx.is_main, resume_step=start_step if ckpt is not None else None,
                 start_step=start_step, total_steps=end, trust_every=cfg.trust_every,
                 progress=cfg.progress, writer_cls=writer_cls)
    if ctx.is_main:
        write_atomically(out / "config.json", json.dumps(R.config_record(cfg), indent=2))
        announce(cfg, task, optimizer, plan, ctx, start_step, ckpt)
    scheduled_lr = ScheduledLR(optimizer, plan.lr)
    # a run killed after its last checkpoint ends here at once: its summary takes that step's logged record
    record = last_record(out / "metrics.jsonl", start_step) if ckpt is not None and ctx.is_main else {}
    t_last = time.perf_counter()
    with D.timeouts_reported(ctx, cfg.dist_timeout):  # a stuck or dead rank: one line after dist_timeout
        for step in range(start_step, end):
            enter_phase(task, optimizer, plan, step, first=step == start_step)
            lr = scheduled_lr.apply(step)
            result = stepper.step(task, step_micro_batches(task, plan, cfg.seed, step, ctx), step,
                                  batch_size=plan.phases[plan.locate(step)[0]].batch_size)
            t_now = time.perf_counter()
            record = step_record(plan, step, lr, result, stepper, t_now - t_last)
            is_last = step + 1 == end
            if cfg.log_every and is_due(cfg.log_every, step + 1, is_last):
                record.update(trust_summary(optimizer))
            t_last = t_now
            if is_due(cfg.eval_every, step + 1, is_last):
                record.update(evaluation_record(cfg, task, stepper))
                t_last = time.perf_counter()  # evaluation time is not training throughput
            log.write(record, optimizer, is_last=is_last)
            if is_due(cfg.checkpoint_every, step + 1, is_last):
                R.save(cfg, plan, stepper, step, out, run_id, task.input_fingerprint())
            if on_step is not None:
                on_step(step + 1, record)
            if record.get("diverged"):
                if ctx.is_main:
                    print(f"loss is {result.loss} at step {step + 1} ({stepper.consecutive_skips} consecutive "
                          "skipped steps): stopping (diverged)", flush=True)
                break
    log.close()
    if plan.multi_phase:
        task.set_train_seq_len(None)
    summary = {**summarize(cfg, plan, record, start_step, stepper.skipped, ctx.world_size),
               **evaluate(task, model, "test"), "run_id": run_id}
    summary.update(compare_with_baseline(task, summary))
    # sharded parameters are gathered on every rank (a collective) before the main process exports them
    exported = D.full_state(model, optimizer)[0] if ctx.enabled and cfg.strategy == "fsdp" else model
    if ctx.is_main:
        finish(cfg, task, exported, summary, out)
    D.shutdown(ctx)
    return summary


def stop_step(cfg: TrainConfig, plan: RunPlan, start_step: int) -> int:
    """The step after which the run ends: the plan's last, or ``stop_after_steps`` when that comes first (the
    schedule still spans the plan). A checkpoint past the stop is refused: its steps cannot be undone."""
    end = min(plan.total_steps, cfg.stop_after_steps or plan.total_steps)
    if start_step > end:
        raise ValueError(f"Invalid stop_after_steps: {cfg.stop_after_steps} (allowed: >= {start_step}, the step "
                         "of the checkpoint being resumed)")
    return end


def build_stepper(cfg: TrainConfig, task: Task, plan: RunPlan, ctx: D.DistContext) -> Stepper:
    """The model in the run's precision, wrapped for the processes, and its optimizer at the plan's first LR."""
    model = prepare_model(task.model, cfg.precision)
    model.train()
    train_model = D.wrap_model(model, ctx, cfg.strategy)
    # after wrapping: FSDP2 replaces the parameters with sharded ones, which the optimizer must hold
    # Lamb/Lars apply the run's non-finite policy themselves (see Stepper.update); stepping in backward, they
    # check each gradient before its tensor's step (nonfinite='raise')
    own = {"nonfinite": "raise" if cfg.step_in_backward else cfg.nonfinite} \
        if optimizer_info(cfg.optimizer).master_weights else {}
    optimizer = create_optimizer(cfg.optimizer, model, lr=plan.lr(0), **{
        **optimizer_overrides(cfg.precision, cfg.optimizer), **own, **cfg.optimizer_options})
    noise = NoiseScaleTracker(model, ema=cfg.noise_scale_ema, distributed=ctx.enabled) if cfg.noise_scale else None
    return Stepper(model, train_model, optimizer, ctx, precision=cfg.precision, nonfinite=cfg.nonfinite,
                   step_in_backward=cfg.step_in_backward, noise=noise)


def evaluation_record(cfg: TrainConfig, task: Task, stepper: Stepper) -> dict[str, Any]:
    """The held-out metrics of ``cfg.eval_split`` and, when measured, the gradient noise scale since the last."""
    record = evaluate(task, stepper.model, cfg.eval_split)
    if stepper.noise is not None:
        record.update(stepper.noise.summary())
    return record


def enter_phase(task: Task, optimizer, plan: RunPlan, step: int, *, first: bool) -> None:
    """At a phase's first step (or a run's first step): the phase's sequence length and, at a boundary, its
    optimizer-state policy (a pure function of the step, so a resume at the boundary applies it too)."""
    index, local = plan.locate(step)
    if plan.multi_phase and (first or local == 0):
        task.set_train_seq_len(plan.phases[index].seq_len)
    if index > 0 and local == 0:
        reset_optimizer_state(optimizer, plan.phases[index].optimizer_state)


def step_record(plan: RunPlan, step: int, lr: float, result: StepResult, stepper: Stepper,
                seconds: float) -> dict[str, Any]:
    """The metrics.jsonl record of global ``step`` (0-based) before evaluation and trust ratios."""
    index, local = plan.locate(step)
    batch_size = plan.phases[index].batch_size
    record = {"step": step + 1, "samples": plan.samples_before(index) + (local + 1) * batch_size, "lr": lr,
              "loss": result.loss, "count": result.count, "samples_per_s": batch_size / max(seconds, 1e-9),
              "skipped_steps": stepper.skipped, **({"phase": index + 1} if plan.multi_phase else {})}
    # a skipped step is not a divergence, unless nothing but skips happen for MAX_CONSECUTIVE_SKIPS steps
    if (result.finite and not math.isfinite(result.loss)) or stepper.stuck:
        record["diverged"] = True
    return record


def announce(cfg: TrainConfig, task: Task, optimizer, plan: RunPlan, ctx: D.DistContext, start_step: int,
             ckpt: dict | None) -> None:
    """Print what is about to run: the task, the optimizer, and the plan phase by phase."""
    print(f"{task.describe()}\noptimizer {cfg.optimizer} ({type(optimizer).__name__}), precision "
          f"{cfg.precision}, {plan.total_steps} steps" + (f" in {len(plan.phases)} phases" if plan.multi_phase else "")
          + (f"; stops after step {cfg.stop_after_steps} (the schedule spans all {plan.total_steps})"
             if cfg.stop_after_steps and cfg.stop_after_steps < plan.total_steps else "")
          + (f"; resumed at step {start_step} from {ckpt['path']}" if ckpt else ""), flush=True)
    print("\n".join(plan.describe(ctx.world_size)), flush=True)


def summarize(cfg: TrainConfig, plan: RunPlan, record: dict[str, Any], start_step: int, skipped: int,
              world_size: int) -> dict[str, Any]:
    """The run's summary from its last record; a multi-phase run is summarised by its last phase."""
    last = plan.phases[-1]
    steps = record.get("step", start_step)
    stopped = {"stopped_early": True, "stop_after_steps": cfg.stop_after_steps} \
        if cfg.stop_after_steps is not None and cfg.stop_after_steps < plan.total_steps else {}
    return {"task": cfg.task, "optimizer": cfg.optimizer, "batch_size": last.batch_size, "lr": last.peak_lr,
            "world_size": world_size, "steps": steps, "total_steps": plan.total_steps, **stopped,
            "final_loss": record.get("loss"), "skipped_steps": skipped,
            # a run whose last loss is not finite failed, even when its last steps were skipped ones
            "diverged": bool(record.get("diverged")) or not math.isfinite(record.get("loss", 0.0)),
            **{k: v for k, v in record.items() if k.startswith(cfg.eval_split)}}


def compare_with_baseline(task: Task, summary: dict[str, Any]) -> dict[str, Any]:
    """The task's trivial baseline beside the test result, and a flag when the result is not above it
    (for each metric, higher is better; a loss is not compared)."""
    baseline = {k: v for k, v in (task.baseline() if hasattr(task, "baseline") else {}).items() if k != "loss"}
    below = [k for k, v in baseline.items() if summary.get(f"test_{k}") is not None and summary[f"test_{k}"] <= v]
    return {**{f"baseline_{k}": v for k, v in baseline.items()},
            **({"at_or_below_baseline": bool(below)} if baseline else {})}


def finish(cfg: TrainConfig, task: Task, model: torch.nn.Module | dict, summary: dict[str, Any], out: Path) -> None:
    """Main process, end of a run: summary.json, the task's ``save_pretrained`` export, the plot."""
    write_atomically(out / "summary.json", dumps(summary, indent=2))
    save_pretrained = getattr(task, "save_pretrained", None)
    if save_pretrained is not None:
        save_pretrained(model, out / "hf")
    if cfg.plot:
        from ..plots import plot_noise_scale, plot_runs, read_metrics
        plot_runs([out], out / "curves.png")
        if cfg.noise_scale and any(r.get("b_simple") is not None for r in read_metrics(out)):
            plot_noise_scale([out], out / "noise_scale.png")


def plan_phases(cfg: TrainConfig, task: Task) -> list:
    """Temporary: study/runner.py (another helper's file) still calls this; it becomes
    ``build_run_plan(cfg, task).total_steps`` there, and then this function goes."""
    from types import SimpleNamespace

    plan = build_run_plan(cfg, task)
    return [SimpleNamespace(start=start, phase=ph) for start, ph in zip(plan.starts, plan.phases)]
