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
    return save_figure(fig, out)


def batch_sizes(records: list[dict]) -> list[tuple[int, float]]:
    """(samples seen, samples per step since the previous record) for each record of a metrics.jsonl."""
    out, samples, step = [], 0, 0
    for r in records:
        out.append((r["samples"], (r["samples"] - samples) / max(r["step"] - step, 1)))
        samples, step = r["samples"], r["step"]
    return out


def plot_noise_scale(run_dirs: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    """B_simple over training (overall, thick; per tensor group, thin) beside the batch size each step
    used, on one log axis in samples: where B_simple is above the batch, a larger batch still buys fewer
    steps (docs/noise-scale.md). Raises ValueError when no run logged the noise scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    found = False
    for run in run_dirs:
        recs = read_metrics(run)
        points = [r for r in recs if r.get("b_simple") is not None]
        if not points:
            continue
        found = True
        label = run_label(run)
        (line,) = ax.plot([r["samples"] for r in points], [r["b_simple"] for r in points], "o-", ms=3, lw=1.6,
                          label=f"{label}: B_simple")
        color = line.get_color()
        groups = sorted({k for r in points for k in r if k.startswith("b_simple/")})
        for key, style in zip(groups, ("--", ":", "-.") * len(groups)):
            pts = [(r["samples"], r[key]) for r in points if r.get(key) is not None and r[key] > 0]
            if pts:
                ax.plot(*zip(*pts), style, color=color, lw=0.9, alpha=0.7, label=f"{label}: {key.split('/', 1)[1]}")
        ax.step(*zip(*batch_sizes(recs)), where="pre", color=color, lw=2.5, alpha=0.35, label=f"{label}: batch size")
    if not found:
        plt.close(fig)
        raise ValueError(f"no run among {', '.join(map(str, run_dirs))} logged b_simple "
                         "(train with --noise-scale and gradient accumulation)")
    ax.set(xlabel="samples seen", ylabel="samples", yscale="log",
           title=title or "simple noise scale B_simple (lines) beside the batch size used (band)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns the file."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
