"""``largebatch export RUN DIR``: a run's newest checkpoint as a transformers model folder.

The task is rebuilt from the checkpoint's own config (same data, tokenizer and model options; the
tokenised corpus and WordPiece vocabulary come from the cache when present), the checkpoint's weights
are loaded into it, and the task's ``save_pretrained`` writes the model and tokenizer, so
``AutoModelForMaskedLM.from_pretrained(DIR)`` (mlm) or ``AutoModelForSequenceClassification`` (classify)
and ``AutoTokenizer.from_pretrained(DIR)`` load them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (its newest ckpt-*.pt) or a checkpoint file")
    p.add_argument("directory", help="a new or empty folder to write the model and tokenizer into")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")


def task_of(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(task name, options to build it) from a checkpoint's run config, as ``train`` built it."""
    from largebatch.train.config import make_config

    if not isinstance(config, dict) or "task" not in config:
        raise ValueError("Invalid run: its checkpoint holds no run config (allowed: a run of largebatch train)")
    cfg = make_config(config)
    return cfg.task, {"seed": cfg.seed, **cfg.task_build_options()}


def export_run(run: str | Path, directory: str | Path) -> Path:
    from largebatch.tasks import build_task
    from largebatch.checkpoint import load_checkpoint

    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"Invalid directory: {str(directory)!r} exists and is not an empty folder (allowed: a new "
                         "or empty folder; nothing is overwritten)")
    ckpt = load_checkpoint(run)
    name, options = task_of(ckpt.get("config", {}))
    task = build_task(name, **options)
    if not hasattr(task, "save_pretrained"):
        raise ValueError(f"Invalid run: task {name!r} has no export")
    task.model.load_state_dict(ckpt["model"])
    return task.save_pretrained(task.model, directory)


def run(args: argparse.Namespace) -> int:
    import torch

    from largebatch.tasks import DataMissingError
    from largebatch.checkpoint import CheckpointError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        out = export_run(args.run, args.directory)
    except (ValueError, TypeError, CheckpointError, DataMissingError, ImportError) as exc:
        print(f"largebatch export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: load with transformers' Auto*.from_pretrained({str(out)!r})")
    return 0
