"""``largebatch train``: train a task with a large-batch recipe.

With no arguments: a small BERT masked-LM on Shakespeare with LAMB at effective batch 256 (2 × 128 via
exact accumulation), a few minutes on 2 cores, ending with held-out loss/accuracy and a plot.
Any option can come from a YAML/JSON file (``--config``); command-line options override it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

# defaults per task (effective batch, micro-batch, peak LR, warmup, epochs); the CLI overrides them
TASK_DEFAULTS = {
    # 6 epochs: measured here, 373 steps in 2 min, held-out masked accuracy 14.4% (2 epochs: 7.8%, barely
    # above the 7.05% of always guessing the most frequent token).
    # dropout off: a model this small on ~1 M tokens underfits (it still improves at the last epoch), and
    # dropout costs ~35% of the step time on CPU (measured: 1.67 s vs 2.57 s per 128-sequence micro-batch)
    "mlm": dict(batch_size=256, micro_batch_size=128, lr=0.015, warmup_steps=20, epochs=6.0, eval_every=25,
                task_options={"dropout": 0.0}),
    "classify": dict(optimizer="adamw", batch_size=32, micro_batch_size=32, lr=1e-3, warmup_steps=10, epochs=3.0,
                     eval_every=20, task_options={"checkpoint": "runs/mlm"}),
    "image": dict(batch_size=1024, micro_batch_size=256, lr=0.02, warmup_steps=10, epochs=2.0, eval_every=25),
}
_FIELDS = ("optimizer", "batch_size", "micro_batch_size", "lr", "warmup_steps", "epochs", "steps", "schedule",
           "power", "seed", "eval_every", "trust_every", "checkpoint_every", "out", "threads", "precision", "nonfinite", "strategy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["mlm", "classify", "image"], default=None, help="default: mlm")
    p.add_argument("--optimizer", help="lamb | lars | adamw | sgd | a preset (see `largebatch presets`); default lamb")
    p.add_argument("--batch-size", type=int, help="effective batch per optimizer step")
    p.add_argument("--micro-batch-size", type=int, help="samples per forward/backward (accumulation fills the rest)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--epochs", type=float, help="epoch budget (steps = ceil(epochs·N / batch))")
    p.add_argument("--steps", type=int, help="number of optimizer steps (overrides --epochs)")
    p.add_argument("--schedule", choices=["poly", "constant"])
    p.add_argument("--power", type=float, help="polynomial decay power (1 = linear)")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int, help="steps between held-out evaluations")
    p.add_argument("--trust-every", type=int, help="steps between per-tensor trust-ratio records (trust.jsonl)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (always one at the end)")
    p.add_argument("--out", help="run directory (metrics.jsonl, checkpoints, summary.json, curves.png)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--precision", choices=["fp32", "bf16-autocast", "bf16", "fp16"],
                   help="bf16: bf16 parameters with fp32 master weights and moments in Lamb/Lars; "
                        "fp16: autocast + GradScaler, unscaled before the trust ratio")
    p.add_argument("--nonfinite", choices=["skip", "raise"], help="non-finite gradients: skip the step (default) or raise")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="under torchrun: DDP (default) or FSDP2 sharding")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="optimizer flag, e.g. --opt phi=cap_ratio --opt weight_decay=0.01 (repeatable)")
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. --task-opt hidden=256 (repeatable)")
    p.add_argument("--config", type=Path, help="YAML or JSON file with any of the options above")
    p.add_argument("--resume", help="checkpoint file or run directory to continue from")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log the metrics to <out>/tensorboard (needs: pip install 'largebatch[tensorboard]')")


def _parse_kv(items: list[str], what: str) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what} {item!r} must be KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_config(args: argparse.Namespace):
    from largebatch.train.loop import TrainConfig

    file_cfg: dict = {}
    if args.config is not None:
        if not args.config.exists():
            raise ValueError(f"config file not found: {args.config}")
        import yaml

        file_cfg = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(file_cfg, dict):
            raise ValueError(f"config file {args.config} must hold a mapping")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(file_cfg) - known
        if unknown:
            raise ValueError(f"unknown keys in {args.config}: {sorted(unknown)} (allowed: {sorted(known)})")
    task = args.task or file_cfg.get("task", "mlm")
    values = {"task": task, **TASK_DEFAULTS[task], "out": f"runs/{task}", **file_cfg}
    for name in _FIELDS:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    values["optimizer_options"] = {**values.get("optimizer_options", {}), **_parse_kv(args.opt, "--opt")}
    values["task_options"] = {**values.get("task_options", {}), **_parse_kv(args.task_opt, "--task-opt")}
    if args.no_progress:
        values["progress"] = False
    if args.tensorboard:
        values["tensorboard"] = True
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = build_config(args)
        from largebatch.optim import optimizer_names

        if cfg.optimizer.lower().replace("-", "_") not in optimizer_names():
            raise ValueError(f"unknown optimizer {cfg.optimizer!r} (allowed: {', '.join(optimizer_names())})")
    except (ValueError, TypeError) as exc:
        print(f"largebatch train: error: {exc}", file=sys.stderr)
        return 2
    from largebatch.tasks import DataMissingError
    from largebatch.train.allocator import keep_freed_memory
    from largebatch.train.checkpoint import CheckpointError
    from largebatch.train.loop import train

    keep_freed_memory()
    try:
        summary = train(cfg, resume=args.resume)
    except (DataMissingError, CheckpointError, ImportError) as exc:
        print(f"largebatch train: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:  # invalid optimizer flags and the like
        print(f"largebatch train: error: {exc}", file=sys.stderr)
        return 2
    print("\nsummary: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))
    metric = "accuracy"
    if f"test_{metric}" in summary:
        line = f"held-out test: loss {summary.get('test_loss', float('nan')):.4f}, accuracy {summary['test_accuracy']:.4f}"
        if "test_unigram_accuracy" in summary:
            line += f" (unigram baseline {summary['test_unigram_accuracy']:.4f})"
        print(line)
    print(f"run directory: {cfg.out}  (metrics.jsonl, summary.json, curves.png, checkpoints)")
    return 1 if summary.get("diverged") else 0
