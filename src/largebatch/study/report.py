"""Build a study report from its run files: results.json, report.md and PNG plots (matplotlib).

Every number comes from the runs' own summary.json / metrics.jsonl / trust.jsonl / config.json; every
verdict sentence is computed from those numbers with the rule stated in the report (a difference counts
only beyond the seed spread). The pieces are separate: loading (``_runs``, ``load_metrics``,
``load_trust``), tables (pure functions of the loaded runs), verdicts (pure functions of the tables),
markdown (pure functions of the tables) and plots (:mod:`largebatch.study.report_plots`).

A study that is still running (some cells empty, no study.json yet) gives a partial report: missing
cells are shown as "—", the base LR is the provisional best of the sweep so far, and the verdicts say
what is not measured yet.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

NEAR_TIE = 0.02          # sweep: a second LR within 2% of the best validation loss is a near-tie
CURVE_POINTS = 1500      # training-loss curves are averaged into at most this many bins per run
LAMB_LIKE = ("lamb", "paper", "nvlamb")
VERSIONED = ("largebatch", "torch", "transformers", "tokenizers", "numpy", "matplotlib")


# ----------------------------------------------------------------------------------------------- loading
def _runs(study_dir: Path) -> list[dict]:
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


def _in_progress(study_dir: Path) -> list[str]:
    """Run directories with metrics but no summary yet (a study that is still running)."""
    return sorted(d.name for d in (Path(study_dir) / "runs").glob("*")
                  if d.is_dir() and not (d / "summary.json").exists() and (d / "metrics.jsonl").exists())


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@functools.lru_cache(maxsize=512)
def _load_metrics_cached(path: str, mtime: float, size: int) -> dict:
    steps, samples, losses, evals, phases, trust = [], [], [], [], [], []
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
            if _finite(sps) and sps > 0 and done > 0:
                compute_s += done / sps   # batch_size / samples_per_s of this step (evaluation time excluded)
            prev_samples = n
            if step <= last_step:  # a re-logged stretch: keep the latest records only
                keep = [i for i, s in enumerate(steps) if s < step]
                steps, samples, losses = steps[:len(keep)], samples[:len(keep)], losses[:len(keep)]
                evals = [e for e in evals if e["step"] < step]
                phases = [p for p in phases if p[0] < step]
                trust = [t for t in trust if t[0] < step]
            last_step, last_samples = step, n
            steps.append(step)
            samples.append(n)
            losses.append(r.get("loss", float("nan")))
            if "phase" in r and (not phases or phases[-1][1] != r["phase"]):
                phases.append((step, r["phase"]))
            if "trust_ratio_mean" in r:
                trust.append((step, r["trust_ratio_mean"], r.get("trust_ratio_min"), r.get("trust_ratio_max")))
            if any(k.startswith("validation_") for k in r):
                evals.append({k: v for k, v in r.items() if k in ("step", "samples") or k.startswith("validation_")})
            diverged = diverged or bool(r.get("diverged"))
    return {"steps": steps, "samples": samples, "loss": losses, "evals": evals, "phases": phases, "trust": trust,
            "compute_s": compute_s, "last_step": last_step, "last_samples": last_samples, "diverged": diverged}


def load_metrics(run_dir: str | Path) -> dict:
    """A run's metrics.jsonl, read once: per-step step/samples/loss, the evaluation records, the phase starts
    ``[(step, phase)]``, the trust-ratio summaries ``[(step, mean, min, max)]`` and the training compute time
    in seconds (Σ samples of the step / samples_per_s)."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return {"steps": [], "samples": [], "loss": [], "evals": [], "phases": [], "trust": [], "compute_s": 0.0,
                "last_step": 0, "last_samples": 0, "diverged": False}
    st = p.stat()
    return _load_metrics_cached(str(p), st.st_mtime, st.st_size)


def _metrics(run_dir: str) -> list[dict]:
    """Every record of metrics.jsonl (kept for callers of the old API; the report uses load_metrics)."""
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def binned_curve(xs: list, ys: list, points: int = CURVE_POINTS) -> tuple[list, list]:
    """Average (x, y) into at most ``points`` consecutive bins (non-finite y skipped)."""
    if len(xs) <= points:
        return list(xs), [y if _finite(y) else float("nan") for y in ys]
    size = math.ceil(len(xs) / points)
    bx, by = [], []
    for i in range(0, len(xs), size):
        seg = [y for y in ys[i:i + size] if _finite(y)]
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
            vals.append(float(v) if _finite(v) else float("nan"))
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


def _mean_spread(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if _finite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def steps_to_target(run_dir: str, key: str, target: float) -> tuple[int | None, bool]:
    """The step of the first evaluation that met the target (None: never), and whether it was the run's first
    evaluation: then the target was met at that step or earlier, so the step is only an upper bound."""
    evals = [r for r in load_metrics(run_dir)["evals"] if _finite(r.get(key))]
    for i, r in enumerate(evals):
        if r[key] >= target:
            return r["step"], i == 0
    return None, False


# ------------------------------------------------------------------------------------------------ header
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


def header_info(study_dir: Path, runs: list[dict], suite_name: str) -> dict:
    """Commands, software versions, git commit, run count and training compute time of a study."""
    commit = _git(study_dir, "rev-parse", "HEAD") if study_dir.exists() else None
    dirty = bool(_git(study_dir, "status", "--porcelain", "--untracked-files=no")) if commit else None
    running = _in_progress(study_dir)
    compute = sum(load_metrics(r["dir"])["compute_s"] for r in runs)
    running_s = sum(load_metrics(study_dir / "runs" / n)["compute_s"] for n in running)
    return {
        "commands": [f"largebatch study {suite_name} --out {study_dir}", f"largebatch report {study_dir}"],
        "versions": {**{k: _version(k) for k in VERSIONED}, "python": platform.python_version()},
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} logical CPUs",
        "git_commit": commit, "git_dirty": dirty,
        "runs": len(runs), "runs_in_progress": running,
        "compute_hours": compute / 3600, "compute_hours_in_progress": running_s / 3600,
        "by_kind": {k: sum(r.get("kind") == k for r in runs) for k in sorted({str(r.get("kind")) for r in runs})},
    }


# ------------------------------------------------------------------------------------------------ tables
def build_table(runs: list[dict], metric: str, target: float | None, key: str | None = None) -> dict:
    """optimizer -> batch -> cell over the ladder runs' ``test_<key or metric>`` (mean ± half-range)."""
    key = key or metric
    cells = defaultdict(list)
    for r in runs:
        if r.get("kind") == "ladder":
            cells[(r["optimizer"], r["batch_size"])].append(r)
    table: dict = {}
    for (opt, batch), rs in sorted(cells.items()):
        rs = sorted(rs, key=lambda r: r.get("seed", 0))
        vals = [r.get(f"test_{key}") for r in rs]
        mean, spread = _mean_spread(vals)
        loss_key = "test_precise_bn_loss" if key.startswith("precise_bn_") else "test_loss"
        loss_mean, loss_spread = _mean_spread([r.get(loss_key) for r in rs])
        hits = [steps_to_target(r["dir"], f"validation_{metric}", target) for r in rs] if target is not None else []
        stt = [step for step, _ in hits]
        table.setdefault(opt, {})[batch] = {
            "mean": mean, "spread": spread, "n": len(rs), "values": vals, "seeds": [r.get("seed") for r in rs],
            "steps": rs[0].get("total_steps"), "lr": rs[0]["lr"], "loss_mean": loss_mean, "loss_spread": loss_spread,
            "diverged": sum(bool(r.get("diverged")) for r in rs),
            "steps_to_target": [s for s in stt if s is not None], "reached_target": sum(s is not None for s in stt),
            "target_at_first_eval": sum(first for _, first in hits),
            "unigram": rs[0].get("test_unigram_accuracy"),
        }
    return table


def _unigram(table: dict) -> float | None:
    return next((c["unigram"] for row in table.values() for c in row.values() if _finite(c.get("unigram"))), None)


def sweep_points(runs: list[dict], smallest: int | None = None) -> dict[str, list[dict]]:
    """optimizer -> [{lr, validation_loss, diverged, run}] of the base-LR sweep (seed 0 at the smallest batch;
    the chosen LR's run is relabelled ``ladder`` by the runner, so it is included)."""
    by_opt: dict[str, list[dict]] = defaultdict(list)
    sweep_batch = {}
    for r in runs:
        if r.get("kind") == "sweep":
            sweep_batch.setdefault(r["optimizer"], r["batch_size"])
    for r in runs:
        opt = r["optimizer"]
        b0 = smallest if smallest is not None else sweep_batch.get(opt)
        if b0 is None or r.get("batch_size") != b0 or r.get("seed", 0) != 0 or r.get("kind") not in ("sweep", "ladder"):
            continue
        v = r.get("validation_loss")
        by_opt[opt].append({"lr": r["lr"], "validation_loss": v if _finite(v) else None,
                            "diverged": bool(r.get("diverged")) or not _finite(v), "run": r.get("run")})
    return {o: sorted(p, key=lambda x: x["lr"]) for o, p in by_opt.items() if o in sweep_batch}


def _same_lr(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def sweep_notes(points: list[dict], chosen: float | None, tie: float = NEAR_TIE) -> list[str]:
    """Sensitivity notes computed from a sweep: diverged LRs, best at a grid edge, near-ties."""
    notes = []
    bad = [p["lr"] for p in points if p["diverged"]]
    if bad:
        notes.append("diverged / non-finite at LR " + ", ".join(f"{lr:.3g}" for lr in bad))
    ok = sorted((p for p in points if not p["diverged"]), key=lambda p: p["validation_loss"])
    if not ok:
        notes.append("no LR gave a finite validation loss")
        return notes
    best = ok[0]
    if chosen is not None and not _same_lr(chosen, best["lr"]):
        notes.append(f"the chosen LR {chosen:.3g} is not the lowest validation loss of these runs "
                     f"(best {best['lr']:.3g})")
    lrs = [p["lr"] for p in points]
    if len(lrs) >= 2 and (_same_lr(best["lr"], lrs[0]) or _same_lr(best["lr"], lrs[-1])):
        edge = "lowest" if _same_lr(best["lr"], lrs[0]) else "highest"
        notes.append(f"best LR {best['lr']:.3g} is at the grid edge (the {edge} LR tried): the optimum may lie beyond it")
    if len(ok) >= 2:
        second = ok[1]
        rel = (second["validation_loss"] - best["validation_loss"]) / abs(best["validation_loss"]) \
            if best["validation_loss"] else math.inf
        if rel <= tie:
            notes.append(f"near-tie between {best['lr']:.3g} and {second['lr']:.3g} (validation loss "
                         f"{best['validation_loss']:.5g} vs {second['validation_loss']:.5g}, {100 * rel:.2g}% apart, "
                         f"within {100 * tie:g}%): the ladder's result may depend on this choice")
        else:
            notes.append(f"clear optimum: the next best LR ({second['lr']:.3g}) is {100 * rel:.1f}% worse")
    return notes


def sweep_table(runs: list[dict], base_lr: dict | None, smallest: int | None = None) -> dict:
    """optimizer -> {points, chosen, provisional, notes}."""
    out = {}
    for opt, pts in sweep_points(runs, smallest).items():
        chosen = (base_lr or {}).get(opt)
        provisional = chosen is None
        if provisional:
            ok = [p for p in pts if not p["diverged"]]
            chosen = min(ok, key=lambda p: p["validation_loss"])["lr"] if ok else None
        out[opt] = {"points": pts, "chosen": chosen, "provisional": provisional, "notes": sweep_notes(pts, chosen)}
    return out


def steps_table(table: dict) -> dict:
    """optimizer -> batch -> median steps to the validation target, seeds that reached it, scaling efficiency
    = (median steps at the smallest batch × b0 / b) / median steps at b (1 = ideal, steps ∝ 1/batch)."""
    out: dict = {}
    for opt, row in table.items():
        batches = sorted(row)
        b0 = batches[0]
        s0 = statistics.median(row[b0]["steps_to_target"]) if row[b0]["steps_to_target"] else None
        for b in batches:
            c = row[b]
            med = statistics.median(c["steps_to_target"]) if c["steps_to_target"] else None
            # a median that includes a first-evaluation hit is only an upper bound (the evaluations are
            # spaced total/eval_points apart); an efficiency from an upper bound is a bound the other way
            bounded = bool(c.get("target_at_first_eval"))
            bounded0 = bool(row[b0].get("target_at_first_eval"))
            eff = (s0 * b0 / b) / med if (s0 and med) else None
            if eff is not None and b != b0 and bounded and bounded0:
                eff = None
            out.setdefault(opt, {})[b] = {"median_steps": med, "reached": c["reached_target"], "n": c["n"],
                                          "samples": med * b if med else None, "efficiency": eff,
                                          "upper_bound": bounded,
                                          "efficiency_bound": None if eff is None or b == b0 else
                                          ("≥" if bounded else "≤" if bounded0 else "=")}
    return out


def two_phase_table(runs: list[dict]) -> dict | None:
    """The two-phase run(s) and their single-phase twin(s): per kind mean ± spread over seeds, the phases."""
    groups = {k: [r for r in runs if r.get("kind") == k] for k in ("two-phase", "two-phase-twin")}
    if not any(groups.values()):
        return None
    out = {}
    for kind, rs in groups.items():
        if not rs:
            continue
        rs = sorted(rs, key=lambda r: r.get("seed", 0))
        acc, acc_s = _mean_spread([r.get("test_accuracy") for r in rs])
        loss, loss_s = _mean_spread([r.get("test_loss") for r in rs])
        m = [load_metrics(r["dir"]) for r in rs]
        cfg = _config(rs[0]["dir"])
        phases = rs[0].get("phases") or [{"batch_size": rs[0]["batch_size"], "seq_len": rs[0].get("seq_len"),
                                          "lr": rs[0]["lr"], "warmup_steps": cfg.get("warmup_steps"),
                                          "epochs": cfg.get("epochs")}]
        out[kind] = {"runs": [r.get("run") for r in rs], "n": len(rs), "optimizer": rs[0]["optimizer"],
                     "steps": rs[0].get("total_steps"), "samples": m[0]["last_samples"] or None,
                     "tokens": _tokens(m[0], phases, rs[0].get("seq_len")),
                     "accuracy_mean": acc, "accuracy_spread": acc_s, "loss_mean": loss, "loss_spread": loss_s,
                     "diverged": sum(bool(r.get("diverged")) for r in rs), "phases": phases,
                     "phase_starts": m[0]["phases"], "compute_hours": sum(x["compute_s"] for x in m) / 3600 / len(m)}
    return out


def _tokens(m: dict, phases: list[dict], seq_len: int | None) -> int | None:
    """Tokens seen = Σ over phases of (sequences in the phase × its sequence length)."""
    if not m["samples"]:
        return None
    starts = [s for s, _ in m["phases"]]
    if len(phases) > 1 and len(starts) == len(phases):
        total, prev = 0, 0
        for i, ph in enumerate(phases):
            end_step = starts[i + 1] - 1 if i + 1 < len(starts) else m["steps"][-1]
            idx = max(j for j, s in enumerate(m["steps"]) if s <= end_step)
            total += (m["samples"][idx] - prev) * (ph.get("seq_len") or seq_len or 0)
            prev = m["samples"][idx]
        return total or None
    sl = phases[0].get("seq_len") or seq_len
    return m["last_samples"] * sl if sl else None


def _config(run_dir: str) -> dict:
    p = Path(run_dir) / "config.json"
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except json.JSONDecodeError:
        return {}


def finetune_table(runs: list[dict]) -> dict:
    """pre-training optimizer -> pre-training batch -> downstream accuracy / macro-F1 and pre-training accuracy."""
    cells = defaultdict(list)
    for r in runs:
        cells[(str(r.get("pretrain_optimizer")), r.get("pretrain_batch") or 0)].append(r)
    table: dict = {}
    for (opt, batch), rs in sorted(cells.items()):
        acc, sa = _mean_spread([r.get("test_accuracy") for r in rs])
        f1, sf = _mean_spread([r.get("test_macro_f1") for r in rs])
        pre, sp = _mean_spread([r.get("pretrain_test_accuracy") for r in rs])
        table.setdefault(opt, {})[batch] = {"mean": acc, "spread": sa, "f1_mean": f1, "f1_spread": sf,
                                            "pretrain_mean": pre, "pretrain_spread": sp, "n": len(rs),
                                            "seeds": [r.get("pretrain_seed") for r in rs],
                                            "diverged": sum(bool(r.get("diverged")) for r in rs)}
    return table


# ---------------------------------------------------------------------------------------------- verdicts
TOL = 1e-9  # a difference equal to the spread (up to rounding) counts as within it


def _beyond(x: float, noise: float) -> bool:
    return x > noise + TOL


def _ends(row: dict) -> tuple[int, int, dict, dict] | None:
    batches = sorted(row)
    if len(batches) < 2:
        return None
    return batches[0], batches[-1], row[batches[0]], row[batches[-1]]


def verdicts(table: dict, metric: str) -> list[str]:
    """Per optimizer, the smallest vs the largest batch: a drop counts only beyond the two seed half-ranges."""
    lines = []
    for opt, row in table.items():
        ends = _ends(row)
        if ends is None:
            continue
        b0, b1, small, large = ends
        drop = small["mean"] - large["mean"]
        noise = small["spread"] + large["spread"]
        k = b1 // b0
        one_seed = " (one seed at each end: no spread to judge against)" if small["n"] < 2 and large["n"] < 2 else ""
        if not math.isfinite(drop):
            lines.append(f"- **{opt}**: no finite result at one end of the ladder.")
        elif not _beyond(drop, noise):
            lines.append(f"- **{opt}**: kept its quality over {k}× the batch: test {metric} {small['mean']:.4f} at "
                         f"{b0} vs {large['mean']:.4f} at {b1} (difference {drop:+.4f} within the "
                         f"seed spread ±{noise:.4f}){one_seed}.")
        else:
            lines.append(f"- **{opt}**: degraded over {k}× the batch: test {metric} {small['mean']:.4f} at "
                         f"{b0} → {large['mean']:.4f} at {b1} (−{drop:.4f}, beyond the seed spread "
                         f"±{noise:.4f}){one_seed}.")
    return lines


def compare_at_largest(table: dict, ref: str = "lamb") -> dict | None:
    """The optimizers at the largest batch of the ladder: ranking and each one's difference to ``ref``."""
    batches = sorted({b for row in table.values() for b in row})
    if not batches:
        return None
    b = batches[-1]
    cells = {o: row[b] for o, row in table.items() if b in row}
    ranking = sorted(cells, key=lambda o: -cells[o]["mean"] if _finite(cells[o]["mean"]) else math.inf)
    out = {"batch": b, "ranking": [{"optimizer": o, "mean": cells[o]["mean"], "spread": cells[o]["spread"],
                                    "n": cells[o]["n"], "diverged": cells[o]["diverged"]} for o in ranking],
           "ref": ref if ref in cells else None, "vs_ref": {}}
    if ref in cells:
        r = cells[ref]
        for o, c in cells.items():
            if o == ref:
                continue
            diff = c["mean"] - r["mean"]
            noise = c["spread"] + r["spread"]
            status = ("n/a" if not math.isfinite(diff) else
                      "within spread" if not _beyond(abs(diff), noise) else ("above" if diff > 0 else "below"))
            out["vs_ref"][o] = {"difference": diff, "noise": noise, "status": status}
    return out


def _change(row: dict | None) -> dict | None:
    """Smallest -> largest batch of one optimizer: drop, noise, diverged at the largest batch."""
    if not row:
        return None
    ends = _ends(row)
    if ends is None:
        return None
    b0, b1, s, l = ends
    return {"b0": b0, "b1": b1, "small": s["mean"], "large": l["mean"], "drop": s["mean"] - l["mean"],
            "noise": s["spread"] + l["spread"], "diverged": l["diverged"] + s["diverged"],
            "diverged_large": l["diverged"], "n_large": l["n"], "n_small": s["n"], "one_seed": s["n"] < 2 and l["n"] < 2}


def _fmt_change(c: dict, metric: str) -> str:
    return (f"test {metric} {c['small']:.4f} at batch {c['b0']} → {c['large']:.4f} at {c['b1']} "
            f"(change {-c['drop']:+.4f}, seed spread ±{c['noise']:.4f})")


def claim_summary(table: dict, task: str, metric: str, ref: str = "lamb", ladder: tuple | None = None,
                  unigram: float | None = None) -> list[dict]:
    """For each part of the paper's claim: {part, status in held / did not hold / inconclusive / not measured, text}.

    LAMB keeps its quality: held if the change smallest -> largest batch is within the seed spread (or a gain),
    did not hold if it drops beyond the spread or diverges. AdamW degrades / LARS fails (MLM only): held if the
    drop exceeds the spread or runs diverge at the largest batch, did not hold if the result rises beyond the
    spread, inconclusive if within the spread. With one seed at both ends there is no spread: inconclusive; a
    LAMB result at or below the unigram baseline at both ends (nothing learned beyond word frequencies) too.
    """
    parts = [("lamb", "keeps", "LAMB keeps its quality over the ladder" if ref == "lamb" else
              f"LAMB ({ref}) keeps its quality over the ladder"),
             ("adamw", "degrades", "AdamW degrades at the largest batch")]
    if task == "mlm":
        parts.append(("lars", "degrades", "LARS fails on the attention model"))
    cmp = compare_at_largest(table, ref) or {"vs_ref": {}}
    out = []
    for opt, kind, part in parts:
        key = ref if opt == "lamb" else opt
        row = table.get(key)
        c = _change(row)
        if c is None:
            have = sorted(row) if row else []
            why = f"only batch {have[0]} finished so far" if have else f"no {key} ladder runs"
            out.append({"part": part, "optimizer": key, "status": "not measured", "text": f"not measured yet ({why})."})
            continue
        finite = math.isfinite(c["drop"])
        if kind == "keeps":
            if c["diverged_large"] or not finite:
                status = "did not hold"
            elif _beyond(c["drop"], c["noise"]):
                status = "inconclusive" if c["one_seed"] else "did not hold"
            elif unigram is not None and _finite(c["small"]) and max(c["small"], c["large"]) <= unigram + 1e-6:
                status = "inconclusive"  # nothing learned beyond word frequencies at either end
            else:
                status = "inconclusive" if c["one_seed"] and c["drop"] > 0 else "held"
        else:
            if c["diverged_large"] or (not finite and math.isfinite(c["small"])):
                status = "held"
            elif not finite:
                status = "inconclusive"
            elif c["one_seed"]:
                status = "inconclusive"
            elif _beyond(c["drop"], c["noise"]):
                status = "held"
            elif _beyond(-c["drop"], c["noise"]):
                status = "did not hold"
            else:
                status = "inconclusive"
        text = _fmt_change(c, metric) if finite else f"no finite test {metric} at one end of the ladder"
        if c["diverged"]:
            text += f"; {c['diverged']} run(s) diverged"
        if c["one_seed"]:
            text += "; one seed at each end, so no spread to judge against"
        if ladder and c["b1"] < max(ladder):
            text += f"; ladder incomplete: batch {c['b1']} is the largest finished so far (the suite goes to {max(ladder)})"
        if unigram is not None and _finite(c["large"]) and c["large"] <= unigram + 1e-6:
            text += f"; at batch {c['b1']} it is at or below the unigram baseline {unigram:.4f}"
        v = cmp["vs_ref"].get(key)
        if v and math.isfinite(v["difference"]):
            text += (f"; at batch {cmp['batch']} it is {v['difference']:+.4f} vs {ref} "
                     f"({'within' if v['status'] == 'within spread' else 'beyond'} the spread ±{v['noise']:.4f})")
        out.append({"part": part, "optimizer": key, "status": status, "text": text + "."})
    return out


# ---------------------------------------------------------------------------------------------- markdown
def _f(x: Any, nd: int = 4) -> str:
    return f"{x:.{nd}f}" if _finite(x) else "—"


def _pm(mean: Any, spread: Any, nd: int = 4) -> str:
    return "—" if not _finite(mean) else f"{mean:.{nd}f} ± {_f(spread, nd)}"


def md_header(info: dict, suite) -> list[str]:
    v = info["versions"]
    vers = ", ".join(f"{k} {v[k]}" for k in (*VERSIONED, "python") if v.get(k))
    commit = info["git_commit"]
    commit_s = (f"`{commit}`" + (" (with uncommitted changes)" if info["git_dirty"] else "")) if commit else \
        "not available (the study directory is not inside a git repository)"
    kinds = ", ".join(f"{n} {k}" for k, n in info["by_kind"].items())
    lines = [f"# Study `{suite.name}`\n", (suite.description or "") + "\n",
             "Reproduce / rebuild:\n", "```", *info["commands"], "```\n",
             f"- software (environment that built this report): {vers}",
             f"- machine: {info['machine']}",
             f"- git commit: {commit_s}",
             f"- runs: {info['runs']} finished ({kinds}); training compute {info['compute_hours']:.2f} h "
             "(Σ over steps of batch / samples_per_s from metrics.jsonl; evaluations excluded)"]
    if info["runs_in_progress"]:
        lines.append(f"- **study still running**: {len(info['runs_in_progress'])} run(s) without summary yet "
                     f"({', '.join(info['runs_in_progress'])}; {info['compute_hours_in_progress']:.2f} h so far); "
                     "the tables below are partial")
    return lines


def md_protocol(suite, base_lr: dict | None, provisional: dict) -> list[str]:
    if base_lr:
        bl = ", ".join(f"{o} {lr:.3g}" for o, lr in base_lr.items())
    elif provisional:
        bl = ", ".join(f"{o} {lr:.3g}" for o, lr in provisional.items() if lr is not None) + \
             " (provisional: no study.json yet, best validation loss of the sweep so far)"
    else:
        bl = "not chosen yet"
    return ["", f"Protocol: base LR swept at the smallest batch on the validation split (loss), then the untuned "
            f"rule ({suite.scaling} LR scaling, {suite.warmup_steps} warmup steps at every batch, {suite.epochs:g} "
            f"epochs at every batch, so proportionally fewer steps). Base LRs chosen: {bl}.\n"]


def _optimizer_by_batch(table: dict, cell) -> list[str]:
    """The rows of an optimizer × batch table: ``cell(optimizer, batch, entry)`` formats one entry."""
    batches = sorted({b for row in table.values() for b in row})
    lines = ["| optimizer | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
    for opt, row in table.items():
        cells = ["—" if row.get(b) is None else cell(opt, b, row[b]) for b in batches]
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    return lines + [""]


def md_table(table: dict, title: str, metric_label: str) -> list[str]:
    batches = sorted({b for row in table.values() for b in row})
    best = {b: max((row[b]["mean"] for row in table.values() if b in row and _finite(row[b]["mean"])), default=None)
            for b in batches}

    def cell(opt, b, c):
        div = f", {c['diverged']} diverged" if c["diverged"] else ""
        val = _pm(c["mean"], c["spread"])
        if best[b] is not None and _finite(c["mean"]) and c["mean"] == best[b] and len(table) > 1:
            val = f"**{val}**"
        return f"{val} (n={c['n']}, {c['steps']} steps{div})"

    return [f"## {title}\n", f"Test {metric_label}, mean ± half-range over seeds (n seeds, steps per run, "
            "diverged runs); best per batch in bold.\n"] + _optimizer_by_batch(table, cell)


def md_sweep(sweep: dict) -> list[str]:
    if not sweep:
        return []
    lines = ["## LR sweep at the smallest batch\n",
             "Validation loss per base LR (seed 0); the chosen LR in bold; ✗ = diverged or non-finite.\n",
             "| optimizer | LR → validation loss | notes |", "|---|---|---|"]
    for opt, s in sweep.items():
        cells = []
        for p in s["points"]:
            v = "✗ diverged" if p["diverged"] else f"{p['validation_loss']:.4f}"
            c = f"{p['lr']:.3g} → {v}"
            cells.append(f"**{c}**" if s["chosen"] is not None and _same_lr(p["lr"], s["chosen"]) else c)
        note = "; ".join(s["notes"]) + (" (provisional choice)" if s["provisional"] else "")
        lines.append(f"| {opt} | " + ", ".join(cells) + f" | {note} |")
    return lines + ["", "![lr_sweep.png](lr_sweep.png)", ""]


def md_verdicts(table: dict, metric: str, task: str, cmp: dict | None, claims: list[dict],
                bn_table: dict | None = None, ladder: tuple | None = None) -> list[str]:
    lines = ["## Did the paper's claim hold here?\n",
             "Rule: a drop from the smallest to the largest batch counts only if it exceeds the sum of the two "
             "seed half-ranges; likewise a difference between two optimizers.\n",
             "### Per optimizer, smallest vs largest batch\n", *(verdicts(table, metric) or ["- (no optimizer has "
                                                                                              "two batches yet)"]), ""]
    if bn_table:
        lines += ["With recomputed BatchNorm statistics (precise BN):\n",
                  *(verdicts(bn_table, f"precise-BN {metric}") or ["- (no optimizer has two batches yet)"]), ""]
    if cmp and cmp["ranking"]:
        note = (f" — the largest finished so far; the ladder goes to {max(ladder)}"
                if ladder and cmp["batch"] < max(ladder) else "")
        lines += [f"### Optimizers at the largest batch ({cmp['batch']}{note})\n",
                  "Ranking: " + " > ".join(f"{r['optimizer']} {_pm(r['mean'], r['spread'])} (n={r['n']})"
                                           for r in cmp["ranking"]) + ".\n"]
        for o, v in cmp["vs_ref"].items():
            if v["status"] == "n/a":
                lines.append(f"- {o} vs {cmp['ref']}: no finite result.")
            else:
                how = "within the seed spread" if v["status"] == "within spread" else "beyond the seed spread"
                lines.append(f"- {o} vs {cmp['ref']}: {v['difference']:+.4f} ({how} ±{v['noise']:.4f}).")
        lines.append("")
    lines += ["### Summary\n", "The paper's claim, part by part (SPEC §5: as the batch grows at a fixed epoch budget, "
              "LAMB with the untuned √ rule keeps its final quality, AdamW degrades, LARS fails on the attention "
              "model):\n"]
    lines += [f"- {c['part']}: **{c['status']}** — {c['text']}" for c in claims]
    if task != "mlm":
        lines.append("- LARS fails on the attention model: not tested by this suite (not an attention model).")
    return lines + ["", claim_paragraph(claims), ""]


def claim_paragraph(claims: list[dict]) -> str:
    """One plain sentence over the parts of the claim and their status."""
    if not claims:
        return ""
    counts = {s: sum(c["status"] == s for c in claims) for s in ("held", "did not hold", "inconclusive", "not measured")}
    parts = "; ".join(f"{c['part']}: {c['status']}" for c in claims)
    tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return f"In short, of the {len(claims)} parts of the claim this suite tests: {tally}. {parts}."


def md_steps(st: dict, metric: str, target: float | None) -> list[str]:
    if target is None or not st:
        return []

    def cell(opt, b, c):
        if c["median_steps"] is None:
            return f"not reached (0/{c['n']})"
        eff = ""
        if c["efficiency"] is not None:
            bound = c.get("efficiency_bound")
            eff = f", eff {'' if bound in (None, '=') else bound + ' '}{c['efficiency']:.2f}"
        first = "≤ " if c.get("upper_bound") else ""
        return f"{first}{c['median_steps']:g} ({c['reached']}/{c['n']}{eff})"

    return [f"## Steps to the validation target ({metric} ≥ {target})\n",
            "Median optimizer steps to reach the target over the seeds that reached it (reached / seeds); "
            "efficiency = (steps at the smallest batch × b0 / b) / steps at b (1 = ideal scaling). "
            "Steps are those of the evaluation that first met the target; \"≤\" marks a target met at a "
            "run's first evaluation, so the true count is at most that (and an efficiency computed from it "
            "is a bound, shown as ≤ / ≥, or omitted when both ends are bounds).\n"] + \
        _optimizer_by_batch(st, cell)


def _phase_desc(p: dict) -> str:
    bits = [f"batch {p.get('batch_size')}"]
    if p.get("seq_len"):
        bits.append(f"sequence length {p['seq_len']}")
    if _finite(p.get("lr")):
        bits.append(f"LR {p['lr']:.3g}")
    if p.get("warmup_steps") is not None:
        bits.append(f"warmup {p['warmup_steps']}")
    if p.get("epochs") is not None:
        bits.append(f"{p['epochs']:g} epochs")
    if p.get("optimizer_state"):
        bits.append(f"optimizer state: {p['optimizer_state']}")
    return ", ".join(bits)


def two_phase_comparison(tp: dict) -> str:
    a, b = tp.get("two-phase"), tp.get("two-phase-twin")
    if not a or not b:
        return "Only one of the two runs has finished; no comparison yet."
    diff = a["accuracy_mean"] - b["accuracy_mean"]
    noise = (a["accuracy_spread"] or 0) + (b["accuracy_spread"] or 0)
    if not math.isfinite(diff):
        return "No finite test accuracy for one of the two; no comparison."
    how = "within" if not _beyond(abs(diff), noise) else "beyond"
    word = "matched" if how == "within" else ("beat" if diff > 0 else "fell short of")
    ratio = f" in {a['steps']} vs {b['steps']} steps ({a['steps'] / b['steps']:.2f}×)" if a["steps"] and b["steps"] else ""
    return (f"The two-phase run {word} its single-phase twin: test accuracy {a['accuracy_mean']:.4f} vs "
            f"{b['accuracy_mean']:.4f} ({diff:+.4f}, {how} the seed spread ±{noise:.4f}){ratio}.")


def md_two_phase(tp: dict | None) -> list[str]:
    if not tp:
        return []
    lines = ["## Two-phase (mixed-batch) run vs its single-phase twin\n",
             "| run | seeds | steps | sequences | tokens | test accuracy | test loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    names = {"two-phase": "two-phase", "two-phase-twin": "single-phase twin"}
    for kind, c in tp.items():
        tok = f"{c['tokens']:,}" if c["tokens"] else "—"
        sam = f"{c['samples']:,}" if c["samples"] else "—"
        div = f" ({c['diverged']} diverged)" if c["diverged"] else ""
        lines.append(f"| {names[kind]} ({c['optimizer']}) | {c['n']} | {c['steps']} | {sam} | {tok} | "
                     f"{_pm(c['accuracy_mean'], c['accuracy_spread'])}{div} | {_pm(c['loss_mean'], c['loss_spread'])} |")
    lines.append("")
    for kind, c in tp.items():
        for i, p in enumerate(c["phases"]):
            label = f"phase {i + 1}" if len(c["phases"]) > 1 else "single phase"
            lines.append(f"- {names[kind]}, {label}: {_phase_desc(p)}")
    return lines + ["", two_phase_comparison(tp), "", "![two_phase.png](two_phase.png)", ""]


# ------------------------------------------------------------------------------------------------- build
def _clean(x):
    """JSON-safe: NaN / inf -> None, tuples -> lists, int dict keys -> strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _provisional(sweep: dict) -> dict:
    return {o: s["chosen"] for o, s in sweep.items() if s["provisional"]}


def build_report(study_dir: str | Path, suite=None) -> Path:
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise FileNotFoundError(f"no study directory at {study_dir}")
    runs = _runs(study_dir)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {study_dir / 'runs'}")
    meta = {}
    if (study_dir / "study.json").exists():
        try:
            meta = json.loads((study_dir / "study.json").read_text())
        except json.JSONDecodeError:
            meta = {}
    if suite is None:
        from .suites import get_suite
        suite = get_suite(meta.get("suite") or _guess_suite(study_dir, runs))
    if suite.task == "classify":
        return _finetune_report(study_dir, runs, suite)
    from . import report_plots as P

    metric, target = suite.metric, suite.target
    table = build_table(runs, metric, target)
    bn_key = f"precise_bn_{metric}"
    bn_table = build_table(runs, metric, None, key=bn_key) if any(f"test_{bn_key}" in r for r in runs
                                                                    if r.get("kind") == "ladder") else None
    sweep = sweep_table(runs, meta.get("base_lr"), suite.batches[0] if suite.batches else None)
    st = steps_table(table)
    cmp = compare_at_largest(table)
    claims = claim_summary(table, suite.task, metric, ladder=tuple(suite.batches), unigram=_unigram(table))
    tp = two_phase_table(runs)
    info = header_info(study_dir, runs, suite.name)

    files = P.all_plots(study_dir, runs, table, sweep, metric, target, tp, bn_table)
    uni = _unigram(table)
    lines = md_header(info, suite) + md_protocol(suite, meta.get("base_lr"), _provisional(sweep))
    lines += md_table(table, f"Test {metric}", metric)
    if uni is not None:
        flat = all(not _finite(c["mean"]) or c["mean"] <= uni + 1e-6 for row in table.values() for c in row.values())
        lines.append(f"Unigram baseline (always the most frequent token): {uni:.4f}."
                     + (" **Every result is at or below it**: the models learned no more than word frequencies."
                        if flat else "") + "\n")
    if bn_table:
        lines += md_table(bn_table, f"Test {metric} with precise BN (BatchNorm statistics recomputed after training)",
                          f"precise-BN {metric}")
    lines += [f"![{f}]({f})" for f in ("metric_vs_batch.png",) if f in files] + [""]
    lines += md_verdicts(table, metric, suite.task, cmp, claims, bn_table, tuple(suite.batches))
    lines += md_sweep(sweep)
    lines += md_steps(st, metric, target)
    if "steps_to_target.png" in files:
        lines += ["![steps_to_target.png](steps_to_target.png)", ""]
    curves = [f for f in ("loss_curves.png", "validation_curves.png") if f in files]
    if curves:
        lines += ["## Training curves (seed 0, one line per batch)\n", " ".join(f"![{f}]({f})" for f in curves), ""]
    trust = [f for f in ("trust_ratios.png", "trust_layers.png") if f in files]
    if trust:
        lines += ["## Trust ratios\n", "Per-tensor trust ratios ‖w‖/‖update‖ of the layer-wise optimizers (log scale), "
                  "the largest and the smallest batch of the ladder; colour = position in the model, input (dark) → "
                  "output (light).\n", " ".join(f"![{f}]({f})" for f in trust), ""]
    lines += md_two_phase(tp)
    (study_dir / "results.json").write_text(json.dumps(_clean({
        "suite": suite.name, "task": suite.task, "metric": metric, "target": target,
        "base_lr": meta.get("base_lr"), "base_lr_provisional": _provisional(sweep) or None,
        "header": info, "table": table, "precise_bn_table": bn_table, "unigram_baseline": uni,
        "sweep": sweep, "steps_to_target": st, "verdicts": verdicts(table, metric),
        "precise_bn_verdicts": verdicts(bn_table, f"precise-BN {metric}") if bn_table else None,
        "comparison_at_largest": cmp, "claims": claims, "claim_summary": claim_paragraph(claims), "two_phase": tp,
        "two_phase_comparison": two_phase_comparison(tp) if tp else None, "files": files,
        "runs": runs}), indent=2, default=str))
    (study_dir / "report.md").write_text("\n".join(lines) + "\n")
    return study_dir / "report.md"


def _guess_suite(study_dir: Path, runs: list[dict]) -> str:
    """No study.json (a study still running): the directory name if it is a suite, else the one suite whose
    task and optimizers match the runs."""
    from .suites import SUITES

    if study_dir.name in SUITES:
        return study_dir.name
    task = next((r.get("task") for r in runs if r.get("task")), None)
    opts = {r.get("optimizer") for r in runs if r.get("kind") in ("sweep", "ladder")}
    batches = {r.get("batch_size") for r in runs if r.get("kind") in ("sweep", "ladder")}
    if any(r.get("kind") == "finetune" for r in runs):
        task = "classify"
    fits = [s.name for s in SUITES.values() if s.task == task and (task == "classify" or
            (opts <= set(s.lr_grids) and batches <= set(s.batches)))]
    if len(fits) == 1:
        return fits[0]
    raise ValueError(f"cannot tell the suite of {study_dir} (no study.json; candidates: {fits or 'none'}); "
                     "name the directory after the suite")


def _finetune_report(study_dir: Path, runs: list[dict], suite) -> Path:
    from . import report_plots as P

    runs = [r for r in runs if r.get("kind", "finetune") == "finetune"]
    if not runs:
        raise FileNotFoundError(f"no finished finetune runs under {study_dir / 'runs'}")
    table = finetune_table(runs)
    info = header_info(study_dir, runs, suite.name)
    files = P.finetune_plot(study_dir, table)
    lines = md_header(info, suite)
    lines += ["", f"Every pre-trained checkpoint of `{suite.source}` fine-tuned with one fixed recipe.\n",
              "| pre-training optimizer | pre-training batch | downstream test accuracy | macro-F1 | "
              "pre-training test accuracy | runs |", "|---|---:|---:|---:|---:|---:|"]
    for opt, row in table.items():
        for batch, c in sorted(row.items()):
            lines.append(f"| {opt} | {batch} | {_pm(c['mean'], c['spread'])} | {_pm(c['f1_mean'], c['f1_spread'])} | "
                         f"{_pm(c['pretrain_mean'], c['pretrain_spread'])} | {c['n']} |")
    v = verdicts(table, "downstream accuracy")
    lines += ["", "### Downstream accuracy, smallest vs largest pre-training batch\n",
              "Rule: a drop counts only if it exceeds the sum of the two seed half-ranges.\n",
              *(v or ["- (no optimizer has two pre-training batches yet)"]), ""]
    lines += [f"![{f}]({f})" for f in files]
    (study_dir / "results.json").write_text(json.dumps(_clean({
        "suite": suite.name, "task": suite.task, "header": info, "table": table, "verdicts": v, "files": files,
        "runs": runs}), indent=2, default=str))
    (study_dir / "report.md").write_text("\n".join(lines) + "\n")
    return study_dir / "report.md"
