"""Build a study report from its run files: results.json, report.md and PNG plots (matplotlib).

Every number comes from the runs' own summary.json / metrics.jsonl; the verdict sentences are computed
from those numbers with the rule stated in the report (a difference counts only beyond the seed spread).
"""
from __future__ import annotations

import json
import math
import platform
import statistics
from collections import defaultdict
from pathlib import Path


def _runs(study_dir: Path) -> list[dict]:
    out = []
    for d in sorted((study_dir / "runs").glob("*")):
        f = d / "summary.json"
        if f.exists():
            s = json.loads(f.read_text())
            s["dir"] = str(d)
            out.append(s)
    return out


def _metrics(run_dir: str) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def _mean_spread(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def steps_to_target(run_dir: str, key: str, target: float) -> int | None:
    for r in _metrics(run_dir):
        if r.get(key) is not None and r[key] >= target:
            return r["step"]
    return None


def build_table(runs: list[dict], metric: str, target: float | None) -> dict:
    cells = defaultdict(list)
    for r in runs:
        if r.get("kind") == "ladder":
            cells[(r["optimizer"], r["batch_size"])].append(r)
    table = {}
    for (opt, batch), rs in sorted(cells.items()):
        vals = [r.get(f"test_{metric}") for r in rs]
        mean, spread = _mean_spread(vals)
        loss_mean, loss_spread = _mean_spread([r.get("test_loss") for r in rs])
        stt = [steps_to_target(r["dir"], f"validation_{metric}", target) for r in rs] if target is not None else []
        table.setdefault(opt, {})[batch] = {
            "mean": mean, "spread": spread, "n": len(rs), "values": vals, "steps": rs[0].get("total_steps"),
            "lr": rs[0]["lr"], "loss_mean": loss_mean, "loss_spread": loss_spread,
            "diverged": sum(bool(r.get("diverged")) for r in rs),
            "steps_to_target": [s for s in stt if s is not None], "reached_target": sum(s is not None for s in stt),
            "unigram": rs[0].get("test_unigram_accuracy"),
        }
    return table


def verdicts(table: dict, metric: str) -> list[str]:
    lines = []
    for opt, row in table.items():
        batches = sorted(row)
        if len(batches) < 2:
            continue
        small, large = row[batches[0]], row[batches[-1]]
        drop = small["mean"] - large["mean"]
        noise = small["spread"] + large["spread"]
        k = batches[-1] // batches[0]
        if not math.isfinite(drop):
            lines.append(f"- **{opt}**: no finite result at one end of the ladder.")
        elif drop <= noise:
            lines.append(f"- **{opt}**: kept its quality over {k}× the batch: test {metric} {small['mean']:.4f} at "
                         f"{batches[0]} vs {large['mean']:.4f} at {batches[-1]} (difference {drop:+.4f} within the "
                         f"seed spread ±{noise:.4f}).")
        else:
            lines.append(f"- **{opt}**: degraded over {k}× the batch: test {metric} {small['mean']:.4f} at "
                         f"{batches[0]} → {large['mean']:.4f} at {batches[-1]} (−{drop:.4f}, beyond the seed spread "
                         f"±{noise:.4f}).")
    return lines


def _plots(study_dir: Path, runs: list[dict], table: dict, metric: str, target: float | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    # 1. final metric vs batch
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for opt, row in table.items():
        b = sorted(row)
        ax.errorbar(b, [row[x]["mean"] for x in b], yerr=[row[x]["spread"] for x in b], marker="o", capsize=3, label=opt)
    uni = next((c["unigram"] for row in table.values() for c in row.values() if c.get("unigram")), None)
    if uni:
        ax.axhline(uni, ls=":", color="grey", label="unigram baseline")
    ax.set(xscale="log", xlabel="effective batch (log)", ylabel=f"test {metric}",
           title="final quality vs batch (mean ± half-range over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(study_dir / "metric_vs_batch.png", dpi=110)
    plt.close(fig)
    files.append("metric_vs_batch.png")
    # 2. loss curves vs samples seen, one panel per optimizer (seed 0 of each batch)
    opts = list(table)
    if opts:
        fig, axes = plt.subplots(1, len(opts), figsize=(4.2 * len(opts), 3.8), squeeze=False)
        for ax, opt in zip(axes[0], opts):
            for r in sorted((r for r in runs if r["optimizer"] == opt and r.get("kind") == "ladder" and r["seed"] == 0),
                            key=lambda r: r["batch_size"]):
                m = _metrics(r["dir"])
                ax.plot([x["samples"] for x in m], [x["loss"] for x in m], label=f"b={r['batch_size']}", lw=1)
            ax.set(title=opt, xlabel="samples seen", ylabel="training loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(study_dir / "loss_curves.png", dpi=110)
        plt.close(fig)
        files.append("loss_curves.png")
    # 3. LR sweep
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sweep = defaultdict(list)
    for r in runs:
        if r.get("kind") == "sweep":
            sweep[r["optimizer"]].append((r["lr"], r.get("validation_loss")))
    for opt, pts in sweep.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] if p[1] is not None and math.isfinite(p[1]) else float("nan") for p in pts],
                "o-", label=opt)
    ax.set(xscale="log", xlabel="base LR (smallest batch)", ylabel="validation loss", title="LR sweep at the smallest batch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(study_dir / "lr_sweep.png", dpi=110)
    plt.close(fig)
    files.append("lr_sweep.png")
    # 4. steps to target, log-log, with ideal scaling
    if target is not None:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for opt, row in table.items():
            pts = [(b, statistics.median(c["steps_to_target"])) for b, c in sorted(row.items()) if c["steps_to_target"]]
            if pts:
                ax.plot(*zip(*pts), "o-", label=opt)
                b0, s0 = pts[0]
                bs = sorted(row)
                ax.plot(bs, [s0 * b0 / b for b in bs], ls=":", color="grey")
        ax.set(xscale="log", yscale="log", xlabel="effective batch", ylabel=f"steps to validation {metric} ≥ {target}",
               title="steps to target (dotted: ideal scaling, steps ∝ 1/batch)")
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(study_dir / "steps_to_target.png", dpi=110)
        plt.close(fig)
        files.append("steps_to_target.png")
    # 5. per-layer trust ratio trace of the largest-batch LAMB run
    lamb = [r for r in runs if r["optimizer"] in ("lamb", "paper", "nvlamb") and r.get("kind") == "ladder" and r["seed"] == 0]
    if lamb:
        r = max(lamb, key=lambda r: r["batch_size"])
        m = [x for x in _metrics(r["dir"]) if "trust_ratio_mean" in x]
        if m:
            fig, ax = plt.subplots(figsize=(6.5, 4))
            st = [x["step"] for x in m]
            ax.plot(st, [x["trust_ratio_mean"] for x in m], label="mean over tensors")
            ax.fill_between(st, [x["trust_ratio_min"] for x in m], [x["trust_ratio_max"] for x in m], alpha=0.2,
                            label="min..max")
            ax.set(yscale="log", xlabel="step", ylabel="trust ratio", title=f"LAMB trust ratios, batch {r['batch_size']}")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(study_dir / "trust_ratios.png", dpi=110)
            plt.close(fig)
            files.append("trust_ratios.png")
    return files


def build_report(study_dir: str | Path, suite=None) -> Path:
    import torch

    study_dir = Path(study_dir)
    runs = _runs(study_dir)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {study_dir / 'runs'}")
    meta = json.loads((study_dir / "study.json").read_text()) if (study_dir / "study.json").exists() else {}
    if suite is None:
        from .suites import get_suite
        suite = get_suite(meta.get("suite", study_dir.name))
    metric = suite.metric
    if suite.task == "classify":
        return _finetune_report(study_dir, runs, suite)
    table = build_table(runs, metric, suite.target)
    files = _plots(study_dir, runs, table, metric, suite.target)
    (study_dir / "results.json").write_text(json.dumps({"suite": suite.name, "base_lr": meta.get("base_lr"),
                                                        "table": {o: {str(b): c for b, c in r.items()} for o, r in table.items()},
                                                        "runs": runs}, indent=2, default=str))
    batches = sorted({b for row in table.values() for b in row})
    lines = [f"# Study `{suite.name}`\n", suite.description + "\n",
             f"Rebuilt with `largebatch report {study_dir}` from {len(runs)} runs. torch {torch.__version__}, "
             f"Python {platform.python_version()}, {platform.machine()}.\n",
             "Protocol: base LR swept at the smallest batch on the validation split, then the untuned rule "
             f"({suite.scaling} LR scaling, {suite.warmup_steps} warmup steps at every batch, {suite.epochs:g} epochs). "
             f"Base LRs chosen: {meta.get('base_lr')}.\n",
             f"## Test {metric} (mean ± half-range over seeds; steps per run)\n",
             "| optimizer | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---:|" * len(batches)]
    for opt, row in table.items():
        cells = []
        for b in batches:
            c = row.get(b)
            if c is None:
                cells.append("—")
            else:
                div = f", {c['diverged']} diverged" if c["diverged"] else ""
                cells.append(f"{c['mean']:.4f} ± {c['spread']:.4f} (n={c['n']}, {c['steps']} steps{div})")
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    uni = next((c["unigram"] for row in table.values() for c in row.values() if c.get("unigram")), None)
    if uni:
        lines.append(f"\nUnigram baseline (always the most frequent token): {uni:.4f}.\n")
    lines += ["\n## Did the paper's claim hold here?\n",
              "Rule: a drop from the smallest to the largest batch counts only if it exceeds the sum of the two "
              "seed half-ranges.\n", *verdicts(table, metric), ""]
    lines += [f"![{f}]({f})" for f in files]
    (study_dir / "report.md").write_text("\n".join(lines) + "\n")
    return study_dir / "report.md"


def _finetune_report(study_dir: Path, runs: list[dict], suite) -> Path:
    rows = defaultdict(list)
    for r in runs:
        rows[(r.get("pretrain_optimizer"), r.get("pretrain_batch"))].append(r)
    lines = [f"# Study `{suite.name}`\n", suite.description + "\n",
             "| pre-training optimizer | pre-training batch | BBC test accuracy | macro-F1 | runs |", "|---|---:|---:|---:|---:|"]
    for (opt, batch), rs in sorted(rows.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0)):
        acc, sa = _mean_spread([r.get("test_accuracy") for r in rs])
        f1, sf = _mean_spread([r.get("test_macro_f1") for r in rs])
        lines.append(f"| {opt} | {batch} | {acc:.4f} ± {sa:.4f} | {f1:.4f} ± {sf:.4f} | {len(rs)} |")
    (study_dir / "results.json").write_text(json.dumps({"suite": suite.name, "runs": runs}, indent=2, default=str))
    (study_dir / "report.md").write_text("\n".join(lines) + "\n")
    return study_dir / "report.md"
