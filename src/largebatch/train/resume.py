"""Checkpointing for the trainer: build a checkpoint's payload, restore one, refuse a mismatched resume.

The file format (atomic writes, keeping the last few of this run, verification, the RNG state) is
``largebatch.checkpoint``, the run folder's ownership (run id, stale temp files, metrics trim)
``largebatch.train.run_folder``; this module decides what goes in a payload. The step alone determines what
comes next (data order, masks and LR are functions of it); the data position and LR are stored to make the
file self-describing, the thread count and world size to warn when a resume cannot be bit-identical.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from . import distributed as D
from ..checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .run_folder import claim, finished_summary, folder_run_id, resume_notes
from .config import TrainConfig
from .data import data_position
from .run_plan import RunPlan
from .step import Stepper

#: settings that decide the trajectory: a resumed run must have the checkpoint's values to be bit-exact
#: (micro_batch_size included: the MLM masks are drawn per micro-batch)
TRAJECTORY_FIELDS = ("task", "task_options", "optimizer", "optimizer_options", "batch_size", "micro_batch_size",
                     "lr", "warmup_steps", "epochs", "steps", "schedule", "power", "end_lr", "seed", "precision", "phases",
                     "data", "text_field", "label_field", "tokenizer", "model_config", "model_size", "model")


def config_record(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain JSON values (as written to config.json and into checkpoints)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any], path: str) -> None:
    """Refuse to resume with settings that would silently give another run than the checkpoint's."""
    current = config_record(cfg)
    differ = [f"{f}={current[f]!r} (checkpoint: {saved[f]!r})" for f in TRAJECTORY_FIELDS
              if f in saved and saved[f] != current[f]]
    if differ:
        raise ValueError(f"cannot resume from {path} with different settings: {'; '.join(differ)}")


def read_resume_checkpoint(cfg: TrainConfig, resume: str | None) -> dict[str, Any] | None:
    """The checkpoint to resume from (``None``: a fresh run), checked against ``cfg`` before any work."""
    if not resume:
        return None
    ckpt = load_checkpoint(resume)
    if "config" in ckpt:
        check_resume_config(cfg, ckpt["config"], ckpt["path"])
    return ckpt


def finished_run(out: Path, ckpt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The summary of the run being resumed if it has already finished (then there is nothing to do)."""
    if ckpt is None or (summary := finished_summary(out)) is None:
        return None
    owner = summary.get("run_id") or folder_run_id(out)
    return summary if owner in (None, ckpt.get("run_id")) else None


def environment(ctx: D.DistContext) -> dict[str, int]:
    """What changes the summation order without changing the run (stored to warn on resume)."""
    return {"threads": torch.get_num_threads(), "world_size": ctx.world_size}


def take_folder(out: Path, run_id: str, ckpt: dict[str, Any] | None, ctx: D.DistContext) -> None:
    """Main process, before writing anything: own the folder (run.json), remove the temp files of killed
    writes, warn in one line when the resume will be correct but not bit-identical."""
    moved = claim(out, run_id)
    notes = resume_notes(ckpt.get("environment"), environment(ctx)) if ckpt is not None else []
    for note in ([moved] if moved else []) + notes:
        print(note, file=sys.stderr, flush=True)


def check_optimizer_options(ckpt: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Refuse, naming the file, a checkpoint whose optimizer param groups carry options this optimizer does not
    know (written by a newer largebatch, or by another optimizer class): torch's loader would raise a bare
    KeyError. Options the checkpoint lacks (an older largebatch) keep this optimizer's values."""
    known = {"params", *(k for g in optimizer.param_groups for k in g)}
    saved = (ckpt.get("optimizer") or {}).get("param_groups") or []
    unknown = sorted({k for g in saved if isinstance(g, dict) for k in g} - known)
    if unknown:
        raise CheckpointError(f"{ckpt.get('path', 'checkpoint')}: optimizer option(s) {unknown} unknown to this "
                              f"{type(optimizer).__name__} (a checkpoint of a newer largebatch or of another "
                              f"optimizer): resume it with the version that wrote it, or start a new run")


def check_inputs(ckpt: dict[str, Any], task: Any) -> None:
    """Refuse, naming the file, a checkpoint trained with another tokenizer than the task's (its vocabulary or
    its ids changed since: a retrained or edited vocabulary, another largebatch's numbering): the weights would
    go on training under other token ids. A checkpoint without the record (an older largebatch) is not checked."""
    saved, now = ckpt.get("input_fingerprint"), task.input_fingerprint()
    if saved is not None and saved != now:
        raise CheckpointError(f"cannot resume from {ckpt.get('path', 'checkpoint')}: it was trained with another "
                              f"tokenizer (fingerprint {saved}, this run's: {now}), so its embedding rows belong to "
                              f"other token ids; start the run over in a new folder, or resume with the tokenizer "
                              f"it was trained with (the `tokenizer` option)")


def restore(ckpt: dict[str, Any], stepper: Stepper, task: Any = None) -> int:
    """Load a checkpoint into the model, optimizer, RNGs, GradScaler and skip count; returns its step.
    Call after sharding: the full state is scattered to each rank's shards. ``task``: checked to have the
    checkpoint's tokenizer first."""
    if task is not None:
        check_inputs(ckpt, task)
    check_optimizer_options(ckpt, stepper.optimizer)
    D.load_full_state(stepper.model, stepper.optimizer, ckpt["model"], ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    stepper.skipped = int(ckpt.get("skipped_steps", 0))
    if stepper.scaler is not None and "grad_scaler" in ckpt:
        stepper.scaler.load_state_dict(ckpt["grad_scaler"])  # the loss scale is part of an exact resume
    if stepper.noise is not None and "noise_scale" in ckpt:
        stepper.noise.load_state_dict(ckpt["noise_scale"])  # the moving averages continue
    return int(ckpt["step"])


def save(cfg: TrainConfig, plan: RunPlan, stepper: Stepper, step: int, out: Path, run_id: str | None,
         input_fingerprint: str | None = None) -> None:
    """Checkpoint the state after global ``step`` (0-based). A collective under FSDP2: call on every rank."""
    model_state, optim_state = D.full_state(stepper.model, stepper.optimizer)
    if not stepper.ctx.is_main:
        return
    index, _ = plan.locate(step)
    payload = {"step": step + 1, "model": model_state, "optimizer": optim_state, "rng": rng_state(),
               "skipped_steps": stepper.skipped, "data_position": data_position(plan, cfg.seed, step),
               "schedule": {"lr": plan.lr(step), "next_lr": plan.lr(step + 1), "total_steps": plan.total_steps,
                            "phase": index},
               **({"grad_scaler": stepper.scaler.state_dict()} if stepper.scaler is not None else {}),
               **({"noise_scale": stepper.noise.state_dict()} if stepper.noise is not None else {}),
               "config": config_record(cfg), "run_id": run_id, "environment": environment(stepper.ctx),
               **({"input_fingerprint": input_fingerprint} if input_fingerprint is not None else {})}
    save_checkpoint(payload, out, step + 1, keep=cfg.keep_checkpoints)
