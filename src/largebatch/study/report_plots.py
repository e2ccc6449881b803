"""The study report's plots (matplotlib, Agg). Each function draws from already-computed tables / run files,
writes one PNG into the study directory and returns its file name, or None when there is nothing to draw."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .analysis import unigram_baseline
from .runs import binned_curve, load_metrics, load_trust, model_order
from .stats import finite

LAMB_LIKE = ("lamb", "paper", "nvlamb")  # drawn first in the trust-ratio plots

DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _batch_ticks(ax, batches) -> None:
    """Log x axis labelled with the batches themselves."""
    from matplotlib.ticker import NullFormatter

    bs = sorted(set(batches))
    if bs:
        ax.set_xticks(bs)
        ax.set_xticklabels([str(b) for b in bs])
        ax.xaxis.set_minor_formatter(NullFormatter())


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=DPI)
    _plt().close(fig)
    return name


def _seed0_ladder(runs: list[dict], opt: str) -> list[dict]:
    return sorted((r for r in runs if r["optimizer"] == opt and r.get("kind") == "ladder" and r.get("seed", 0) == 0),
                  key=lambda r: r["batch_size"])


def _batch_colors(batches: list[int]):
    cmap = _plt().get_cmap("plasma")
    n = max(len(batches) - 1, 1)
    return {b: cmap(0.85 * i / n) for i, b in enumerate(sorted(batches))}


def _margin_around(ax, levels: list[float], frac: float = 0.05) -> None:
    """Widen the y range so that horizontal baseline lines at ``levels`` are not drawn on the frame."""
    if not levels:
        return
    lo, hi = ax.get_ylim()
    pad = frac * (max(hi, *levels) - min(lo, *levels))
    ax.set_ylim(min(lo, min(levels) - pad), max(hi, max(levels) + pad))


def metric_vs_batch(out: Path, table: dict, metric: str, bn_table: dict | None = None,
                    bigram: dict | None = None) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for opt, row in table.items():
        b = sorted(row)
        line = ax.errorbar(b, [row[x]["mean"] for x in b], yerr=[row[x]["spread"] for x in b], marker="o", capsize=3,
                           label=opt)
        if bn_table and opt in bn_table:
            bb = sorted(bn_table[opt])
            ax.errorbar(bb, [bn_table[opt][x]["mean"] for x in bb], yerr=[bn_table[opt][x]["spread"] for x in bb],
                        marker="s", ls="--", capsize=3, color=line[0].get_color(), alpha=0.6, label=f"{opt} (precise BN)")
    uni = unigram_baseline(table)
    if uni:
        ax.axhline(uni, ls=":", color="grey", label="unigram baseline")
    if bigram and finite(bigram.get("test_accuracy")):
        ax.axhline(bigram["test_accuracy"], ls="-.", color="dimgrey", label=f"bigram baseline ({bigram['context']})")
    _margin_around(ax, [v for v in (uni, (bigram or {}).get("test_accuracy")) if finite(v)])
    ax.set(xscale="log", xlabel="effective batch (log)", ylabel=f"test {metric}",
           title="final quality vs batch (mean ± half-range over seeds)")
    _batch_ticks(ax, [b for row in table.values() for b in row])
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return _save(fig, out, "metric_vs_batch.png")


def _curves(out: Path, runs: list[dict], opts: list[str], name: str, ylabel: str, series) -> str | None:
    if not opts:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(opts), figsize=(4.2 * len(opts), 3.8), squeeze=False)
    colors = _batch_colors(sorted({r["batch_size"] for r in runs if r.get("kind") == "ladder"}))
    for ax, opt in zip(axes[0], opts):
        for r in _seed0_ladder(runs, opt):
            xs, ys = series(load_metrics(r["dir"]))
            if xs:
                ax.plot(xs, ys, label=f"b={r['batch_size']}", lw=1, color=colors.get(r["batch_size"]),
                        marker="o" if len(xs) < 30 else None, ms=3)
        ax.set(title=opt, xlabel="samples seen", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, out, name)


def loss_curves(out: Path, runs: list[dict], table: dict) -> str | None:
    return _curves(out, runs, list(table), "loss_curves.png", "training loss (binned mean)",
                   lambda m: binned_curve(m["samples"], m["loss"]))


def validation_curves(out: Path, runs: list[dict], table: dict, metric: str) -> str | None:
    key = f"validation_{metric}"

    def series(m):
        ev = [e for e in m["evals"] if finite(e.get(key))]
        return [e["samples"] for e in ev], [e[key] for e in ev]

    return _curves(out, runs, list(table), "validation_curves.png", f"validation {metric}", series)


def lr_sweep(out: Path, sweep: dict) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for opt, s in sweep.items():
        pts = s["points"]
        line, = ax.plot([p["lr"] for p in pts],
                        [p["validation_loss"] if not p["diverged"] else float("nan") for p in pts], "o-", label=opt)
        ok = [p["validation_loss"] for p in pts if not p["diverged"]]
        for p in pts:
            if p["diverged"] and ok:
                ax.plot([p["lr"]], [max(ok)], "x", color=line.get_color(), ms=9)
            if s["chosen"] is not None and not p["diverged"] and math.isclose(p["lr"], s["chosen"], rel_tol=1e-9):
                ax.plot([p["lr"]], [p["validation_loss"]], "*", color=line.get_color(), ms=14)
    ax.set(xscale="log", xlabel="base LR (smallest batch)", ylabel="validation loss",
           title="LR sweep at the smallest batch (★ chosen, ✗ diverged)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return _save(fig, out, "lr_sweep.png")


def steps_to_target(out: Path, table: dict, metric: str, target: float) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for opt, row in table.items():
        pts = [(b, statistics.median(c["steps_to_target"])) for b, c in sorted(row.items()) if c["steps_to_target"]]
        if pts:
            line, = ax.plot(*zip(*pts), "o-", label=opt)
            bounded = [(b, st) for b, st in pts if row[b].get("target_at_first_eval")]
            if bounded:  # met at the first evaluation: an upper bound, drawn hollow
                ax.plot(*zip(*bounded), "o", mfc="white", color=line.get_color())
            b0, s0 = pts[0]
            bs = sorted(row)
            ax.plot(bs, [s0 * b0 / b for b in bs], ls=":", color=line.get_color(), alpha=0.7)
    if not ax.lines:
        ax.text(0.5, 0.5, "no run reached the target (yet)", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set(xscale="log", yscale="log")
        _batch_ticks(ax, [b for row in table.values() for b in row])
        ax.legend(fontsize=8)
    ax.set(xlabel="effective batch", ylabel=f"steps to validation {metric} ≥ {target}",
           title="steps to target (dotted: ideal scaling, steps ∝ 1/batch;\nhollow: met at the first evaluation, an upper bound)")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out, "steps_to_target.png")


def _trust_runs(runs: list[dict]) -> dict[str, list[dict]]:
    """optimizer -> its seed-0 ladder runs (smallest and largest batch) that logged trust ratios."""
    out = {}
    for opt in sorted({r["optimizer"] for r in runs if r.get("kind") == "ladder"}):
        rs = _seed0_ladder(runs, opt)
        if rs and ((Path(rs[-1]["dir"]) / "trust.jsonl").exists() or load_metrics(rs[-1]["dir"])["trust"]):
            out[opt] = [rs[-1]] + ([rs[0]] if len(rs) > 1 else [])
    # LAMB-like first, then LARS, then the rest
    return dict(sorted(out.items(), key=lambda kv: (kv[0] not in LAMB_LIKE, kv[0] != "lars", kv[0])))


def _trust_summary(run_dir: str) -> list[tuple]:
    """(step, mean, min, max) over tensors from trust.jsonl, for runs whose metrics.jsonl lacks the summary."""
    steps, series = load_trust(run_dir)
    out = []
    for i, st in enumerate(steps):
        vals = [v[i] for v in series.values() if finite(v[i])]
        if vals:
            out.append((st, sum(vals) / len(vals), min(vals), max(vals)))
    return out


def trust_ratios(out: Path, runs: list[dict]) -> str | None:
    """Mean and min..max of the trust ratios over tensors (metrics.jsonl, else trust.jsonl), largest batch,
    per optimizer."""
    chosen = [(opt, rs[0], load_metrics(rs[0]["dir"])["trust"] or _trust_summary(rs[0]["dir"]))
              for opt, rs in _trust_runs(runs).items()]
    chosen = [c for c in chosen if c[2]]
    if not chosen:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(chosen), figsize=(5.5 * len(chosen), 4), squeeze=False)
    for ax, (opt, r, tr) in zip(axes[0], chosen):
        tr = [t for t in tr if finite(t[1]) and t[1] > 0]
        st = [t[0] for t in tr]
        ax.plot(st, [t[1] for t in tr], label="mean over tensors", lw=1)
        if all(finite(t[2]) and finite(t[3]) for t in tr):
            ax.fill_between(st, [max(t[2], 1e-12) for t in tr], [t[3] for t in tr], alpha=0.2, label="min..max")
        ax.set(yscale="log", xlabel="step", ylabel="trust ratio", title=f"{opt} trust ratios, batch {r['batch_size']}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, out, "trust_ratios.png")


def _notable(order: list[str], series: dict[str, list[float]]) -> list[str]:
    """A few tensors worth a label: the first (embeddings / first conv), the output layer's weight, and the
    tensors with the lowest and highest median trust ratio."""
    picks = [order[0]]
    weights = [n for n in order if n.endswith("weight") and not any(t in n.lower() for t in ("norm", "bn", "ln."))]
    if weights and weights[-1] not in picks:
        picks.append(weights[-1])
    med = {n: statistics.median([v for v in series[n] if finite(v) and v > 0] or [math.nan]) for n in order}
    shown = [n for n in order if finite(med[n])]
    if shown:
        for n in (min(shown, key=med.get), max(shown, key=med.get)):
            if n not in picks:
                picks.append(n)
    return picks


def trust_layers(out: Path, runs: list[dict]) -> str | None:
    """Per-tensor trust ratios (trust.jsonl), one line per tensor coloured by position in the model; rows =
    optimizers, columns = largest and smallest batch (seed-0 ladder runs)."""
    panels = []
    for opt, rs in _trust_runs(runs).items():
        row = [(r, *load_trust(r["dir"])) for r in rs]
        row = [x for x in row if x[1] and x[2]]
        if row:
            panels.append((opt, row))
    if not panels:
        return None
    plt = _plt()
    from matplotlib import cm, colors

    ncols = max(len(row) for _, row in panels)
    fig, axes = plt.subplots(len(panels), ncols, figsize=(6.2 * ncols, 4.3 * len(panels)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for i, (opt, row) in enumerate(panels):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(row):
                ax.axis("off")
                continue
            r, steps, series = row[j]
            order = model_order(list(series))
            notable = _notable(order, series)
            n = max(len(order) - 1, 1)
            for k, name in enumerate(order):
                ys = [v if finite(v) and v > 0 else float("nan") for v in series[name]]
                hi = name in notable
                ax.plot(steps, ys, color=cmap(k / n), lw=1.8 if hi else 0.8, alpha=1.0 if hi else 0.6,
                        label=name if hi else None, ls="--" if hi and k in (0, len(order) - 1) else "-")
            ax.set(yscale="log", xlabel="step", ylabel="trust ratio",
                   title=f"{opt}, batch {r['batch_size']} ({len(order)} tensors)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6, loc="best")
            fig.colorbar(cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap=cmap), ax=ax,
                         label="position in model (input → output)")
    return _save(fig, out, "trust_layers.png")


def two_phase(out: Path, runs: list[dict], tp: dict | None, metric: str = "accuracy") -> str | None:
    """Validation metric vs training step of the two-phase run(s) and the twin(s); the phase boundary marked."""
    if not tp:
        return None
    plt = _plt()
    key = f"validation_{metric}"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"two-phase": "-", "two-phase-twin": "--"}
    names = {"two-phase": "two-phase", "two-phase-twin": "single-phase twin"}
    for kind, c in tp.items():
        for r in (r for r in runs if r.get("run") in c["runs"]):
            m = load_metrics(r["dir"])
            ev = [e for e in m["evals"] if finite(e.get(key))]
            ax.plot([e["step"] for e in ev], [e[key] for e in ev], styles[kind], marker="o", ms=3,
                    label=f"{names[kind]} s{r.get('seed', 0)}")
        for step, phase in c["phase_starts"][1:]:
            ax.axvline(step - 0.5, color="grey", ls=":")
            ax.annotate(f"phase {phase}", (step - 0.5, 0.02), xycoords=("data", "axes fraction"), fontsize=8,
                        color="grey", ha="left")
    ax.set(xlabel="optimizer step", ylabel=f"validation {metric}", title="two-phase run vs its single-phase twin")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return _save(fig, out, "two_phase.png")


def finetune_plot(out: Path, table: dict, random: dict | None = None, check: dict | None = None) -> list[str]:
    """Downstream accuracy vs pre-training batch per pre-training optimizer (log x), the random encoder's band
    (mean ± half-range) and, with the recipe check, the longer recipe's points (open markers, dashed) and band."""
    if not table:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.0, 4.5))  # the legend goes right of the axes
    colors = {}
    for opt, row in table.items():
        b = sorted(row)
        bars = ax.errorbar(b, [row[x]["mean"] for x in b], yerr=[row[x]["spread"] for x in b], marker="o", capsize=3,
                           label=opt)
        colors[opt] = bars.lines[0].get_color()
    bands = [(random, "0.55", ":", "random encoder")]
    if check:
        e = check["epochs"]
        for opt, row in check["long"].items():
            b = sorted(row)
            ax.errorbar(b, [row[x]["mean"] for x in b], yerr=[row[x]["spread"] for x in b], marker="o", mfc="none",
                        ls="--", capsize=3, color=colors.get(opt), label=f"{opt}, {e:g} epochs")
        bands.append((check.get("base_long"), "0.2", "-.", f"random encoder, {e:g} epochs"))
    for cell, color, style, label in bands:
        if cell and finite(cell.get("mean")):
            ax.axhspan(cell["mean"] - cell["spread"], cell["mean"] + cell["spread"], color=color, alpha=0.2, lw=0)
            ax.axhline(cell["mean"], color=color, lw=1.2, ls=style, label=label)
    ax.set(xscale="log", xlabel="pre-training batch (log)", ylabel="downstream test accuracy",
           title="fine-tuned accuracy vs pre-training batch (mean ± half-range)")
    _batch_ticks(ax, [b for row in table.values() for b in row])
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return [_save(fig, out, "finetune_vs_batch.png")]


def noise_prediction(out: Path, series: list[dict], name: str, ylabel: str) -> str | None:
    """Per suite (a column): measured steps to the target vs batch beside the model S = S_min(1 + B_noise/B)
    through S(b0), per optimizer (top); B_simple of the noise-scale probe over training (bottom). ``series``:
    noise_check.plot_series of each comparison."""
    from ..train.noise_scale import steps_model
    from .noise_check import min_steps

    if not series:
        return None
    plt = _plt()
    suites = sorted({c["suite"] for c in series})
    fig, axes = plt.subplots(2, len(suites), figsize=(6 * len(suites), 8), squeeze=False)
    for col, suite in enumerate(suites):
        ax_s, ax_n = axes[0, col], axes[1, col]
        for c in (c for c in series if c["suite"] == suite):
            exact = [(b, s) for b, s, bound in c["points"] if not bound]
            bounds = [(b, s) for b, s, bound in c["points"] if bound]
            (line,) = ax_s.plot(*(zip(*exact) if exact else ([], [])), "o", ms=6,
                                label=f"{c['optimizer']} measured (open: an upper bound)")
            if bounds:
                ax_s.plot(*zip(*bounds), "o", ms=6, mfc="none", color=line.get_color())
            if c["b_noise"] and c["s0"]:
                bs = [c["b0"] * 2 ** (k / 4) for k in range(4 * 6 + 1)]
                s_min = min_steps(c["s0"], c["b0"], c["b_noise"])
                ax_s.plot(bs, [steps_model(b, s_min, c["b_noise"]) for b in bs], "-", color=line.get_color(),
                          label=f"{c['optimizer']} model, B_noise = {c['b_noise']:.0f}")
            pts = [(s, v) for s, v in c["over_training"] if finite(v) and v > 0]
            if pts:
                ax_n.plot(*zip(*pts), "-", color=line.get_color(), label=f"{c['optimizer']} (b={c['b0']})")
            if c["s0"]:
                ax_n.axvline(c["s0"], color=line.get_color(), ls=":", lw=1)
            ax_n.axhline(c["b0"], color="grey", ls="--", lw=1)
        ax_s.set(xscale="log", yscale="log", xlabel="batch", ylabel=ylabel,
                 title=f"{suite}: measured (points) vs S = S_min (1 + B_noise/B)")
        ax_n.set(yscale="log", xlabel="step (dotted: target met at the smallest batch; dashed: that batch)",
                 ylabel="B_simple (window means)", title=f"{suite}: B_simple over training at the smallest batch")
        for ax in (ax_s, ax_n):
            ax.grid(alpha=0.3, which="both")
            if ax.lines:
                ax.legend(fontsize=7)
    return _save(fig, out, name)


def all_plots(out: Path, runs: list[dict], table: dict, sweep: dict, metric: str, target: float | None,
              tp: dict | None, bn_table: dict | None = None, bigram: dict | None = None) -> list[str]:
    files = [metric_vs_batch(out, table, metric, bn_table, bigram), loss_curves(out, runs, table),
             validation_curves(out, runs, table, metric), lr_sweep(out, sweep)]
    if target is not None:
        files.append(steps_to_target(out, table, metric, target))
    files += [trust_ratios(out, runs), trust_layers(out, runs), two_phase(out, runs, tp, metric)]
    return [f for f in files if f]
