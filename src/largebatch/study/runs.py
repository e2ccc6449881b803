"""Loading a study's run files: summaries, per-step metrics, trust ratios, configs, and the provenance header.

Every reader tolerates a study that is still running: a summary or a metrics line being written is skipped.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
from pathlib import Path

from .stats import finite

VERSIONED = ("largebatch", "torch", "transformers", "tokenizers", "numpy", "matplotlib")


CURVE_POINTS = 1500      # training-loss curves are averaged into at most this many bins per run


BASELINES_FILE = "baselines.json"  # a study's calibration baselines that are not training runs (the MLM bigram)


def load_baselines(study_dir: Path) -> dict:
    """``<study>/baselines.json`` (name -> the baseline's numbers), {} when absent or being written."""
    path = Path(study_dir) / BASELINES_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def load_runs(study_dir: Path) -> list[dict]:
    out = []
    for d in sorted((Path(study_dir) / "runs").glob("*")):
        f = d / "summary.json"
        if f.exists():
            try:
                s = json.loads(f.read_text())
            except json.JSONDecodeError:  # being written right now
                continue
            s["dir"] = str(d)
            s.setdefault("run", d.name)
            out.append(s)
    return out


def runs_in_progress(study_dir: Path) -> list[str]:
    """Run directories with metrics but no summary yet (a study that is still running)."""
    return sorted(d.name for d in (Path(study_dir) / "runs").glob("*")
                  if d.is_dir() and not (d / "summary.json").exists() and (d / "metrics.jsonl").exists())


@functools.lru_cache(maxsize=512)
def _load_metrics_cached(path: str, mtime: float, size: int) -> dict:
    steps, samples, losses, evals, phases, trust = [], [], [], [], [], []
    block_loss, block_records = [], []  # a thinned log's block means (archive.compact_run); else the loss, 1
    compute_s, last_samples, last_step, diverged = 0.0, 0, 0, False
    prev_samples = 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            step = r.get("step", 0)
            n = r.get("samples", 0)
            sps = r.get("samples_per_s")
            done = n - prev_samples if step > last_step else 0
            if finite(sps) and sps > 0 and done > 0:
                compute_s += done / sps   # batch_size / samples_per_s of this step (evaluation time excluded)
            prev_samples = n
            if step <= last_step:  # a re-logged stretch: keep the latest records only
                keep = [i for i, s in enumerate(steps) if s < step]
                steps, samples, losses = steps[:len(keep)], samples[:len(keep)], losses[:len(keep)]
                block_loss, block_records = block_loss[:len(keep)], block_records[:len(keep)]
                evals = [e for e in evals if e["step"] < step]
                phases = [p for p in phases if p[0] < step]
                trust = [t for t in trust if t[0] < step]
            last_step, last_samples = step, n
            steps.append(step)
            samples.append(n)
            losses.append(r.get("loss", float("nan")))
            block_loss.append(r.get("loss_block_mean", losses[-1]))
            block_records.append(r.get("loss_block_records", 1))
            if "phase" in r and (not phases or phases[-1][1] != r["phase"]):
                phases.append((step, r["phase"]))
            if "trust_ratio_mean" in r:
                trust.append((step, r["trust_ratio_mean"], r.get("trust_ratio_min"), r.get("trust_ratio_max")))
            if any(k.startswith("validation_") for k in r):
                evals.append({k: v for k, v in r.items() if k in ("step", "samples") or k.startswith("validation_")})
            diverged = diverged or bool(r.get("diverged"))
    return {"steps": steps, "samples": samples, "loss": losses, "evals": evals, "phases": phases, "trust": trust,
            "compute_s": compute_s, "last_step": last_step, "last_samples": last_samples, "diverged": diverged,
            "block_loss": block_loss, "block_records": block_records}


def load_metrics(run_dir: str | Path) -> dict:
    """A run's metrics.jsonl, read once: per-step step/samples/loss, the evaluation records, the phase starts
    ``[(step, phase)]``, the trust-ratio summaries ``[(step, mean, min, max)]`` and the training compute time
    in seconds (Σ samples of the step / samples_per_s)."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return {"steps": [], "samples": [], "loss": [], "evals": [], "phases": [], "trust": [], "compute_s": 0.0,
                "last_step": 0, "last_samples": 0, "diverged": False, "block_loss": [], "block_records": []}
    st = p.stat()
    return _load_metrics_cached(str(p), st.st_mtime, st.st_size)


def binned_curve(xs: list, ys: list, points: int = CURVE_POINTS) -> tuple[list, list]:
    """Average (x, y) into at most ``points`` consecutive bins (non-finite y skipped)."""
    if len(xs) <= points:
        return list(xs), [y if finite(y) else float("nan") for y in ys]
    size = math.ceil(len(xs) / points)
    bx, by = [], []
    for i in range(0, len(xs), size):
        seg = [y for y in ys[i:i + size] if finite(y)]
        bx.append(xs[min(i + size, len(xs)) - 1])
        by.append(sum(seg) / len(seg) if seg else float("nan"))
    return bx, by


def load_trust(run_dir: str | Path) -> tuple[list[int], dict[str, list[float]]]:
    """trust.jsonl -> (steps, {tensor name: ratios at those steps}), names in the file's order."""
    p = Path(run_dir) / "trust.jsonl"
    steps: list[int] = []
    series: dict[str, list[float]] = {}
    if not p.exists():
        return steps, series
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        tr = r.get("trust_ratio") or {}
        for name in tr:
            series.setdefault(name, [float("nan")] * len(steps))
        steps.append(r.get("step", len(steps) + 1))
        for name, vals in series.items():
            v = tr.get(name)
            vals.append(float(v) if finite(v) else float("nan"))
    return steps, series


def model_order(names: list[str]) -> list[str]:
    """Tensor names in (approximate) model order, input to output.

    The optimizers log their parameter groups one after the other (weights, then biases and norms), each
    in model order. Each name is placed right after the already-placed name it shares the longest dotted
    prefix with (the last such), or at the end when it shares none: ``stem.1.weight`` lands after
    ``stem.0.weight``, ``head.bias`` after ``head.weight``.
    """
    ordered: list[list[str]] = []
    for name in names:
        toks = name.split(".")
        best, where = 0, len(ordered)
        for i, other in enumerate(ordered):
            k = 0
            for a, b in zip(toks[:-1], other[:-1]):
                if a != b:
                    break
                k += 1
            if k > 0 and k >= best:
                best, where = k, i + 1
        ordered.insert(where, toks)
    return [".".join(t) for t in ordered]


def steps_to_target(run_dir: str, key: str, target: float) -> tuple[int | None, bool]:
    """The step of the first evaluation that met the target (None: never), and whether it was the run's first
    evaluation: then the target was met at that step or earlier, so the step is only an upper bound."""
    evals = [r for r in load_metrics(run_dir)["evals"] if finite(r.get(key))]
    for i, r in enumerate(evals):
        if r[key] >= target:
            return r["step"], i == 0
    return None, False


def read_config(run_dir: str) -> dict:
    p = Path(run_dir) / "config.json"
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except json.JSONDecodeError:
        return {}


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


CORPUS_OPTIONS = ("data", "eval_data", "model_config")  # task options that name the user's own files


def _size(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def _total_size(paths: list[str]) -> int | None:
    sizes = [_size(Path(p)) for p in paths]
    return None if any(s is None for s in sizes) else sum(sizes)


def corpus(runs: list[dict]) -> dict | None:
    """The user's own corpus / model config of a study (from its runs' config.json), with sizes in bytes (None
    when a path is not on this machine, or is a glob)."""
    for r in runs:
        cfg = read_config(r["dir"])
        options = {**(cfg.get("task_options") or {}), **cfg}  # config fields (the trainer's), else task options
        given = {k: options[k] for k in CORPUS_OPTIONS if options.get(k)}
        if given:
            paths = {k: [str(p) for p in (v if isinstance(v, list) else [v])] for k, v in given.items()}
            return {k: {"path": " ".join(v), "bytes": _total_size(v)} for k, v in paths.items()}
    return None


def header_info(study_dir: Path, runs: list[dict], suite_name: str) -> dict:
    """Commands, software versions, git commit, run count and training compute time of a study."""
    commit = _git(study_dir, "rev-parse", "HEAD") if study_dir.exists() else None
    dirty = bool(_git(study_dir, "status", "--porcelain", "--untracked-files=no")) if commit else None
    running = runs_in_progress(study_dir)
    compute = sum(load_metrics(r["dir"])["compute_s"] for r in runs)
    running_s = sum(load_metrics(study_dir / "runs" / n)["compute_s"] for n in running)
    files = corpus(runs)
    flags = "".join(f" --{k.replace('_', '-')} {v['path']}" for k, v in (files or {}).items())
    return {
        "commands": [f"largebatch study {suite_name} --out {study_dir}{flags}", f"largebatch report {study_dir}"],
        **({"corpus": files} if files else {}),
        "versions": {**{k: _version(k) for k in VERSIONED}, "python": platform.python_version()},
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} logical CPUs",
        "git_commit": commit, "git_dirty": dirty,
        "runs": len(runs), "runs_in_progress": running,
        "compute_hours": compute / 3600, "compute_hours_in_progress": running_s / 3600,
        "by_kind": {k: sum(r.get("kind") == k for r in runs) for k in sorted({str(r.get("kind")) for r in runs})},
    }
