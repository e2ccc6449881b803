"""The report's markdown: pure functions of the tables and verdicts into lines."""
from __future__ import annotations

from typing import Any

from .analysis import cells_at_or_below
from .runs import VERSIONED
from .stats import finite, same_lr
from .verdicts import claim_paragraph, two_phase_comparison, verdicts

def fmt(x: Any, nd: int = 4) -> str:
    return f"{x:.{nd}f}" if finite(x) else "—"


def pm(mean: Any, spread: Any, nd: int = 4) -> str:
    return "—" if not finite(mean) else f"{mean:.{nd}f} ± {fmt(spread, nd)}"


BIGRAM_CONTEXT_WORDS = {"left": "its left neighbour", "right": "its right neighbour",
                        "both": "its two neighbours (backing off to the left, then the right one)"}


def md_mlm_baselines(table: dict, unigram: float | None, bigram: dict | None) -> list[str]:
    """The MLM baselines under the table: the unigram guess and the bigram baseline (study/baselines.py), each
    with how many results are at or below it."""
    lines = []
    if unigram is not None:
        k, n = cells_at_or_below(table, unigram)
        lines.append(f"Unigram baseline (always the most frequent token): {unigram:.4f}."
                     + (" **Every result is at or below it**: the models learned no more than word frequencies."
                        if n and k == n else "") + "\n")
    if bigram and finite(bigram.get("test_accuracy")):
        acc, by = bigram["test_accuracy"], bigram["accuracy_by_context"]
        k, n = cells_at_or_below(table, acc)
        if not n:
            reading = ""  # no result yet to read against it
        elif k == n:
            reading = (" **Every result is at or below it**: no model predicted masked tokens better than a count "
                       "table of their neighbours.")
        elif k:
            reading = (f" **{k} of {n} results are at or below it**: those models predicted masked tokens no better "
                       "than a count table of their neighbours.")
        else:
            reading = " Every result is above it."
        choice = ", ".join(f"{c} {fmt(v.get('validation'))}" for c, v in by.items())
        lines.append(f"Bigram baseline (the most frequent training token given "
                     f"{BIGRAM_CONTEXT_WORDS.get(bigram['context'], bigram['context'])} as the model sees them, else "
                     f"the unigram guess; the context chosen by validation accuracy: {choice}): {acc:.4f}." + reading
                     + "\n")
    return lines


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
    for key, f in (info.get("corpus") or {}).items():
        size = "size unknown: not found on this machine" if f["bytes"] is None else f"{f['bytes']:,} bytes"
        lines.append(f"- {key.replace('_', ' ')}: `{f['path']}` ({size})")
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
    if not table:
        return [f"## {title}\n", "(no ladder run has finished yet)\n"]
    batches = sorted({b for row in table.values() for b in row})
    best = {b: max((row[b]["mean"] for row in table.values() if b in row and finite(row[b]["mean"])), default=None)
            for b in batches}

    def cell(opt, b, c):
        div = f", {c['diverged']} diverged" if c["diverged"] else ""
        val = pm(c["mean"], c["spread"])
        if best[b] is not None and finite(c["mean"]) and c["mean"] == best[b] and len(table) > 1:
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
            cells.append(f"**{c}**" if s["chosen"] is not None and same_lr(p["lr"], s["chosen"]) else c)
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
                  "Ranking: " + " > ".join(f"{r['optimizer']} {pm(r['mean'], r['spread'])} (n={r['n']})"
                                           for r in cmp["ranking"]) + ".\n"]
        for o, v in cmp["vs_ref"].items():
            if v["status"] == "n/a":
                lines.append(f"- {o} vs {cmp['ref']}: no finite result.")
            else:
                how = "within the seed spread" if v["status"] == "within spread" else "beyond the seed spread"
                lines.append(f"- {o} vs {cmp['ref']}: {v['difference']:+.4f} ({how} ±{v['noise']:.4f}).")
        lines.append("")
    lines += ["### Summary\n", "The paper's claim, part by part (as the batch grows at a fixed epoch budget, "
              "LAMB with the untuned √ rule keeps its final quality, AdamW degrades, LARS fails on the attention "
              "model):\n"]
    lines += [f"- {c['part']}: **{c['status']}** — {c['text']}" for c in claims]
    if task != "mlm":
        lines.append("- LARS fails on the attention model: not tested by this suite (not an attention model).")
    return lines + ["", claim_paragraph(claims), ""]


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
    if finite(p.get("lr")):
        bits.append(f"LR {p['lr']:.3g}")
    if p.get("warmup_steps") is not None:
        bits.append(f"warmup {p['warmup_steps']}")
    if p.get("epochs") is not None:
        bits.append(f"{p['epochs']:g} epochs")
    if p.get("optimizer_state"):
        bits.append(f"optimizer state: {p['optimizer_state']}")
    return ", ".join(bits)


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
                     f"{pm(c['accuracy_mean'], c['accuracy_spread'])}{div} | {pm(c['loss_mean'], c['loss_spread'])} |")
    lines.append("")
    for kind, c in tp.items():
        for i, p in enumerate(c["phases"]):
            label = f"phase {i + 1}" if len(c["phases"]) > 1 else "single phase"
            lines.append(f"- {names[kind]}, {label}: {_phase_desc(p)}")
    return lines + ["", two_phase_comparison(tp), "", "![two_phase.png](two_phase.png)", ""]


def md_rules(rules: dict | None) -> list[str]:
    """The design rules the runner applied (recorded in study.json by the runner that trained the study)."""
    if not rules:
        return []
    out = []
    if rules.get("refine_factor"):
        out.append(f"where the two best LRs of a sweep are within {100 * rules['near_tie']:g}% (validation loss), "
                   f"one more LR on each side of the best, ×{rules['refine_factor']:.3g} away, before the ladder")
    if rules.get("tuned_control"):
        out.append("a tuned control: each optimizer's own LR sweep at the largest batch (the same rules, the grid "
                   "moved there by the scaling rule), reported beside the √-rule result")
    if rules.get("seeds_max"):
        out.append(f"up to {rules['seeds_max']} seeds in every cell where two seeds' spread overlaps a difference "
                   "the report judges (each batch vs the smallest, each optimizer vs LAMB at the largest)")
    if rules.get("long_baseline"):
        out.append(f"the smallest batch also trained {rules['long_baseline']:g}× the epochs (seed 0): how far "
                   "from converged the ladder is")
    return ["Design rules applied by the runner: " + "; ".join(out) + ".\n"] if out else []


def md_tuned(control: dict, readings: list[str], metric: str) -> list[str]:
    if not control:
        return []
    b = next(iter(control.values()))["batch"]
    lines = [f"## Tuned control at the largest batch ({b})\n",
             f"Each optimizer's own LR sweep at batch {b} (seed 0, chosen on validation loss), its best LR "
             f"over seeds, beside the untuned √-rule result. Test {metric}, mean ± half-range (n).\n",
             "| optimizer | √-rule LR | √-rule result | own best LR | own best result | LR → validation loss |",
             "|---|---:|---:|---:|---:|---|"]
    for opt, c in control.items():
        sq, tu = c["sqrt"], c["tuned"]
        pts = ", ".join(f"{p['lr']:.3g} → " + ("✗" if p["diverged"] else f"{p['validation_loss']:.4f}")
                        for p in c["points"])
        best = "—" if c["lr"] is None else f"{c['lr']:.3g}" + (" (so far)" if c["provisional"] else "")
        lines.append(f"| {opt} | {'—' if sq is None else format(sq['lr'], '.3g')} | "
                     f"{'pending' if sq is None else pm(sq['mean'], sq['spread']) + ' (' + str(sq['n']) + ')'} | "
                     f"{best} | {pm(tu['mean'], tu['spread'])} ({tu['n']}) | {pts} |")
    return lines + ["", "Both readings, from the runs finished so far:\n", *readings, ""]


def md_ablation(table: dict, ablation: dict, name: str, metric: str) -> list[str]:
    """Each optimizer's ladder with this suite's configuration and with the ablation's, side by side."""
    if not ablation:
        return []
    batches = sorted({b for t in (table, ablation) for row in t.values() for b in row})
    lines = [f"## Ablation: the same ladder without the exclusions (`{name}`)\n",
             f"Test {metric}, mean ± half-range (n); the ablation's runs are those committed in "
             f"[{name}](../{name}/report.md).\n",
             "| optimizer | configuration | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|---|" + "---:|" * len(batches)]
    for opt in dict.fromkeys([*table, *ablation]):
        for label, t in (("this suite", table), (name, ablation)):
            row = t.get(opt, {})
            cells = ["—" if b not in row else f"{pm(row[b]['mean'], row[b]['spread'])} ({row[b]['n']})" for b in batches]
            lines.append(f"| {opt} | {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def md_long_baseline(long: dict, metric: str) -> list[str]:
    if not long:
        return []
    lines = ["## How far from converged: the smallest batch trained longer\n",
             f"| optimizer | batch | epochs | test {metric} (seed 0) | ladder at that batch | difference |",
             "|---|---:|---:|---:|---:|---:|"]
    for opt, c in long.items():
        lad = c["ladder"]
        diff = c["value"] - lad["mean"] if lad and finite(c["value"]) and finite(lad["mean"]) else None
        lines.append(f"| {opt} | {c['batch']} | {c['epochs']:g} | {fmt(c['value'])} | "
                     f"{'—' if not lad else pm(lad['mean'], lad['spread'])} | {'—' if diff is None else f'{diff:+.4f}'} |")
    return lines + [""]


def md_finetune(table: dict, source: str) -> list[str]:
    if not table:
        return ["", f"No checkpoint of `{source}` fine-tuned yet.\n"]
    lines = ["", f"Every pre-trained checkpoint of `{source}` fine-tuned with one fixed recipe.\n",
             "| pre-training optimizer | pre-training batch | downstream test accuracy | macro-F1 | "
             "pre-training test accuracy | runs |", "|---|---:|---:|---:|---:|---:|"]
    for opt, row in table.items():
        for batch, c in sorted(row.items()):
            lines.append(f"| {opt} | {batch} | {pm(c['mean'], c['spread'])} | {pm(c['f1_mean'], c['f1_spread'])} | "
                         f"{pm(c['pretrain_mean'], c['pretrain_spread'])} | {c['n']} |")
    return lines


def md_finetune_baselines(baselines: dict, readings: list[str]) -> list[str]:
    if not baselines:
        return []
    lines = ["## Baselines: what the downstream score is worth without pre-training\n",
             "The randomly initialised encoder is the pre-training suite's model at its initialisation (one per "
             "seed), fine-tuned with the same recipe; TF-IDF + logistic regression reads the same WordPiece "
             "tokens (unigrams and bigrams, the same truncation), C chosen on the validation split.\n",
             "| baseline | downstream test accuracy | macro-F1 | runs |", "|---|---:|---:|---:|"]
    for name, c in baselines.items():
        extra = f" (C={c['C']:g})" if c.get("C") is not None else ""
        lines.append(f"| {name}{extra} | {pm(c['mean'], c['spread'])} | {pm(c['f1_mean'], c['f1_spread'])} | {c['n']} |")
    return lines + ["", *readings, ""]


def md_finetune_recipe_check(check: dict | None, recipe_epochs: float, readings: list[str]) -> list[str]:
    """The recipe and the recipe trained longer, for the same encoders (analysis.finetune_recipe_check)."""
    if not check:
        return []
    e = check["epochs"]
    lines = [f"## The recipe {e / recipe_epochs:g}× longer: is the downstream score converged?\n",
             f"The random encoders and the encoders pre-trained at the smallest and the largest batch (seeds 0 and 1) "
             f"fine-tuned again for {e:g} epochs instead of {recipe_epochs:g}, everything else the same.\n",
             f"| encoder | test accuracy, {recipe_epochs:g} epochs | test accuracy, {e:g} epochs | macro-F1, {e:g} "
             "epochs | runs |", "|---|---:|---:|---:|---:|"]
    rows = [("random encoder", check["base_short"], check["base_long"])]
    rows += [(f"{opt}, pre-trained at batch {batch}", check["short"].get(opt, {}).get(batch), c)
             for opt, row in check["long"].items() for batch, c in sorted(row.items())]
    for name, short, long in rows:
        if long is None:
            continue
        lines.append(f"| {name} | {pm(short['mean'], short['spread']) if short else '—'} | "
                     f"{pm(long['mean'], long['spread'])} | {pm(long['f1_mean'], long['f1_spread'])} | {long['n']} |")
    return lines + ["", *readings, ""]


def _f(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def md_noise_rows(check: dict) -> list[str]:
    """The prediction vs the validation-target steps of one optimizer (study/noise_check.compare)."""
    lines = ["| batch | measured steps (reached) | measured efficiency | predicted steps (window range) | "
             "predicted efficiency |", "|---:|---:|---:|---:|---:|"]
    for r in check["rows"]:
        bound = "≤ " if r["upper_bound"] else ""
        eff = r["measured_efficiency"]
        rng = "–".join(_f(v, ".0f") for v in r["predicted_steps_range"]) if r["predicted_steps_range"] else "—"
        eff_s = "—" if eff is None else \
            f"{'' if r['efficiency_bound'] in (None, '=') else r['efficiency_bound'] + ' '}{eff:.2f}"
        lines.append(f"| {r['batch']} | {bound}{_f(r['measured_steps'], '.0f')} ({r['reached']}) | {eff_s} | "
                     f"{_f(r['predicted_steps'], '.0f')} ({rng}) | {_f(r['predicted_efficiency'], '.2f')} |")
    return lines


def md_noise_train_loss_rows(check: dict) -> list[str]:
    """The prediction vs the steps to the training-loss target of one optimizer."""
    lines = ["| batch | steps per seed | median | measured efficiency | predicted steps | predicted efficiency |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in check["train_loss_rows"]:
        per_seed = ", ".join("—" if v is None else str(v) for v in r["steps"])
        lines.append(f"| {r['batch']} | {per_seed} | {_f(r['median_steps'], '.0f')} | "
                     f"{_f(r['measured_efficiency'], '.2f')} | {_f(r['predicted_steps'], '.0f')} | "
                     f"{_f(r['predicted_efficiency'], '.2f')} |")
    return lines


def _range(r: Any) -> str:
    if not r:
        return "—"
    hi = "∞" if r[1] == float("inf") else f"{r[1]:.2f}"
    return f"{r[0]:.2f}–{hi}"


def md_noise_scale(section: dict | None, suite, command: str, files: list[str]) -> list[str]:
    """The noise-scale section: B_simple near the target, the predicted critical batch, the model's steps and
    efficiency beside the measured ones at every batch, the verdict per optimizer (study/noise_check.py)."""
    if section is None:
        return []
    b0 = suite.batches[0]
    what = (f"a training loss ≤ {section['loss_target']:g} (trailing mean over 5% of a run's records; finer than "
            "the evaluations)" if section["by"] == "training loss" else f"the validation target ({suite.metric} ≥ "
            f"{suite.target})")
    lines = ["## Does the gradient noise scale predict how far the batch can grow?\n",
             f"One noise-scale probe per optimizer at batch {b0} with its chosen base LR, micro-batch {b0 // 2} (two "
             "batch sizes), stopped one ladder evaluation after its batch's runs met the target: B_simple = tr Σ/|G|² "
             "([docs/noise-scale.md](../../noise-scale.md)) pooled over the last quarter of the steps before the "
             f"batch-{b0} runs reached {what}. The paper's model S = S_min (1 + B_noise/B) through the measured S({b0}) "
             f"predicts the steps and the scaling efficiency (S({b0})·{b0}/B)/S(B) = ({b0} + B_noise)/(B + B_noise) "
             "at every batch; the predicted critical batch is B_crit ≈ B_noise. Rule: the prediction **holds** at a "
             "batch where the measured efficiency's range over the seeds overlaps the range predicted by the single "
             "(full) windows of B_simple, else it **fails** (better or worse than predicted).\n"]
    if not section["optimizers"]:
        return lines + [f"Probes not run yet. `{command}` resumes the study and runs them.\n"]
    lines += ["| optimizer | probe (steps) | B_simple near the target = predicted critical batch (single windows) | "
              "verdict |", "|---|---|---:|---|"]
    for opt, c in section["optimizers"].items():
        wr = c["window_range"]
        rng = f"{wr[0]:.0f}–{wr[1]:.0f}" if wr else "—"
        rng += f"; {c['windows_unbounded']} with \\|G\\|² ≤ 0" if c["windows_unbounded"] else ""
        stop = f"{c['probe_steps']}, stopped early" if c["stopped_early"] else f"{c['probe_steps']}"
        lines.append(f"| {opt} | `{c['run']}` ({stop}) | {_f(c['b_noise_used'], ',.0f')} ({rng}) | {c['verdict']} |")
    lines += ["", "| optimizer | batch | measured steps (per seed) | model steps | measured efficiency (seed range) | "
              "predicted efficiency (window range) | verdict |", "|---|---:|---|---:|---:|---:|---|"]
    for opt, c in section["optimizers"].items():
        lines += [_noise_row(opt, c, r, section["by"] == "training loss")
                  for r in (c["train_loss_rows"] if section["by"] == "training loss" else c["rows"])]
    if section["missing"]:
        lines += ["", f"No probe yet for {', '.join(section['missing'])}: `{command}` resumes the study and runs it."]
    lines += ["", "B_simple is measured on the raw gradients along each optimizer's own trajectory; the model was "
              "derived for SGD with the best LR at each batch, and adaptive or layer-wise normalisation (Adam, "
              "LAMB, LARS) changes which noise matters (docs/noise-scale.md). A failure says the measured scaling "
              "is outside what this number describes, not that the measurement is wrong."]
    return lines + [""] + ([f"![{f}]({f})" for f in files if f == "noise_prediction.png"] or []) + [""]


def _noise_row(opt: str, c: dict, r: dict, by_loss: bool) -> str:
    b = r["batch"]
    j = c["judged"].get(b)
    if by_loss:
        seeds = ", ".join("—" if v is None else str(v) for v in r["steps"])
        eff = r["measured_efficiency"]
    else:
        seeds = f"{'≤ ' if r['upper_bound'] else ''}{_f(r['measured_steps'], 'g')} ({r['reached']})"
        eff = r["measured_efficiency"]
    measured = _f(eff, ".2f") + (f" ({_range(j['measured'])})" if j else "")
    predicted = _f(r["predicted_efficiency"], ".2f") + (f" ({_range(j['predicted'])})" if j else "")
    return (f"| {opt} | {b} | {seeds} | {_f(r['predicted_steps'], '.0f')} | {measured} | {predicted} | "
            f"{j['verdict'] if j else '(reference)'} |")
