"""Build a study report from its run files: results.json, report.md and PNG plots (matplotlib).

Every number comes from the runs' own summary.json / metrics.jsonl / trust.jsonl / config.json; every
verdict sentence is computed from those numbers with the rule stated in the report (a difference counts
only beyond the seed spread). This module only puts the pieces together, one module per concern, each
importing only those before it: loading the runs (:mod:`.runs`) → statistics (:mod:`.analysis`) →
verdicts (:mod:`.verdicts`) → markdown tables (:mod:`.markdown`) → plots (:mod:`.report_plots`).

A study that is still running (some cells empty, no study.json yet) gives a partial report: missing
cells are shown as "—", the base LR is the provisional best of the sweep so far, and the verdicts say
what is not measured yet.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import report_plots as plots
from .analysis import (BASELINE_CONCLUSIONS, FINETUNE_KINDS, LONG_RECIPE_CONCLUSION, RANDOM_ENCODER, build_table,
                       finetune_baselines, finetune_recipe_check, finetune_table, long_baseline, mark_superseded,
                       provisional, steps_table, sweep_table, tuned_control, two_phase_table, unigram_baseline)
from .markdown import (md_ablation, md_finetune, md_finetune_baselines, md_finetune_recipe_check, md_header,
                       md_long_baseline, md_mlm_baselines, md_noise_scale, md_protocol, md_rules, md_steps, md_sweep,
                       md_table, md_tuned, md_two_phase, md_verdicts)
from .noise_check import noise_section, plot_series
from .runs import header_info, load_baselines, load_runs
from .suites import SUITES, get_suite
from .verdicts import (against_baseline, claim_paragraph, claim_summary, compare_at_largest, tuned_readings, two_phase_comparison,
                       verdicts)


def _clean(x):
    """JSON-safe: NaN / inf -> None, tuples -> lists, int dict keys -> strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def build_report(study_dir: str | Path, suite=None) -> Path:
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise FileNotFoundError(f"no study directory at {study_dir}")
    runs = load_runs(study_dir)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {study_dir / 'runs'}")
    meta = {}
    if (study_dir / "study.json").exists():
        try:
            meta = json.loads((study_dir / "study.json").read_text())
        except json.JSONDecodeError:
            meta = {}
    if suite is None:
        suite = get_suite(meta.get("suite") or _guess_suite(study_dir, runs))
    if suite.task == "classify":
        return _finetune_report(study_dir, runs, suite)
    metric, target = suite.metric, suite.target
    runs = mark_superseded(runs, meta.get("base_lr"), suite)
    table = build_table(runs, metric, target)
    bn_key = f"precise_bn_{metric}"
    bn_table = build_table(runs, metric, None, key=bn_key) if any(f"test_{bn_key}" in r for r in runs
                                                                    if r.get("kind") == "ladder") else None
    sweep = sweep_table(runs, meta.get("base_lr"), suite.batches[0] if suite.batches else None)
    st = steps_table(table)
    cmp = compare_at_largest(table)
    claims = claim_summary(table, suite.task, metric, ladder=tuple(suite.batches), unigram=unigram_baseline(table))
    tp = two_phase_table(runs)
    info = header_info(study_dir, runs, suite.name)

    bigram = load_baselines(study_dir).get("bigram")
    files = plots.all_plots(study_dir, runs, table, sweep, metric, target, tp, bn_table, bigram)
    uni = unigram_baseline(table)
    lines = md_header(info, suite) + md_protocol(suite, meta.get("base_lr"), provisional(sweep))
    lines += md_rules(_rules(suite, runs))
    lines += md_table(table, f"Test {metric}", metric)
    lines += md_mlm_baselines(table, uni, bigram)
    if bn_table:
        lines += md_table(bn_table, f"Test {metric} with precise BN (BatchNorm statistics recomputed after training)",
                          f"precise-BN {metric}")
    lines += [f"![{f}]({f})" for f in ("metric_vs_batch.png",) if f in files] + [""]
    design_lines, design = _design(study_dir, runs, suite, meta, table)
    lines += md_verdicts(table, metric, suite.task, cmp, claims, bn_table, tuple(suite.batches)) + design_lines
    lines += md_sweep(sweep)
    lines += md_steps(st, metric, target)
    if "steps_to_target.png" in files:
        lines += ["![steps_to_target.png](steps_to_target.png)", ""]
    noise_lines, noise = _noise(study_dir, runs, table, st, suite, info["commands"][0], files)
    lines += noise_lines
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
        "base_lr": meta.get("base_lr"), "base_lr_provisional": provisional(sweep) or None,
        "header": info, "table": table, "precise_bn_table": bn_table, "unigram_baseline": uni,
        "bigram_baseline": bigram,
        "sweep": sweep, "steps_to_target": st, "verdicts": verdicts(table, metric),
        "precise_bn_verdicts": verdicts(bn_table, f"precise-BN {metric}") if bn_table else None,
        "comparison_at_largest": cmp, "claims": claims, "claim_summary": claim_paragraph(claims), "two_phase": tp,
        "two_phase_comparison": two_phase_comparison(tp) if tp else None, **design,
        **({"noise_scale": noise} if noise else {}), "files": files,
        "runs": runs}), indent=2, default=str))
    (study_dir / "report.md").write_text("\n".join(lines) + "\n")
    return study_dir / "report.md"


DESIGN_KINDS = ("tuned-sweep", "tuned", "long-baseline")  # kinds only the runner with the design rules trains


def _rules(suite, runs: list[dict]) -> dict | None:
    """The suite's design rules, when its runs show that the runner applied them."""
    if not any(r.get("kind") in DESIGN_KINDS for r in runs):
        return None
    return {"near_tie": suite.near_tie, "refine_factor": suite.refine_factor, "tuned_control": suite.tuned_control,
            "seeds_max": suite.seeds_max, "long_baseline": suite.long_baseline}


def _design(study_dir: Path, runs: list[dict], suite, meta: dict, table: dict) -> tuple[list[str], dict]:
    """The controls that say why a result came out as it did: the tuned control at the largest batch with
    both readings, the long-trained smallest batch, and the ablation row (a sibling study directory)."""
    metric = suite.metric
    control = tuned_control(runs, table, meta.get("tuned_lr"), suite.batches[-1], metric) if suite.batches else {}
    readings = tuned_readings(control, metric)
    long = long_baseline(runs, table, metric)
    abl_dir = study_dir.parent / suite.ablation if suite.ablation else None
    abl_runs = load_runs(abl_dir) if abl_dir is not None and (abl_dir / "runs").is_dir() else []
    ablation = build_table(abl_runs, metric, None) if abl_runs else {}
    lines = md_tuned(control, readings, metric) + md_long_baseline(long, metric)
    lines += md_ablation(table, ablation, suite.ablation, metric)
    data = {"rules": _rules(suite, runs), "tuned_control": control, "tuned_readings": readings,
            "long_baseline": long, "ablation": {"suite": suite.ablation, "table": ablation} if ablation else None}
    return lines, {k: v for k, v in data.items() if v}  # a study without these runs keeps its results.json


def _noise(study_dir: Path, runs: list[dict], table: dict, st: dict, suite, command: str,
           files: list[str]) -> tuple[list[str], dict | None]:
    """The noise-scale section (study/noise_check.py) and its plot, for a suite with probes."""
    section = noise_section(runs, table, st, suite)
    if section and section["optimizers"]:
        by_loss = section["by"] == "training loss"
        ylabel = f"steps to training loss ≤ {section['loss_target']:g}" if by_loss else "steps to the validation target"
        png = plots.noise_prediction(study_dir, [plot_series(c, suite.name, by_loss)
                                                 for c in section["optimizers"].values()], "noise_prediction.png", ylabel)
        files.append(png)
    return md_noise_scale(section, suite, command, files), section


def _guess_suite(study_dir: Path, runs: list[dict]) -> str:
    """No study.json (a study still running): the directory name if it is a suite, else the one suite whose
    task and optimizers match the runs."""
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
    runs = [r for r in runs if r.get("kind", "finetune") in FINETUNE_KINDS]
    if not runs:
        raise FileNotFoundError(f"no finished finetune runs under {study_dir / 'runs'}")
    pretrained = [r for r in runs if r.get("kind", "finetune") == "finetune"]
    table = finetune_table(pretrained)
    baselines = finetune_baselines(runs)
    readings = [line for name, c in baselines.items()
                for line in against_baseline(table, c, name, BASELINE_CONCLUSIONS.get(name, ""))]
    check = finetune_recipe_check(runs)
    check_readings = against_baseline(check["long"], check["base_long"], f"random encoder at {check['epochs']:g} "
                                      "epochs", LONG_RECIPE_CONCLUSION) if check else []
    info = header_info(study_dir, runs, suite.name)
    files = plots.finetune_plot(study_dir, table, baselines.get(RANDOM_ENCODER), check) if table else []
    lines = md_header(info, suite) + md_finetune(table, suite.source)
    v = verdicts(table, "downstream accuracy")
    if table:
        lines += ["", "### Downstream accuracy, smallest vs largest pre-training batch\n",
                  "Rule: a drop counts only if it exceeds the sum of the two seed half-ranges.\n",
                  *(v or ["- (no optimizer has two pre-training batches yet)"]), ""]
    lines += md_finetune_baselines(baselines, readings)
    lines += md_finetune_recipe_check(check, suite.epochs, check_readings)
    lines += [f"![{f}]({f})" for f in files]
    extra = {"baselines": baselines, "baseline_readings": readings} if baselines else {}
    if check:
        extra |= {"recipe_check": check, "recipe_check_readings": check_readings}
    (study_dir / "results.json").write_text(json.dumps(_clean({
        "suite": suite.name, "task": suite.task, "header": info, "table": table, "verdicts": v, **extra,
        "files": files, "runs": runs}), indent=2, default=str))
    (study_dir / "report.md").write_text("\n".join(lines) + "\n")
    return study_dir / "report.md"
