"""Statistics of a study: pure functions of the loaded runs into tables (optimizer -> batch -> cell), the LR
sweep with its sensitivity notes, steps to the target, the two-phase comparison and the fine-tuning table."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict

from ..schedules import scale_lr
from .runs import load_metrics, read_config, steps_to_target
from .stats import finite, mean_spread, same_lr

NEAR_TIE = 0.02          # sweep: a second LR within 2% of the best validation loss is a near-tie


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
        mean, spread = mean_spread(vals)
        loss_key = "test_precise_bn_loss" if key.startswith("precise_bn_") else "test_loss"
        loss_mean, loss_spread = mean_spread([r.get(loss_key) for r in rs])
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


def unigram_baseline(table: dict) -> float | None:
    return next((c["unigram"] for row in table.values() for c in row.values() if finite(c.get("unigram"))), None)


def cells_at_or_below(table: dict, value: float, tol: float = 1e-6) -> tuple[int, int]:
    """(cells whose mean is at or below ``value``, cells with a finite mean)."""
    means = [c["mean"] for row in table.values() for c in row.values() if finite(c.get("mean"))]
    return sum(m <= value + tol for m in means), len(means)


SWEEP_KINDS = ("sweep", "ladder", "superseded")  # a superseded ladder run at the sweep batch was a sweep point


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
        if b0 is None or r.get("batch_size") != b0 or r.get("seed", 0) != 0 or r.get("kind") not in SWEEP_KINDS:
            continue
        v = r.get("validation_loss")
        by_opt[opt].append({"lr": r["lr"], "validation_loss": v if finite(v) else None,
                            "diverged": bool(r.get("diverged")) or not finite(v), "run": r.get("run")})
    return {o: sorted(p, key=lambda x: x["lr"]) for o, p in by_opt.items() if o in sweep_batch}


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
    if chosen is not None and not same_lr(chosen, best["lr"]):
        notes.append(f"the chosen LR {chosen:.3g} is not the lowest validation loss of these runs "
                     f"(best {best['lr']:.3g})")
    lrs = [p["lr"] for p in points]
    if len(lrs) >= 2 and (same_lr(best["lr"], lrs[0]) or same_lr(best["lr"], lrs[-1])):
        edge = "lowest" if same_lr(best["lr"], lrs[0]) else "highest"
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
        acc, acc_s = mean_spread([r.get("test_accuracy") for r in rs])
        loss, loss_s = mean_spread([r.get("test_loss") for r in rs])
        m = [load_metrics(r["dir"]) for r in rs]
        cfg = read_config(rs[0]["dir"])
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


def finetune_table(runs: list[dict]) -> dict:
    """pre-training optimizer -> pre-training batch -> downstream accuracy / macro-F1 and pre-training accuracy."""
    cells = defaultdict(list)
    for r in runs:
        cells[(str(r.get("pretrain_optimizer")), r.get("pretrain_batch") or 0)].append(r)
    table: dict = {}
    for (opt, batch), rs in sorted(cells.items()):
        acc, sa = mean_spread([r.get("test_accuracy") for r in rs])
        f1, sf = mean_spread([r.get("test_macro_f1") for r in rs])
        pre, sp = mean_spread([r.get("pretrain_test_accuracy") for r in rs])
        table.setdefault(opt, {})[batch] = {"mean": acc, "spread": sa, "f1_mean": f1, "f1_spread": sf,
                                            "pretrain_mean": pre, "pretrain_spread": sp, "n": len(rs),
                                            "seeds": [r.get("pretrain_seed") for r in rs],
                                            "diverged": sum(bool(r.get("diverged")) for r in rs)}
    return table


def provisional(sweep: dict) -> dict:
    return {o: s["chosen"] for o, s in sweep.items() if s["provisional"]}


# ------------------------------------------------------------- the design's controls (issue: decisive study)
def _cell(rs: list[dict], key: str) -> dict:
    rs = sorted(rs, key=lambda r: r.get("seed", 0))
    mean, spread = mean_spread([r.get(f"test_{key}") for r in rs])
    return {"mean": mean, "spread": spread, "n": len(rs), "lr": rs[0]["lr"] if rs else None,
            "seeds": [r.get("seed") for r in rs], "diverged": sum(bool(r.get("diverged")) for r in rs),
            "runs": [r.get("run") for r in rs]}


TUNED_KINDS = ("tuned-sweep", "tuned", "ladder")  # the runs at the largest batch a tuned cell may hold


def tuned_control(runs: list[dict], table: dict, tuned_lr: dict | None, batch: int, metric: str) -> dict:
    """optimizer -> the tuned control at ``batch``: its LR sweep (seed 0, by validation loss), the tuned LR
    (from study.json, else provisional: the best so far) with its cell over seeds, and the √-rule cell."""
    at_b = [r for r in runs if r.get("batch_size") == batch and r.get("kind") in TUNED_KINDS]
    out = {}
    for opt in dict.fromkeys(r["optimizer"] for r in at_b if r.get("kind") == "tuned-sweep"):
        mine = [r for r in at_b if r["optimizer"] == opt]
        points = sorted(({"lr": r["lr"], "validation_loss": r.get("validation_loss") if finite(r.get("validation_loss"))
                          else None, "diverged": bool(r.get("diverged")) or not finite(r.get("validation_loss")),
                          "run": r.get("run")} for r in mine if r.get("seed", 0) == 0), key=lambda p: p["lr"])
        lr = (tuned_lr or {}).get(opt)
        ok = [p for p in points if not p["diverged"]]
        chosen = lr if lr is not None else (min(ok, key=lambda p: p["validation_loss"])["lr"] if ok else None)
        tuned = _cell([r for r in mine if chosen is not None and same_lr(r["lr"], chosen)], metric)
        out[opt] = {"batch": batch, "points": points, "lr": chosen, "provisional": lr is None,
                    "notes": sweep_notes(points, chosen), "tuned": tuned, "sqrt": table.get(opt, {}).get(batch)}
    return out


def long_baseline(runs: list[dict], table: dict, metric: str) -> dict:
    """optimizer -> the smallest batch trained longer (seed 0) beside the ladder's smallest-batch cell."""
    out = {}
    for r in runs:
        if r.get("kind") != "long-baseline":
            continue
        row = table.get(r["optimizer"], {})
        b0 = r["batch_size"]
        out[r["optimizer"]] = {"batch": b0, "epochs": r.get("epochs"), "lr": r["lr"], "value": r.get(f"test_{metric}"),
                               "ladder": row.get(b0), "run": r.get("run")}
    return out



RANDOM_ENCODER = "random encoder"  # the baseline that tells whether the downstream score measures pre-training
FINETUNE_KINDS = ("finetune", "finetune-baseline", "finetune-long", "finetune-baseline-long")
LONG_RECIPE_CONCLUSION = ": given the longer recipe, the randomly initialised encoder does at least as well as every pre-trained one"
BASELINE_CONCLUSIONS = {RANDOM_ENCODER: ": at this size the downstream score does not measure what pre-training "
                                        "learned"}


def finetune_baselines(runs: list[dict], kind: str = "finetune-baseline") -> dict:
    """baseline name -> downstream test accuracy / macro-F1 over its runs (seeds of the random encoder)."""
    groups = defaultdict(list)
    for r in runs:
        if r.get("kind") == kind:
            groups[r.get("baseline", r.get("run"))].append(r)
    out = {}
    for name, rs in groups.items():
        acc, sa = mean_spread([r.get("test_accuracy") for r in rs])
        f1, sf = mean_spread([r.get("test_macro_f1") for r in rs])
        out[name] = {"mean": acc, "spread": sa, "f1_mean": f1, "f1_spread": sf, "n": len(rs),
                     "runs": [r.get("run") for r in rs], "C": rs[0].get("C")}
    return out


def _encoder(r: dict) -> tuple:
    return r.get("pretrain_optimizer"), r.get("pretrain_batch"), r.get("pretrain_seed")


def finetune_recipe_check(runs: list[dict]) -> dict | None:
    """The recipe trained longer (the suite's ``long_baseline``) beside the recipe, for the same encoders:
    ``short``/``long`` tables (as :func:`finetune_table`) and the random encoder's cells ``base_short``/
    ``base_long`` over the same seeds; None without long runs."""
    long = [r for r in runs if r.get("kind") == "finetune-long"]
    long_base = [r for r in runs if r.get("kind") == "finetune-baseline-long"]
    if not long and not long_base:
        return None
    keys = {_encoder(r) for r in long}
    seeds = {r.get("pretrain_seed") for r in long_base}
    short_base = [r for r in runs if r.get("kind") == "finetune-baseline" and r.get("baseline") == RANDOM_ENCODER
                  and r.get("pretrain_seed") in seeds]
    return {"epochs": max(r.get("epochs") or 0 for r in long + long_base),
            "short": finetune_table([r for r in runs if r.get("kind") == "finetune" and _encoder(r) in keys]),
            "long": finetune_table(long),
            "base_short": finetune_baselines(short_base).get(RANDOM_ENCODER),
            "base_long": finetune_baselines(long_base, "finetune-baseline-long").get(RANDOM_ENCODER)}


#: the kinds of run trained from the chosen base LR by the √ rule (the two-phase run: its last phase's LR)
FROM_BASE_LR = ("ladder", "two-phase", "two-phase-twin")


def mark_superseded(runs: list[dict], base_lr: dict | None, suite) -> list[dict]:
    """Ladder and two-phase runs whose LR is not the chosen base LR's (a study resumed under a rule that changed
    the choice, e.g. the near-tie refinement) are relabelled ``superseded``: kept in the files, out of the
    tables."""
    if not base_lr or not suite.batches:
        return runs
    out = []
    for r in runs:
        base = base_lr.get(r.get("optimizer"))
        if r.get("kind") in FROM_BASE_LR and base is not None and not same_lr(
                r["lr"], scale_lr(base, suite.batches[0], r["batch_size"], suite.scaling)):
            r = {**r, "kind": "superseded", "kind_was": r["kind"]}
        out.append(r)
    return out
