"""``largebatch train``: train a task with a large-batch recipe.

With no arguments: a small BERT masked-LM on Shakespeare with LAMB at effective batch 256 (one micro-batch,
bf16 autocast), a few minutes on 2 cores, ending with held-out loss/accuracy and a plot.

Every option is a field of :class:`largebatch.train.config.TrainConfig`: the flags below are generated from
its fields (name, type, help, default), a ``--config`` YAML/JSON file may set any of them, and the values
merge in one order, later layers winning: the config's defaults, the task's defaults (``TASK_DEFAULTS``),
the file, the command line. Dict options (``task_options``, ``optimizer_options``) merge key by key.
Everything is validated before any work; a bad value exits 2 with one line naming the option.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# defaults per task (effective batch, micro-batch, peak LR, warmup, epochs); the file and the command line
# override them. mlm: 6 epochs and no dropout, measured in docs/results (a model this small underfits); one
# micro-batch of 256 under bf16 autocast, evaluated every 50 steps: the main job in about half the time of
# 2 × 128 in fp32 every 25, with the same held-out accuracy (benchmarks/e2e/README.md, "The main job").
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlm": dict(batch_size=256, micro_batch_size=256, precision="bf16-autocast", lr=0.015, warmup_steps=20,
                epochs=6.0, eval_every=50, task_options={"dropout": 0.0}),
    "classify": dict(optimizer="adamw", batch_size=32, micro_batch_size=32, lr=1e-3, warmup_steps=10, epochs=3.0,
                     eval_every=20, task_options={"checkpoint": "runs/mlm"}),
    "image": dict(batch_size=1024, micro_batch_size=256, lr=0.02, warmup_steps=10, epochs=2.0, eval_every=25),
}
DEFAULT_TASK = "mlm"
#: fields set through their own flags rather than one flag each
SPECIAL = ("task_options", "optimizer_options", "phases")
MERGED = ("task_options", "optimizer_options")


def default_text(name: str, base: Any) -> str:
    """``default: X`` as the command runs it: the default task's value, then the other tasks' where they differ."""
    def shown(task: str) -> Any:
        return TASK_DEFAULTS[task].get(name, base) if name != "out" else f"runs/{task}"
    def shown_or_unset(task: str) -> Any:
        value = shown(task)
        return "unset" if value is None else value
    first = shown_or_unset(DEFAULT_TASK)
    others = [f"{t}: {shown_or_unset(t)}" for t in TASK_DEFAULTS if t != DEFAULT_TASK and shown_or_unset(t) != first]
    return f"default: {first}" + (f" ({', '.join(others)})" if others else "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from largebatch.train.config import DEFAULTS, FIELDS, choices_of, value_type

    for name, info in FIELDS.items():
        if name in SPECIAL:
            continue
        flag, kind = "--" + name.replace("_", "-"), value_type(name)
        allowed = choices_of(name)
        text = (info.description or "") + (f"; one of {' | '.join(allowed)}" if allowed else "")
        help_text = f"{text} ({default_text(name, DEFAULTS[name] if name != 'task' else DEFAULT_TASK)})"
        help_text = help_text.replace("%", "%%")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is list:
            p.add_argument(flag, nargs="+", default=None, metavar="PATH", help=help_text)
        else:
            p.add_argument(flag, type=kind, default=None, help=help_text)
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="optimizer flag, e.g. --opt phi=cap_ratio --opt weight_decay=0.01 (repeatable)")
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. --task-opt hidden=256 (repeatable; mlm default: dropout=0.0)")
    p.add_argument("--config", type=Path, help="YAML or JSON file with any of the options above, and phases")
    p.add_argument("--resume", help="checkpoint file or run directory to continue from")


def parse_kv(items: list[str], what: str) -> dict[str, Any]:
    """``KEY=VALUE`` items, each value read as YAML (``3`` is an int, ``abc`` a string)."""
    from largebatch.train.config import read_yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Invalid {what} {item!r} (allowed: KEY=VALUE)")
        out[key.strip()] = read_yaml(value, f"{what} {key.strip()}")
    return out


def command_line_values(args: argparse.Namespace) -> dict[str, Any]:
    """What the command line sets (flags left out set nothing)."""
    from largebatch.train.config import FIELDS

    values = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
    for key, items, flag in (("optimizer_options", args.opt, "--opt"), ("task_options", args.task_opt, "--task-opt")):
        if items:
            values[key] = parse_kv(items, flag)
    return values


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; dict options merge key by key (a file's task_options keeps the task's defaults)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            below = out.get(key)
            out[key] = {**below, **value} if key in MERGED and isinstance(below, dict) and isinstance(value, dict) \
                else value
    return out


def build_config(args: argparse.Namespace):
    """The run's config: config defaults < task defaults < ``--config`` file < command line."""
    from largebatch.train.config import make_config, read_config_file

    file_values = read_config_file(args.config) if args.config is not None else {}
    cli = command_line_values(args)
    task = cli.get("task", file_values.get("task", DEFAULT_TASK))
    if not isinstance(task, str) or task not in TASK_DEFAULTS:
        raise ValueError(f"Invalid task: {task!r} (allowed: {' | '.join(TASK_DEFAULTS)})")
    defaults = task_defaults(task, model_folder=bool(cli.get("model") or file_values.get("model")))
    values = merge({"task": task, "out": f"runs/{task}"}, defaults, file_values, cli)
    if "micro_batch_size" not in {**file_values, **cli}:
        values = fit_default_micro_batch(values)
    return make_config(values)


def fit_default_micro_batch(values: dict[str, Any]) -> dict[str, Any]:
    """A task's default micro-batch gives way to a smaller batch the user chose (as a phase's does); values of
    the wrong type are left for the config's own one-line error."""
    batch, micro = values.get("batch_size"), values.get("micro_batch_size")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (batch, micro)) and micro > batch:
        return {**values, "micro_batch_size": batch}
    return values


def task_defaults(task: str, model_folder: bool) -> dict[str, Any]:
    """The task's defaults; classify's default encoder (the runs/mlm checkpoint) gives way to a ``model`` folder."""
    defaults = TASK_DEFAULTS[task]
    if model_folder and "checkpoint" in defaults.get("task_options", {}):
        options = {k: v for k, v in defaults["task_options"].items() if k != "checkpoint"}
        defaults = {**defaults, "task_options": options}
    return defaults


def check_before_work(cfg) -> None:
    """Everything that can be checked before the task is built: the run directory, the task's options."""
    from largebatch.tasks import check_task_options
    from largebatch.train.config import check_run_dir

    check_run_dir(cfg.out)
    check_task_options(cfg.task, cfg.task_build_options())


def error(message: str, status: int = 2) -> int:
    print(f"largebatch train: error: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    try:
        cfg = build_config(args)
        check_before_work(cfg)
    except (ValueError, TypeError) as exc:
        return error(str(exc))
    from largebatch.tasks import DataMissingError
    from largebatch.train.allocator import keep_freed_memory
    from largebatch.checkpoint import CheckpointError
    from largebatch.train.distributed import CollectiveTimeout
    from largebatch.train.loop import train

    keep_freed_memory()
    try:
        summary = train(cfg, resume=args.resume)
    except ModuleNotFoundError:
        raise  # largebatch.cli.main names the extra to install
    except (DataMissingError, CheckpointError, ImportError, ValueError, TypeError) as exc:
        return error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except (FloatingPointError, CollectiveTimeout) as exc:  # --nonfinite raise; a stuck or dead rank
        return error(str(exc), status=1)
    report(summary, cfg.out)
    return 1 if summary.get("diverged") else 0


def report(summary: dict[str, Any], out: str) -> None:
    """The end of a run on the terminal: the summary, the held-out result against the baseline, the files."""
    print("\nsummary: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))
    if "test_accuracy" in summary and summary["test_accuracy"] is not None:
        line = f"held-out test: loss {summary.get('test_loss')}, accuracy {summary['test_accuracy']:.4f}"
        if summary.get("baseline_accuracy") is not None:
            line += f" (trivial baseline {summary['baseline_accuracy']:.4f})"
        print(line)
    if summary.get("at_or_below_baseline"):
        print("warning: the result is at or below the task's trivial baseline (nothing was learnt)")
    if summary.get("diverged"):
        print("the run diverged (non-finite loss): exit status 1")
    print(f"run directory: {out}  (metrics.jsonl, summary.json, curves.png, checkpoints)")
