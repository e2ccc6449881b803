"""The gradient noise scale against the study's measured steps-to-target (issue 17; docs/noise-scale.md).

A noise-scale probe (one run per optimizer at the suite's smallest batch b0 with ``noise_scale=True``,
docs/study.md) logs window means of the |G|² and tr Σ estimates. From them, pure functions here give:

- B_simple near the target: the ratio of the step-weighted means of the windows ending in
  (s0·(1 − POOL_FRACTION), s0], s0 = the median steps to the target at b0 (:func:`noise_near`);
- the paper's model S(B) = S_min·(1 + B_noise/B) with S_min fixed by the measured S(b0) (:func:`min_steps`),
  its predicted scaling efficiency (S(b0)·b0/B)/S(B) = (b0 + B_noise)/(B + B_noise)
  (:func:`predicted_efficiency`) and the predicted critical batch B_crit ≈ B_noise;
- the verdict per batch (:func:`judge`): the prediction **holds** where the measured efficiency's range over
  the seeds overlaps the predicted efficiency's range over the single windows of B_simple, else it
  **fails**, better or worse than predicted.

``scripts/noise_scale_check.py`` applies the same functions to the committed hand-made check
(docs/results/noise-scale/); the study report (study/report.py) to a suite's own probes.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ..train.noise_scale import simple_noise_scale, steps_model
from .runs import load_metrics
from .stats import finite, same_lr

POOL_FRACTION = 0.25     # B_simple pooled over the windows in the last quarter of the steps before the target
LOSS_SMOOTH = 0.05       # the training-loss target reads a trailing mean over 5% of a run's records
PROBE_KIND = "noise-probe"


def window_estimates(records: list[dict]) -> list[dict]:
    """The metrics records carrying window means of the raw |G|² and tr Σ estimates."""
    return [r for r in records if r.get("window_steps")]


def read_records(run_dir: str | Path) -> list[dict]:
    """A run's metrics.jsonl as records (a line being written is skipped)."""
    out = []
    p = Path(run_dir) / "metrics.jsonl"
    for line in (p.read_text().splitlines() if p.exists() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def full_windows(windows: list[dict]) -> list[dict]:
    """The windows of at least half the longest one's steps (one cut short by an extra evaluation is noisier:
    the ranges read only these; the pooled value weighs every window by its steps)."""
    longest = max((w["window_steps"] for w in windows), default=0)
    return [w for w in windows if w["window_steps"] >= longest / 2]


def noise_near(windows: list[dict], stop: float, fraction: float = POOL_FRACTION
               ) -> tuple[float | None, int, list[float | None]]:
    """B_simple from the windows ending in (stop·(1 − fraction), stop]: the ratio of the step-weighted means,
    the number of steps pooled, and the windows' own values (None where a window's |G|² was not positive)."""
    chosen = [w for w in windows if stop * (1 - fraction) < w["step"] <= stop]
    steps = sum(w["window_steps"] for w in chosen)
    if not steps:
        return None, 0, []
    grad_sq = sum(w["window_grad_sq_norm"] * w["window_steps"] for w in chosen) / steps
    trace = sum(w["window_grad_trace_cov"] * w["window_steps"] for w in chosen) / steps
    return simple_noise_scale(trace, grad_sq), steps, [w["window_b_simple"] for w in chosen]


def min_steps(s0: float, b0: float, b_noise: float) -> float:
    """S_min of the model S = S_min·(1 + B_noise/B) through the measured S(b0) = s0."""
    return s0 / (1 + b_noise / b0)


def predicted_efficiency(batch: float, b0: float, b_noise: float) -> float:
    """The model's scaling efficiency at ``batch``: (S(b0)·b0/B)/S(B) = (b0 + B_noise)/(B + B_noise)."""
    return (b0 + b_noise) / (batch + b_noise)


def steps_to_train_loss(steps: list[int], losses: list[float], target: float, smooth: float = LOSS_SMOOTH,
                        records: list[int] | None = None) -> int | None:
    """First step at which the trailing mean of the logged training losses (over ``smooth`` of the run's
    records) is at or below ``target``; None if never. The mean lags by about half its window, the same
    fraction of every run. ``records``: how many logged steps each entry stands for (a thinned log's block
    means, ``archive.compact_run``): the window then counts the original records, weighting each block."""
    w = records or [1] * len(losses)
    k = max(1, round(sum(w) * smooth))
    start, n = 0, 0
    for i in range(len(losses)):
        n += w[i]
        while n - w[start] >= k:
            n -= w[start]
            start += 1
        if n >= k and sum(wj * x for wj, x in zip(w[start:i + 1], losses[start:i + 1])) / n <= target:
            return steps[i]
    return None


def median_reached(steps: list[int | None]) -> float | None:
    reached = [s for s in steps if s is not None]
    return statistics.median(reached) if reached else None


def _predict(b: int, b0: int, s0: float, noise: float | None) -> float | None:
    return steps_model(b, min_steps(s0, b0, noise), noise) if noise else None


def compare(optimizer: str, lr: float, measured: dict[int, dict], windows: list[dict],
            by_loss: dict[int, list[int | None]] | None, loss_target: float | None) -> dict:
    """The prediction beside the measurement for one optimizer. ``measured``: batch -> the study's
    steps-to-target cell (analysis.steps_table); ``by_loss``: batch -> each seed's steps to the training-loss
    ``loss_target`` (None: not used)."""
    batches = sorted(measured)
    b0 = batches[0]
    s0 = measured[b0]["median_steps"]
    noise, steps, spread = noise_near(windows, s0) if s0 else (None, 0, [])
    values = [v for v in spread if v and v > 0]
    lo, hi = (min(values), max(values)) if values else (None, None)
    rows = []
    for b in batches:
        m = measured[b]
        rows.append({"batch": b, "measured_steps": m["median_steps"], "reached": f"{m['reached']}/{m['n']}",
                     "measured_efficiency": m.get("efficiency"), "efficiency_bound": m.get("efficiency_bound"),
                     "upper_bound": m.get("upper_bound"), "predicted_steps": _predict(b, b0, s0, noise),
                     "predicted_steps_range": [_predict(b, b0, s0, hi), _predict(b, b0, s0, lo)] if values else None,
                     "predicted_efficiency": predicted_efficiency(b, b0, noise) if noise else None})
    over_training = [(w["step"], w["window_b_simple"]) for w in full_windows(windows)]
    out = {"optimizer": optimizer, "lr": lr, "b0": b0, "s0": s0, "s0_upper_bound": measured[b0].get("upper_bound"),
           "b_noise": noise, "b_noise_steps": steps, "b_noise_window_range": [lo, hi], "rows": rows,
           "over_training": over_training}
    if by_loss is not None:
        out.update(train_loss_rows(by_loss, windows, loss_target))
    return out


def train_loss_rows(by_loss: dict[int, list[int | None]], windows: list[dict], target: float | None) -> dict:
    """The same prediction with the steps to a training-loss target (finer than the evaluations)."""
    batches = sorted(by_loss)
    b0 = batches[0]
    s0 = median_reached(by_loss[b0])
    noise, _, _ = noise_near(windows, s0) if s0 else (None, 0, [])
    rows = []
    for b in batches:
        med = median_reached(by_loss[b])
        rows.append({"batch": b, "steps": by_loss[b], "median_steps": med,
                     "predicted_steps": _predict(b, b0, s0, noise) if s0 else None,
                     "measured_efficiency": s0 * b0 / b / med if med and s0 else None,
                     "predicted_efficiency": predicted_efficiency(b, b0, noise) if noise else None})
    return {"train_loss_target": target, "b_noise_at_train_loss_target": noise, "train_loss_rows": rows}


# ------------------------------------------------------------------ the verdict
def efficiency_range(steps0: list[int | None], steps: list[int | None], b0: int, b: int, *,
                     bound0: bool = False, bound: bool = False) -> tuple[float, float] | None:
    """The measured scaling efficiency's range over the seeds: (min S(b0))·b0/b / max S(b) .. (max S(b0))·b0/b /
    min S(b); None when no seed reached the target at one of the two batches. A step count that is only an
    upper bound (the target met at a run's first evaluation) opens that end: ``bound0`` the lower, ``bound``
    the upper."""
    r0, r = [s for s in steps0 if s], [s for s in steps if s]
    if not r0 or not r:
        return None
    lo, hi = min(r0) * b0 / b / max(r), max(r0) * b0 / b / min(r)
    return (0.0 if bound0 else lo), (math.inf if bound else hi)


def predicted_range(b: int, b0: int, windows: list[float | None]) -> tuple[float, float] | None:
    """The predicted efficiency over the single windows' B_simple (increasing in B_noise for b > b0); a window
    whose |G|² was not positive (B_simple unbounded) lifts the upper end to 1."""
    values = [v for v in windows if finite(v) and v > 0]
    if not values:
        return None
    hi = 1.0 if len(values) < len(windows) else predicted_efficiency(b, b0, max(values))
    return predicted_efficiency(b, b0, min(values)), hi


def judge(measured: tuple[float, float] | None, predicted: tuple[float, float] | None, *,
          reached: bool = True, predicted_steps: float | None = None, total_steps: int | None = None) -> str:
    """``holds`` (the two ranges overlap), ``better`` / ``worse`` (the measured efficiency above / below every
    predicted value), ``not reached`` (no seed reached the target where the model says the run's steps
    suffice: worse than predicted), ``consistent`` (not reached, nor predicted within the run's steps), or
    ``n/a`` (nothing to compare)."""
    if predicted is None:
        return "n/a"
    if not reached:
        if predicted_steps is not None and total_steps is not None and predicted_steps > total_steps:
            return "consistent"
        return "not reached"
    if measured is None:
        return "n/a"
    if measured[0] > predicted[1]:
        return "better"
    if measured[1] < predicted[0]:
        return "worse"
    return "holds"


def summary_sentence(judged: dict[int, str]) -> str:
    """One plain sentence from the per-batch verdicts (batch -> verdict), e.g. ``holds up to batch 256;
    fails at 1024 (scales better than predicted)``."""
    batches = sorted(b for b, v in judged.items() if v != "n/a")
    if not batches:
        return "not judged (no batch to compare)"
    ok = [b for b in batches if judged[b] in ("holds", "consistent")]
    bad = [b for b in batches if b not in ok]
    if not bad:
        return "**holds** at every batch"
    why = {"better": "scales better than predicted", "worse": "scales worse than predicted",
           "not reached": "the target not reached where predicted"}
    reasons = "; ".join(f"{why[v]} at {', '.join(str(b) for b in bad if judged[b] == v)}"
                        for v in why if any(judged[b] == v for b in bad))
    if not ok:
        return f"**fails** at every batch above the smallest ({reasons})"
    if max(ok) < min(bad):
        return f"**holds up to batch {max(ok)}**, fails above ({reasons})"
    return f"**holds at {', '.join(str(b) for b in ok)}**, fails elsewhere ({reasons})"


def plot_series(check: dict, suite: str, by_loss: bool) -> dict:
    """What the prediction plot draws of one comparison: the measured steps per batch (validation target, or the
    training-loss target when ``by_loss``), the model's curve through S(b0), B_simple over training."""
    if by_loss:
        rows = check["train_loss_rows"]
        points = [(r["batch"], r["median_steps"], False) for r in rows if r["median_steps"]]
        s0, noise = rows[0]["median_steps"], check["b_noise_at_train_loss_target"]
    else:
        points = [(r["batch"], r["measured_steps"], bool(r["upper_bound"])) for r in check["rows"]
                  if r["measured_steps"]]
        s0, noise = check["s0"], check["b_noise"]
    return {"suite": suite, "optimizer": check["optimizer"], "b0": check["b0"], "s0": s0, "b_noise": noise,
            "points": points, "over_training": check["over_training"]}


# ------------------------------------------------------------------ the study report's section
def probe_name(optimizer: str, batch: int, lr: float, seed: int = 0) -> str:
    return f"noise-{optimizer}-b{batch}-lr{lr:.3g}-s{seed}"


def _seed_dirs(runs: list[dict], optimizer: str) -> dict[int, list[str]]:
    """batch -> the run directories of ``optimizer``'s ladder runs, by seed."""
    out: dict[int, list[tuple[int, str]]] = {}
    for r in runs:
        if r.get("kind") == "ladder" and r["optimizer"] == optimizer:
            out.setdefault(r["batch_size"], []).append((r.get("seed", 0), r["dir"]))
    return {b: [d for _, d in sorted(v)] for b, v in out.items()}


def loss_steps(dirs: dict[int, list[str | Path]], target: float) -> dict[int, list[int | None]]:
    """batch -> each seed's steps to the training-loss ``target`` (the per-step records of ``load_metrics``)."""
    curves = {b: [load_metrics(d) for d in ds] for b, ds in dirs.items()}
    return {b: [steps_to_train_loss(m["steps"], m["block_loss"], target, records=m["block_records"]) for m in ms]
            for b, ms in curves.items()}


def judged_rows(check: dict, cells: dict[int, dict], spread: list[float | None], by_loss: bool) -> dict[int, dict]:
    """batch -> {measured, predicted (efficiency ranges), verdict} for every batch above b0. ``cells``: the
    ladder table's row of the optimizer (per-seed steps to the validation target, the run's total steps);
    ``spread``: the single windows' B_simple pooled near the target."""
    b0 = check["b0"]
    if by_loss:
        seeds = {r["batch"]: r["steps"] for r in check["train_loss_rows"]}
        rows = check["train_loss_rows"]
        bounds = {b: False for b in seeds}
    else:
        seeds = {b: c["steps_to_target"] + [None] * (c["n"] - len(c["steps_to_target"])) for b, c in cells.items()}
        rows = check["rows"]
        bounds = {b: bool(c.get("target_at_first_eval")) for b, c in cells.items()}
    out = {}
    for row in rows[1:]:
        b = row["batch"]
        measured = efficiency_range(seeds[b0], seeds[b], b0, b, bound0=bounds[b0], bound=bounds[b])
        predicted = predicted_range(b, b0, spread)
        verdict = judge(measured, predicted, reached=any(seeds[b]), predicted_steps=row["predicted_steps"],
                        total_steps=cells.get(b, {}).get("steps"))
        out[b] = {"measured": measured, "predicted": predicted, "verdict": verdict}
    return out


def noise_section(runs: list[dict], table: dict, steps: dict, suite) -> dict | None:
    """The report's noise-scale section: per optimizer of the ladder with a finished probe, the comparison
    (:func:`compare`), the per-batch verdicts and a sentence; the optimizers whose probe is missing. None for a
    suite without probes. ``steps``: analysis.steps_table of ``table``."""
    b0 = suite.batches[0]
    probes = {r["optimizer"]: r for r in runs if r.get("kind") == PROBE_KIND  # at the ladder's LR, when known
              and (b0 not in table.get(r["optimizer"], {}) or same_lr(r["lr"], table[r["optimizer"]][b0]["lr"]))}
    if not getattr(suite, "noise_probe", 0) and not probes:
        return None
    target = getattr(suite, "noise_loss_target", None)
    by_loss = target is not None
    out: dict = {"by": "training loss" if by_loss else "validation", "loss_target": target, "optimizers": {},
                 "missing": [o for o in table if o not in probes]}
    for opt, probe in probes.items():
        if opt not in steps or len(steps[opt]) < 2:
            continue
        windows = window_estimates(read_records(probe["dir"]))
        losses = loss_steps(_seed_dirs(runs, opt), target) if by_loss else None
        check = compare(opt, probe["lr"], steps[opt], windows, losses, target)
        s0 = check["train_loss_rows"][0]["median_steps"] if by_loss else check["s0"]
        b_noise, pooled, _ = noise_near(windows, s0) if s0 else (None, 0, [])
        _, _, spread = noise_near(full_windows(windows), s0) if s0 else (None, 0, [])
        judged = judged_rows(check, table[opt], spread, by_loss)
        values = [v for v in spread if finite(v) and v > 0]
        verdict = summary_sentence({b: j["verdict"] for b, j in judged.items()}) if s0 else \
            f"not judged: no batch-{check['b0']} run reached the target"
        out["optimizers"][opt] = {**check, "run": probe.get("run"), "stopped_early": probe.get("stopped_early"),
                                  "probe_steps": probe.get("steps"), "s0_used": s0, "b_noise_used": b_noise,
                                  "pooled_steps": pooled, "windows": len(spread), "windows_unbounded":
                                  len(spread) - len(values), "window_range": [min(values), max(values)] if values
                                  else None, "judged": judged, "verdict": verdict}
    return out
