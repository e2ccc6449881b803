"""The configuration of a training run: one dataclass, the single source of the config keys, the command-line
flags, their help and defaults, the JSON schema and the validation.

Why pydantic: it is already a dependency of the ``train`` extra's stack (transformers pulls it in), and a
pydantic dataclass stays a dataclass (``dataclasses.asdict``/``replace`` keep working for the study and the
checkpoints) while validating types strictly (``seed: 1.5``, ``lr: fast``, ``optimizer: 5`` are refused),
ranges (``Field(ge=..)``), and giving the JSON schema (:func:`config_schema`). tyro and jsonargparse would
derive the flags too, but neither is installed beside torch here and their error output spans many lines;
``largebatch.cli.train`` derives its argparse flags from these fields instead (one flag per field, the
help is the field's ``description`` with the default), so a new field is a new config key and a new flag.

Phases given as dicts (YAML) are checked here structurally; :func:`largebatch.train.run_plan.build_run_plan`
turns them into :class:`largebatch.schedules.Phase` once the task's size is known.
"""
from __future__ import annotations

import math
import os
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from ..optim import optimizer_info, optimizer_names
from ..schedules import SCHEDULES
from ..tasks import TASKS
from .distributed import DEFAULT_TIMEOUT_S, STRATEGIES
from .precision import NONFINITE_POLICIES, PRECISIONS

EVAL_SPLITS = ("validation", "test")
MAX_BATCH = 1 << 31        # samples per step; far above any machine, low enough to catch a typo like 1e30
MAX_EPOCHS = 1e6
MAX_STEPS = 10 ** 9

#: fields whose value must be one of a list (the list is the registry the rest of the code reads)
CHOICES: dict[str, tuple[str, ...]] = {
    "task": TASKS, "schedule": SCHEDULES, "precision": PRECISIONS, "nonfinite": NONFINITE_POLICIES,
    "strategy": STRATEGIES, "eval_split": EVAL_SPLITS,
}


def choices_of(name: str) -> tuple[str, ...]:
    """The allowed values of a field ((): any value of its type)."""
    return tuple(optimizer_names()) if name == "optimizer" else CHOICES.get(name, ())


def _f(default: Any = None, help: str = "", **kw) -> Any:
    """A config field: its default, its help (shown by ``--help`` and in the schema) and its constraints."""
    if isinstance(default, (dict, list)):
        return Field(default_factory=type(default), description=help, **kw)
    return Field(default, description=help, **kw)


_POS = dict(ge=1)
_EVERY = dict(ge=0)


@dataclass(config=ConfigDict(strict=True, extra="forbid"))
class TrainConfig:
    task: str = _f("mlm", "what to train")
    task_options: dict[str, Any] = _f({}, "the task's own options (--task-opt KEY=VALUE), e.g. hidden, seq_len")
    optimizer: str = _f("lamb", "an optimizer or preset (see `largebatch presets`)")
    optimizer_options: dict[str, Any] = _f({}, "optimizer flags (--opt KEY=VALUE), e.g. phi=cap_ratio")
    batch_size: int = _f(512, "effective batch: samples per optimizer step, all processes", ge=1, le=MAX_BATCH)
    micro_batch_size: int = _f(128, "samples per forward/backward (exact accumulation fills the rest)",
                               ge=1, le=MAX_BATCH)
    lr: float = _f(0.01, "peak learning rate", gt=0, allow_inf_nan=False)
    warmup_steps: int = _f(10, "linear warmup steps (capped by the run's steps)", ge=0, le=MAX_STEPS)
    epochs: float = _f(3.0, "epoch budget: steps = ceil(epochs·N / batch)", gt=0, le=MAX_EPOCHS,
                       allow_inf_nan=False)
    steps: int | None = _f(None, "optimizer steps (overrides epochs)", ge=1, le=MAX_STEPS)
    stop_after_steps: int | None = _f(None, "stop the run after this many optimizer steps, evaluated and "
                                      "checkpointed, without changing its LR schedule (which still spans the "
                                      "whole run); the summary says stopped_early (docs/training.md)",
                                      ge=1, le=MAX_STEPS)
    schedule: str = _f("poly", "warmup then polynomial decay, or warmup then constant; each phase's default")
    power: float = _f(1.0, "polynomial decay power (1: linear)", gt=0, allow_inf_nan=False)
    end_lr: float = _f(0.0, "final learning rate of the polynomial decay", ge=0, allow_inf_nan=False)
    seed: int = _f(0, "seed of the model's initialisation, the data order and the masks", ge=0)
    eval_every: int = _f(0, "steps between held-out evaluations (0: only at the end)", **_EVERY)
    eval_split: str = _f("validation", "split evaluated during training (the summary adds test)")
    log_every: int = _f(1, "steps between trust-ratio summaries in metrics.jsonl (0: none)", **_EVERY)
    trust_every: int = _f(0, "steps between per-tensor trust-ratio records in trust.jsonl (0: none)", **_EVERY)
    checkpoint_every: int = _f(0, "steps between checkpoints (0: only at the end)", **_EVERY)
    keep_checkpoints: int = _f(2, "newest checkpoints of this run kept in the run directory (an integer >= 1)",
                               **_POS)
    out: str = _f("runs/latest", "run directory (metrics.jsonl, checkpoints, summary.json, curves.png)",
                  min_length=1)
    threads: int | None = _f(None, "torch threads (unset: all cores)", **_POS)
    precision: str = _f("fp32", "bf16: bf16 parameters, fp32 masters in Lamb/Lars; fp16: autocast + GradScaler")
    nonfinite: str = _f("skip", "non-finite gradients: skip the step, or raise (the run fails)")
    strategy: str = _f("ddp", "with several processes: ddp (replicated) or fsdp (FSDP2, sharded)")
    dist_timeout: float = _f(DEFAULT_TIMEOUT_S, "with several processes: seconds a collective waits for the "
                             "others before the run fails (a stuck or dead rank)", gt=0, allow_inf_nan=False)
    phases: list[Any] | None = _f(  # items checked by check_phase, with its messages
        None, "multi-phase run (config file only): a list of dicts with batch_size, lr, warmup_steps, steps or "
        "epochs, and optionally seq_len, micro_batch_size, power, end_lr, schedule, optimizer_state")
    progress: bool = _f(True, "progress bar")
    plot: bool = _f(True, "write curves.png at the end")
    tensorboard: bool = _f(False, "also write TensorBoard scalars to <out>/tensorboard")
    step_in_backward: bool = _f(False, "step each tensor in the backward pass as soon as its gradient is complete "
                                "and free it (Lamb/Lars without max_grad_norm; needs nonfinite raise; "
                                "docs/step_in_backward.md)")
    noise_scale: bool = _f(False, "measure the gradient noise scale B_simple from the micro-batch and full-batch "
                                  "gradients, logged per evaluation (needs accumulation or several processes; "
                                  "docs/noise-scale.md)")
    noise_scale_ema: float = _f(0.99, "decay of the noise scale's moving averages of |G|² and tr(Σ)", ge=0, lt=1,
                                allow_inf_nan=False)
    # your own data and model: passed to the task as options only when set (docs/own-data.md)
    data: list[str] | None = _f(None, "training data: files, folders or globs")
    eval_data: list[str] | None = _f(None, "held-out data (else a split of --data)")
    text_field: str = _f("text", "field of the text in JSONL/CSV rows")
    label_field: str = _f("label", "field of the label in JSONL/CSV rows")
    tokenizer: str | None = _f(None, "a local Hugging Face tokenizer folder")
    model_config: str | None = _f(None, "a Hugging Face model config JSON file")
    model_size: str | None = _f(None, "a built-in model size (e.g. bert-mini)")
    model: str | None = _f(None, "a local Hugging Face model folder")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for name in ("task", "optimizer", *CHOICES):
            value, allowed = getattr(self, name), choices_of(name)
            if value.lower().replace("-", "_") not in allowed and value not in allowed:
                raise ValueError(f"Invalid {name}: {value!r} (allowed: {' | '.join(allowed)})")
        if self.micro_batch_size > self.batch_size and not self.phases:
            raise ValueError(f"Invalid micro_batch_size: {self.micro_batch_size} "
                             f"(allowed: <= batch_size = {self.batch_size})")
        if not self.out.strip():
            raise ValueError(f"Invalid out: {self.out!r} (allowed: a directory path, not empty)")
        for i, ph in enumerate(self.phases or []):
            check_phase(i, ph)
        if self.step_in_backward:
            check_step_in_backward(self)
        if self.noise_scale and (self.strategy == "fsdp" or self.step_in_backward):
            other = "strategy 'fsdp'" if self.strategy == "fsdp" else "step_in_backward"
            raise ValueError(f"Invalid noise_scale: True with {other} (allowed: with strategy 'ddp' and without "
                             "step_in_backward: the hooks would see shards, or the full-batch gradient is consumed "
                             "in the backward)")
        for name in DATA_FIELDS:  # one place per value: either the field or a task option, not both
            if name in self.task_options and getattr(self, name) != DEFAULTS[name]:
                raise ValueError(f"Invalid task_options key {name!r}: {name} is set too (allowed: one of the two)")
        return self

    def task_build_options(self) -> dict[str, Any]:
        """The task's options: ``task_options`` plus the data/model fields that are set."""
        return {**self.task_options, **{k: getattr(self, k) for k in DATA_FIELDS if getattr(self, k) != DEFAULTS[k]}}


def check_step_in_backward(cfg: TrainConfig) -> None:
    """What stepping inside the backward pass cannot do: each needs every gradient before any tensor changes."""
    if cfg.nonfinite != "raise":
        raise ValueError(f"Invalid nonfinite: {cfg.nonfinite!r} with step_in_backward (allowed: 'raise'; skipping a "
                         "step needs every gradient before the first tensor is updated)")
    if cfg.precision == "fp16":
        raise ValueError("Invalid precision: 'fp16' with step_in_backward (allowed: fp32 | bf16-autocast | bf16; "
                         "the GradScaler unscales and checks every gradient before the step)")
    if not hasattr(optimizer_info(cfg.optimizer).cls, "step_params"):
        raise ValueError(f"Invalid optimizer: {cfg.optimizer!r} with step_in_backward (allowed: a Lamb or Lars "
                         "optimizer or preset; torch's optimizers cannot step a subset of their tensors)")


#: the data/model fields handed to the task (see ``TrainConfig.task_build_options``)
DATA_FIELDS = ("data", "eval_data", "text_field", "label_field", "tokenizer", "model_config", "model_size", "model")
FIELDS = TrainConfig.__pydantic_fields__
DEFAULTS = {name: (f.default_factory() if f.default_factory else f.default) for name, f in FIELDS.items()}


def config_schema() -> dict[str, Any]:
    """The JSON schema of a config file (every key, its type, default, bounds and help)."""
    return TypeAdapter(TrainConfig).json_schema()


def make_config(values: dict[str, Any]) -> TrainConfig:
    """``TrainConfig(**values)`` with a ValueError of one line naming the first bad key and what is allowed."""
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ValueError(one_line(exc)) from None


def one_line(exc: ValidationError) -> str:
    """The first error of a ValidationError as ``Invalid <key>: <value> (<what is allowed>)``."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "value_error":  # our own message, already "Invalid <key>: ... (allowed: ...)"
        return str(err["ctx"]["error"])
    if err["type"] == "unexpected_keyword_argument":
        return f"Invalid key {loc!r} (allowed: {', '.join(FIELDS)})"
    return f"Invalid {loc}: {err['input']!r} ({err['msg'][0].lower()}{err['msg'][1:]})"


def value_type(name: str) -> type:
    """The type of a field's value, without ``None``: bool, int, float, str, list or dict."""
    annotation = FIELDS[name].annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def read_yaml(text: str, what: str) -> Any:
    """YAML text (JSON is YAML) with the safe loader; a malformed or unsafe document is a one-line error."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"Invalid {what}: not plain YAML{at}: {reason} (allowed: YAML/JSON scalars, "
                         "lists and mappings, no tags)") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """The keys of a ``--config`` file, checked: a mapping of known keys."""
    if not path.exists():
        raise ValueError(f"Invalid --config: config file not found: {path}")
    if not path.is_file():
        raise ValueError(f"Invalid --config: {path} is not a file (allowed: a YAML or JSON file)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"Invalid --config: cannot read {path}: {exc}") from None
    values = read_yaml(text, f"--config {path}") or {}
    if not isinstance(values, dict):
        raise ValueError(f"Invalid --config: {path} must hold a mapping of options (found {type(values).__name__})")
    unknown = sorted(str(k) for k in values if k not in FIELDS)
    if unknown:
        raise ValueError(f"Invalid --config: unknown keys in {path}: {unknown} (allowed: {', '.join(FIELDS)})")
    return values


def check_run_dir(out: str) -> None:
    """The run directory can be created and written (checked before any work)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"Invalid out: {out!r} is a file (allowed: a directory, existing or not)")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"Invalid out: {out!r} cannot be created ({parent} is not a writable directory)")


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
    for k in ("batch_size", "steps", "micro_batch_size", "seq_len", "warmup_steps"):
        v = ph.get(k, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "warmup_steps" else 1) or v > MAX_BATCH:
            raise ValueError(f"Invalid phases[{i}] {k}: {v!r} (allowed: an integer >= "
                             f"{0 if k == 'warmup_steps' else 1})")
    for k in ("lr", "epochs", "power"):
        v = ph.get(k, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= MAX_EPOCHS or k != "epochs") \
                or not (v > 0 and math.isfinite(v)):
            raise ValueError(f"Invalid phases[{i}] {k}: {v!r} (allowed: a finite number > 0"
                             + (f", at most {MAX_EPOCHS:g})" if k == "epochs" else ")"))
    if ph.get("schedule", "poly") not in SCHEDULES:
        raise ValueError(f"Invalid phases[{i}] schedule: {ph['schedule']!r} (allowed: {' | '.join(SCHEDULES)})")
