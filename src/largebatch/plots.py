"""Curves of training runs (matplotlib): loss, held-out metric, LR and trust ratios."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory of `largebatch train`?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_label(run_dir: str | Path) -> str:
    cfg_path = Path(run_dir) / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        return f"{cfg.get('optimizer')} b={cfg.get('batch_size')} lr={cfg.get('lr'):g}"
    return Path(run_dir).name


def plot_runs(run_dirs: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_loss, ax_eval), (ax_lr, ax_trust) = axes
    for run in run_dirs:
        recs = read_metrics(run)
        label = run_label(run)
        samples = [r["samples"] for r in recs]
        (line,) = ax_loss.plot(samples, [r["loss"] for r in recs], label=label, lw=1.2)
        color = line.get_color()
        evals = [(r["samples"], k, v) for r in recs for k, v in r.items()
                 if k.endswith("_accuracy") and not k.endswith("unigram_accuracy")]
        if evals:
            key = evals[0][1]
            pts = [(s, v) for s, k, v in evals if k == key]
            ax_eval.plot(*zip(*pts), "o-", color=color, label=f"{label} ({key})", ms=3)
            base = [(s, v) for r in recs for k, v in r.items() if k.endswith("unigram_accuracy") for s in [r["samples"]]]
            if base:
                ax_eval.axhline(base[-1][1], color="grey", ls=":", lw=1)
        ax_lr.plot([r["step"] for r in recs], [r["lr"] for r in recs], color=color, label=label)
        trust = [(r["step"], r["trust_ratio_mean"], r["trust_ratio_min"], r["trust_ratio_max"])
                 for r in recs if "trust_ratio_mean" in r]
        if trust:
            steps, mean, lo, hi = zip(*trust)
            ax_trust.plot(steps, mean, color=color, label=label)
            ax_trust.fill_between(steps, lo, hi, color=color, alpha=0.15)
    ax_loss.set(xlabel="samples seen", ylabel="training loss", title="training loss")
    ax_eval.set(xlabel="samples seen", ylabel="accuracy", title="held-out accuracy (dotted: unigram baseline)")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax_trust.set(xlabel="step", ylabel="trust ratio", yscale="log", title="trust ratio: mean, band = min..max over tensors")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
