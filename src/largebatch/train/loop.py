"""The training loop, readable in one sitting (nanoGPT-style).

One optimizer step = one *effective* batch, built from micro-batches with exact gradient accumulation.
The LR is a pure function of the step; the samples of a step are a pure function of (seed, step) — a
fresh permutation per epoch, read as one stream — and so are the MLM masks; the dropout RNG is saved in
checkpoints. So "N steps straight" and "k steps, kill, resume, N−k steps" give identical parameters,
optimizer state and metrics.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import schedules
from ..optim import create_optimizer
from .accumulation import accumulate_gradients, split_indices
from . import distributed as D
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .precision import (NONFINITE_POLICIES, autocast, check_precision, grad_scaler, grads_finite,
                        optimizer_overrides, prepare_model)


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
    schedule: str = "poly"           # "poly" (warmup + polynomial decay) | "constant"
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
    # multi-phase ("mixed batch") training, SPEC §4: a list of phases, each a dict with batch_size, lr,
    # warmup_steps, steps or epochs, and optionally seq_len, micro_batch_size, power, end_lr and
    # optimizer_state ("keep" | "reset_step" | "reset_moments" | "reset"). Replaces batch_size/lr/epochs.
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
        if self.schedule not in ("poly", "constant"):
            raise ValueError(f"Invalid schedule: {self.schedule!r} (allowed: 'poly' | 'constant')")
        check_precision(self.precision)
        if self.strategy not in D.STRATEGIES:
            raise ValueError(f"Invalid strategy: {self.strategy!r} (allowed: {' | '.join(D.STRATEGIES)})")
        for i, ph in enumerate(self.phases or []):
            check_phase(i, ph)
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite: {self.nonfinite!r} (allowed: {' | '.join(NONFINITE_POLICIES)})")


PHASE_KEYS = ("batch_size", "lr", "warmup_steps", "steps", "epochs", "seq_len", "micro_batch_size", "power",
              "end_lr", "optimizer_state")


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
    if "epochs" in ph and not ph["epochs"] > 0:
        raise ValueError(f"Invalid phases[{i}] epochs: {ph['epochs']!r} (allowed: > 0)")


@dataclass(frozen=True)
class PlannedPhase:
    phase: schedules.Phase
    micro_batch_size: int
    train_size: int        # training samples at this phase's sequence length
    start: int             # its first global step
    samples_before: int    # samples seen in earlier phases


def plan_phases(cfg: TrainConfig, task) -> list[PlannedPhase]:
    """The run as phases; a plain config is one phase. Leaves the task at its own sequence length."""
    if not cfg.phases:
        n = task.train_size
        steps = cfg.steps or schedules.steps_for_epochs(cfg.epochs, n, cfg.batch_size)
        ph = schedules.Phase(steps=steps, batch_size=cfg.batch_size, peak_lr=cfg.lr,
                             warmup_steps=min(cfg.warmup_steps, steps), power=cfg.power, end_lr=cfg.end_lr)
        return [PlannedPhase(ph, cfg.micro_batch_size, n, 0, 0)]
    out, start, samples = [], 0, 0
    for i, d in enumerate(cfg.phases):
        n = task.set_train_seq_len(d.get("seq_len"))
        steps = d.get("steps") or schedules.steps_for_epochs(d["epochs"], n, d["batch_size"])
        ph = schedules.Phase(steps=steps, batch_size=d["batch_size"], peak_lr=d["lr"],
                             warmup_steps=min(d["warmup_steps"], steps), seq_len=d.get("seq_len"),
                             power=d.get("power", cfg.power), end_lr=d.get("end_lr", cfg.end_lr),
                             optimizer_state=d.get("optimizer_state", "keep"))
        out.append(PlannedPhase(ph, min(d.get("micro_batch_size", cfg.micro_batch_size), d["batch_size"]), n,
                                start, samples))
        start, samples = start + steps, samples + steps * d["batch_size"]
    task.set_train_seq_len(None)
    return out


def phase_of(plan: list[PlannedPhase], step: int) -> int:
    return max(i for i, p in enumerate(plan) if p.start <= step)


MAX_CONSECUTIVE_SKIPS = 10
#: settings that decide the trajectory: a resumed run must have the checkpoint's values to be bit-exact
#: (micro_batch_size included: the MLM masks are drawn per micro-batch)
TRAJECTORY_FIELDS = ("task", "task_options", "optimizer", "optimizer_options", "batch_size", "micro_batch_size",
                     "lr", "warmup_steps", "epochs", "steps", "schedule", "power", "end_lr", "seed", "precision", "phases")


def check_resume_config(cfg: TrainConfig, saved: dict[str, Any], path: str) -> None:
    """Refuse to resume with settings that would silently give another run than the checkpoint's."""
    current = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    differ = [f"{f}={current[f]!r} (checkpoint: {saved[f]!r})" for f in TRAJECTORY_FIELDS
              if f in saved and saved[f] != current[f]]
    if differ:
        raise ValueError(f"cannot resume from {path} with different settings: {'; '.join(differ)}")


def sample_indices(step: int, batch_size: int, dataset_size: int, seed: int) -> torch.Tensor:
    """Indices of the samples of ``step``: positions [step·B, (step+1)·B) of the stream formed by one
    seeded permutation per epoch. A pure function, so resuming needs no sampler state."""
    start, stop = step * batch_size, (step + 1) * batch_size
    out = []
    pos = start
    while pos < stop:
        epoch, offset = divmod(pos, dataset_size)
        perm = _epoch_permutation(dataset_size, seed, epoch)
        take = min(stop - pos, dataset_size - offset)
        out.append(perm[offset:offset + take])
        pos += take
    return torch.cat(out)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(dataset_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch (cached: at small batches drawing it every step cost ~5% of the step)."""
    return torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Per-(step, micro-batch) generator for data randomness (MLM masks)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    warmup = min(cfg.warmup_steps, total_steps)
    if cfg.schedule == "constant":
        return schedules.constant(step, peak_lr=cfg.lr, warmup_steps=warmup)
    return schedules.warmup_poly_decay(step, peak_lr=cfg.lr, warmup_steps=warmup, total_steps=total_steps,
                                       power=cfg.power, end_lr=cfg.end_lr)


def _trust_summary(optimizer) -> dict[str, float]:
    telemetry = getattr(optimizer, "telemetry", None)
    if telemetry is None:
        return {}
    ratios = [v["trust_ratio"] for v in telemetry().values()]
    if not ratios:
        return {}
    return {"trust_ratio_mean": sum(ratios) / len(ratios), "trust_ratio_min": min(ratios),
            "trust_ratio_max": max(ratios)}


def _trust_ratios(optimizer) -> dict[str, float]:
    """Per-tensor trust ratios of the last step, by parameter name ({} for optimizers without them)."""
    telemetry = getattr(optimizer, "telemetry", None)
    return {name: v["trust_ratio"] for name, v in telemetry().items()} if telemetry is not None else {}


def tensorboard_writer_class():
    """TensorBoard's ``SummaryWriter``, or an ImportError that names the install command."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError("TensorBoard logging needs the tensorboard package: pip install 'largebatch[tensorboard]' "
                          f"(or pip install tensorboard); {exc}") from None
    return SummaryWriter


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class JsonlLog:
    """metrics.jsonl of a run; on resume, records after the checkpoint's step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [l for l in path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            path.write_text("".join(l + "\n" for l in kept))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, *, resume: str | None = None, task=None,
          on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.task`` and return the summary (also written to ``<out>/summary.json``).

    ``resume``: a checkpoint file or run directory to continue from (bit-exactly).
    ``on_step(step, record)``: called after each optimizer step (tests use it to stop a run).
    """
    from ..tasks import build_task

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    writer_cls = tensorboard_writer_class() if cfg.tensorboard else None  # fail before any work, on every rank
    ctx = D.init_from_env()
    out = Path(cfg.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None and "config" in ckpt:
        check_resume_config(cfg, ckpt["config"], ckpt["path"])
    torch.manual_seed(cfg.seed)
    if task is None:
        with D.main_first(ctx):  # rank 0 trains and caches the tokenizer first
            task = build_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    model = prepare_model(task.model, cfg.precision)
    model.train()
    plan = plan_phases(cfg, task)
    total_steps = plan[-1].start + plan[-1].phase.steps
    start_step, skipped = 0, 0
    train_model = D.wrap_model(model, ctx, cfg.strategy)
    # after wrapping: FSDP2 replaces the parameters with sharded ones, which the optimizer must hold
    optimizer = create_optimizer(cfg.optimizer, model, lr=cfg.lr,
                                 **{**optimizer_overrides(cfg.precision, cfg.optimizer), **cfg.optimizer_options})
    if ckpt is not None:  # after sharding: the full state is scattered to each rank's shards
        D.load_full_state(model, optimizer, ckpt["model"], ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start_step, skipped = int(ckpt["step"]), int(ckpt.get("skipped_steps", 0))
    no_sync = D.no_sync(train_model, ctx)
    amp = autocast(cfg.precision)
    scaler = grad_scaler(cfg.precision)
    if scaler is not None and ckpt is not None and "grad_scaler" in ckpt:
        scaler.load_state_dict(ckpt["grad_scaler"])  # the loss scale is part of an exact resume
    log = None
    if ctx.is_main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
        log = JsonlLog(out / "metrics.jsonl", start_step if ckpt is not None else None)
        trust_log = JsonlLog(out / "trust.jsonl", start_step if ckpt is not None else None)
    tb = writer_cls(str(out / "tensorboard")) if writer_cls is not None and ctx.is_main else None
    if ctx.is_main:
        print(f"{task.describe()}\noptimizer {cfg.optimizer} ({type(optimizer).__name__}), precision "
              f"{cfg.precision}, {total_steps} steps" + (f" in {len(plan)} phases" if cfg.phases else "")
              + (f"; resumed at step {start_step} from {ckpt['path']}" if ckpt else ""), flush=True)
        for i, p in enumerate(plan):
            accum = math.ceil(math.ceil(p.phase.batch_size / ctx.world_size) / p.micro_batch_size)
            print(("  " + (f"phase {i + 1}: " if cfg.phases else "") + f"global effective batch {p.phase.batch_size} = "
                   f"micro-batch {p.micro_batch_size} × {accum} accumulation steps × {ctx.world_size} process(es); "
                   f"{p.phase.steps} steps ({p.phase.steps * p.phase.batch_size / p.train_size:.2f} epochs"
                   + (f" of {p.phase.seq_len}-token sequences" if p.phase.seq_len else "") + "), peak LR "
                   f"{p.phase.peak_lr:g}, warmup {p.phase.warmup_steps} steps"
                   + (f", optimizer state: {p.phase.optimizer_state}" if i else "")), flush=True)

    bar = None
    if cfg.progress and ctx.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    t_last = time.perf_counter()
    record: dict[str, Any] = {}
    consecutive_skips = 0
    phases = [p.phase for p in plan]
    lr_fn = (lambda t: schedules.multi_phase_lr(phases, t)) if cfg.phases else (lambda t: lr_at(cfg, t, total_steps))
    scheduled_lr = schedules.ScheduledLR(optimizer, lr_fn)
    current = None
    for step in range(start_step, total_steps):
        pi = phase_of(plan, step)
        phase, local = plan[pi], step - plan[pi].start
        if cfg.phases and pi != current:
            task.set_train_seq_len(phase.phase.seq_len)
        current = pi
        if pi > 0 and local == 0:  # a phase boundary: the phase's optimizer-state policy (a pure function
            schedules.reset_optimizer_state(optimizer, phase.phase.optimizer_state)  # of the step: resumable)
        lr = scheduled_lr.apply(step)
        batch_size = phase.phase.batch_size
        # phase 0 draws exactly the samples of a single-phase run; later phases their own permutations
        indices = D.rank_slice(sample_indices(local, batch_size, phase.train_size, cfg.seed + 7_919 * pi), ctx)
        micro = [task.batch(idx, step_generator(cfg.seed, step, i + ctx.rank * 10_000))
                 for i, idx in enumerate(split_indices(indices, phase.micro_batch_size))]
        (total,) = D.all_reduce_sum([float(sum(task.count(b) for b in micro))], ctx)
        local_loss, _ = accumulate_gradients(train_model, micro, task.loss, count_fn=task.count, no_sync=no_sync,
                                             autocast=amp, total=int(total), scale=float(ctx.world_size),
                                             backward=(lambda l: scaler.scale(l).backward()) if scaler else None)
        if scaler is not None:
            scaler.unscale_(optimizer)  # true gradients before the trust ratio
        (loss,) = D.all_reduce_sum([local_loss], ctx)
        count = int(total)
        finite = not D.any_true(not grads_finite(model), ctx)
        if finite:
            (scaler.step(optimizer) if scaler is not None else optimizer.step())
            consecutive_skips = 0
        elif cfg.nonfinite == "raise":
            raise FloatingPointError(f"non-finite gradients at step {step + 1} (policy nonfinite='raise')")
        else:
            skipped += 1  # the optimizer's step counters do not advance
            consecutive_skips += 1
        if scaler is not None:
            scaler.update()  # lowers the scale after an overflow, raises it after a quiet stretch
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        record = {"step": step + 1, "samples": phase.samples_before + (local + 1) * batch_size, "lr": lr,
                  "loss": loss, "count": count, "samples_per_s": batch_size / max(now - t_last, 1e-9),
                  "skipped_steps": skipped, **({"phase": pi + 1} if cfg.phases else {})}
        t_last = now
        is_last = step + 1 == total_steps
        if cfg.log_every and ((step + 1) % cfg.log_every == 0 or is_last):
            record.update(_trust_summary(optimizer))
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or is_last:
            record.update({f"{cfg.eval_split}_{k}": v for k, v in task.evaluate(model, cfg.eval_split).items()})
            t_last = time.perf_counter()  # evaluation time is not training throughput
        # a skipped step is not a divergence, unless nothing but skips happen for MAX_CONSECUTIVE_SKIPS steps
        if (not math.isfinite(loss) and finite) or consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            record["diverged"] = True
        if log is not None:
            log.write(record)
            if tb is not None:
                for k, v in _scalars(record).items():
                    tb.add_scalar(k, v, step + 1)
            if cfg.trust_every and ((step + 1) % cfg.trust_every == 0 or is_last or step == 0):
                trust = _trust_ratios(optimizer)
                if trust:
                    trust_log.write({"step": step + 1, "trust_ratio": trust})
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.0f}")
            bar.update(1)
        if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or is_last:
            model_state, optim_state = D.full_state(model, optimizer)  # collective under FSDP2
            if ctx.is_main:
                epoch, offset = divmod((local + 1) * batch_size, phase.train_size)
                # step alone determines what comes next (data order, masks and LR are functions of it);
                # the data position and LR are stored to make the file self-describing
                save_checkpoint({"step": step + 1, "model": model_state, "optimizer": optim_state,
                                 "rng": rng_state(), "skipped_steps": skipped,
                                 "data_position": {"phase": pi, "epoch": epoch, "sample_in_epoch": offset,
                                                   "seed": cfg.seed + 7_919 * pi},
                                 "schedule": {"lr": lr, "next_lr": lr_fn(step + 1), "total_steps": total_steps,
                                              "phase": pi},
                                 **({"grad_scaler": scaler.state_dict()} if scaler is not None else {}),
                                 "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))},
                                out, step + 1, keep=cfg.keep_checkpoints)
        if on_step is not None:
            on_step(step + 1, record)
        if record.get("diverged"):
            if ctx.is_main:
                print(f"loss is {loss} at step {step + 1} ({consecutive_skips} consecutive skipped steps): "
                      "stopping (diverged)", flush=True)
            break
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    if cfg.phases:
        task.set_train_seq_len(None)
    final = {f"test_{k}": v for k, v in task.evaluate(model, "test").items()}
    last = plan[-1].phase  # a multi-phase run is summarised by its last phase's batch and peak LR
    summary = {"task": cfg.task, "optimizer": cfg.optimizer, "batch_size": last.batch_size, "lr": last.peak_lr,
               "world_size": ctx.world_size, "steps": record.get("step", start_step), "total_steps": total_steps,
               "final_loss": record.get("loss"), "diverged": bool(record.get("diverged")), "skipped_steps": skipped,
               **{k: v for k, v in record.items() if k.startswith(cfg.eval_split)}, **final}
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.plot:
            from ..plots import plot_runs
            plot_runs([out], out / "curves.png")
    D.shutdown(ctx)
    return summary
