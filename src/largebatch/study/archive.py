"""Shrink a finished study for committing: thin each finished run's per-step metrics.jsonl.

A batch-16 run logs ~20,000 steps (~6 MB). ``compact_run`` keeps every evaluation record, the first and
the last record, and every k-th step so that at most ``max_records`` remain; the report reads the result
unchanged (its curves are binned to fewer points anyway, and the compute time is estimated from the kept
steps' throughput over the samples since the previous kept record). Each kept record also carries the mean
training loss of the records it stands for (``loss_block_mean``, ``loss_block_records``), so that a trailing
mean of the loss (the steps to a training-loss target) reads the same from the thinned log as from the full
one; logs thinned before these fields existed give a noisier trailing mean (a subsample). Checkpoints are not touched (they are
git-ignored). Only runs with a summary.json are compacted: an unfinished run keeps its full log so that it
can resume. Irreversible by design; the summary records what was kept.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..checkpoint import replaced_atomically, write_atomically


def _keep(record: dict, k: int, first: int, last: int) -> bool:
    step = record.get("step", 0)
    return (step in (first, last) or step % k == 0 or record.get("diverged")
            or any(key.startswith("validation_") for key in record))


def compact_run(run_dir: str | Path, max_records: int = 2000) -> tuple[int, int] | None:
    """Thin ``run_dir/metrics.jsonl`` in place (atomically); returns (kept, total) or None if not finished."""
    run_dir = Path(run_dir)
    path, summary_path = run_dir / "metrics.jsonl", run_dir / "summary.json"
    if not (path.exists() and summary_path.exists()):
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(records) <= max_records:
        return len(records), len(records)
    k = math.ceil(len(records) / max_records)
    first, last = records[0].get("step", 0), records[-1].get("step", 0)
    kept, block = [], []
    for r in records:
        if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"]):
            block.append(r["loss"])
        if _keep(r, k, first, last):
            if len(block) > 1:  # what the dropped records averaged to, so trailing means read as before
                r = {**r, "loss_block_mean": sum(block) / len(block), "loss_block_records": len(block)}
            kept.append(r)
            block = []
    with replaced_atomically(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    summary = json.loads(summary_path.read_text())
    summary["metrics_compacted"] = {"kept": len(kept), "of": len(records), "every": k}
    write_atomically(summary_path, json.dumps(summary, indent=2))
    return len(kept), len(records)


def compact_study(study_dir: str | Path, max_records: int = 2000) -> list[tuple[str, int, int]]:
    """Compact every finished run of a study; returns (run, kept, total) for the runs that changed."""
    out = []
    for run in sorted((Path(study_dir) / "runs").glob("*")):
        res = compact_run(run, max_records)
        if res is not None and res[0] < res[1]:
            out.append((run.name, *res))
    return out
