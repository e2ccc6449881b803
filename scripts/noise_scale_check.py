"""The noise-scale prediction against the study's measured steps-to-target (docs/results/noise-scale/).

For each (suite, optimizer) with a noise-scale run at the suite's smallest batch b0: B_simple near the
point where the committed b0 runs first met the validation target (ratio of the mean |G|² and tr Σ
estimates over the last quarter of the steps before it), the paper's model S(B) = S_min·(1 + B_noise/B)
with S_min fixed by the measured S(b0), and its prediction at every larger batch beside the committed
medians. Writes check.json and prediction.png into the output folder; prints a markdown table.

    python scripts/noise_scale_check.py --runs DIR... --out docs/results/noise-scale
Each run directory holds a config.json naming the task and optimizer, and metrics.jsonl records with the
``window_*`` statistics of ``largebatch train --noise-scale`` (docs/noise-scale.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from largebatch.train.noise_scale import simple_noise_scale, steps_model

SUITES = {"mlm": "mlm-scaling", "image": "image-scaling"}


def window_estimates(run: Path) -> list[dict]:
    """The run's records carrying window means of the raw |G|² and tr Σ estimates."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if r.get("window_steps")]


def noise_near(windows: list[dict], stop: float, fraction: float = 0.25) -> tuple[float | None, int, list[float]]:
    """B_simple from the windows ending in (stop·(1 − fraction), stop]: the ratio of the step-weighted means,
    the number of steps pooled, and the windows' own values (their spread shows the estimate's noise)."""
    chosen = [w for w in windows if stop * (1 - fraction) < w["step"] <= stop]
    steps = sum(w["window_steps"] for w in chosen)
    if not steps:
        return None, 0, []
    grad_sq = sum(w["window_grad_sq_norm"] * w["window_steps"] for w in chosen) / steps
    trace = sum(w["window_grad_trace_cov"] * w["window_steps"] for w in chosen) / steps
    return simple_noise_scale(trace, grad_sq), steps, [w["window_b_simple"] for w in chosen]


def steps_to_train_loss(run_dir: Path, target: float, smooth: float = 0.05) -> int | None:
    """First step at which the trailing mean of the logged training losses (over ``smooth`` of the run's
    records) is at or below ``target``; None if never. The mean lags by about half its window, the same
    fraction of every run."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    k = max(1, round(len(recs) * smooth))
    for i in range(k - 1, len(recs)):
        if sum(r["loss"] for r in recs[i - k + 1:i + 1]) / k <= target:
            return recs[i]["step"]
    return None


def train_loss_steps(results: dict, results_root: Path, optimizer: str, target: float) -> dict[int, list[int | None]]:
    """Steps to the training-loss ``target`` of every committed ladder run of ``optimizer``, by batch."""
    out: dict[int, list[int | None]] = {}
    for b, cell in results["table"][optimizer].items():
        runs = [f"{optimizer}-b{b}-lr{cell['lr']:g}-s{seed}" for seed in cell["seeds"]]
        out[int(b)] = [steps_to_train_loss(results_root / results["suite"] / "runs" / r, target) for r in runs]
    return out


def median_reached(steps: list[int | None]) -> float | None:
    reached = [s for s in steps if s is not None]
    return statistics.median(reached) if reached else None


def compare(run: Path, results_root: Path, train_targets: dict[str, float]) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    suite = SUITES[cfg["task"]]
    results = json.loads((results_root / suite / "results.json").read_text())
    measured = results["steps_to_target"][cfg["optimizer"]]
    batches = sorted(int(b) for b in measured)
    b0 = batches[0]
    s0 = measured[str(b0)]["median_steps"]
    windows = window_estimates(run)
    noise, steps, spread = noise_near(windows, s0)
    values = [v for v in spread if v and v > 0]
    lo, hi = (min(values), max(values)) if values else (None, None)
    rows = []
    for b in batches:
        m = measured[str(b)]
        predict = lambda n: steps_model(b, s0 / (1 + n / b0), n) if n else None  # noqa: E731
        rows.append({"batch": b, "measured_steps": m["median_steps"], "reached": f"{m['reached']}/{m['n']}",
                     "measured_efficiency": m.get("efficiency"), "efficiency_bound": m.get("efficiency_bound"),
                     "upper_bound": m.get("upper_bound"), "predicted_steps": predict(noise),
                     "predicted_steps_range": [predict(hi), predict(lo)] if values else None,
                     "predicted_efficiency": (b0 + noise) / (b + noise) if noise else None})
    longest = max((w["window_steps"] for w in windows), default=0)  # (a window cut short by an evaluation is
    over_training = [(w["step"], w["window_b_simple"]) for w in windows if w["window_steps"] >= longest / 2]  # noisy)
    loss_target = train_targets[suite]
    by_loss = train_loss_steps(results, results_root, cfg["optimizer"], loss_target)
    loss_rows = []
    s0_loss = median_reached(by_loss[b0])
    noise_loss, _, _ = noise_near(windows, s0_loss) if s0_loss else (None, 0, [])
    for b in batches:
        med = median_reached(by_loss[b])
        predicted = steps_model(b, s0_loss / (1 + noise_loss / b0), noise_loss) if noise_loss and s0_loss else None
        loss_rows.append({"batch": b, "steps": by_loss[b], "median_steps": med, "predicted_steps": predicted,
                          "measured_efficiency": s0_loss * b0 / b / med if med and s0_loss else None,
                          "predicted_efficiency": (b0 + noise_loss) / (b + noise_loss) if noise_loss else None})
    return {"suite": suite, "optimizer": cfg["optimizer"], "lr": cfg["lr"], "b0": b0, "target": results["target"],
            "s0": s0, "s0_upper_bound": measured[str(b0)].get("upper_bound"), "b_noise": noise,
            "b_noise_steps": steps, "b_noise_window_range": [lo, hi], "rows": rows, "over_training": over_training, "run": run.name,
            "train_loss_target": loss_target, "b_noise_at_train_loss_target": noise_loss, "train_loss_rows": loss_rows}


def markdown(check: dict) -> str:
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    lines = ["| batch | measured steps (reached) | measured efficiency | predicted steps (window range) | "
             "predicted efficiency |", "|---:|---:|---:|---:|---:|"]
    for r in check["rows"]:
        bound = "≤ " if r["upper_bound"] else ""
        eff = r["measured_efficiency"]
        rng = "–".join(fmt(v, ".0f") for v in r["predicted_steps_range"]) if r["predicted_steps_range"] else "—"
        eff_s = "—" if eff is None else f"{'' if r['efficiency_bound'] in (None, '=') else r['efficiency_bound'] + ' '}{eff:.2f}"
        lines.append(f"| {r['batch']} | {bound}{fmt(r['measured_steps'], '.0f')} ({r['reached']}) | {eff_s} | "
                     f"{fmt(r['predicted_steps'], '.0f')} ({rng}) | {fmt(r['predicted_efficiency'], '.2f')} |")
    return "\n".join(lines)


def markdown_train_loss(check: dict) -> str:
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    lines = ["| batch | steps per seed | median | measured efficiency | predicted steps | predicted efficiency |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in check["train_loss_rows"]:
        per_seed = ", ".join("—" if v is None else str(v) for v in r["steps"])
        lines.append(f"| {r['batch']} | {per_seed} | {fmt(r['median_steps'], '.0f')} | "
                     f"{fmt(r['measured_efficiency'], '.2f')} | {fmt(r['predicted_steps'], '.0f')} | "
                     f"{fmt(r['predicted_efficiency'], '.2f')} |")
    return "\n".join(lines)


def plot(checks: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = sorted({c["suite"] for c in checks})
    fig, axes = plt.subplots(2, len(suites), figsize=(6 * len(suites), 8), squeeze=False)
    for col, suite in enumerate(suites):
        ax_s, ax_n = axes[0, col], axes[1, col]
        for c in (c for c in checks if c["suite"] == suite):
            pts = [(r["batch"], r["measured_steps"]) for r in c["rows"] if r["measured_steps"] and not r["upper_bound"]]
            bounds = [(r["batch"], r["measured_steps"]) for r in c["rows"] if r["measured_steps"] and r["upper_bound"]]
            (line,) = ax_s.plot(*zip(*pts), "o", ms=6, label=f"{c['optimizer']} measured (open: an upper bound)")
            if bounds:
                ax_s.plot(*zip(*bounds), "o", ms=6, mfc="none", color=line.get_color())
            if c["b_noise"]:
                bs = [c["b0"] * 2 ** (k / 4) for k in range(4 * 6 + 1)]
                s_min = c["s0"] / (1 + c["b_noise"] / c["b0"])
                ax_s.plot(bs, [steps_model(b, s_min, c["b_noise"]) for b in bs], "-", color=line.get_color(),
                          label=f"{c['optimizer']} model, B_noise = {c['b_noise']:.0f}")
            steps, values = zip(*[(s, v) for s, v in c["over_training"] if v and v > 0]) or ((), ())
            ax_n.plot(steps, values, "-", color=line.get_color(), label=f"{c['optimizer']} (b={c['b0']})")
            ax_n.axvline(c["s0"], color=line.get_color(), ls=":", lw=1)
            ax_n.axhline(c["b0"], color="grey", ls="--", lw=1)
        ax_s.set(xscale="log", yscale="log", xlabel="batch", ylabel="steps to the validation target",
                 title=f"{suite}: measured (points) vs S = S_min (1 + B_noise/B)")
        ax_n.set(yscale="log", xlabel="step (dotted: target met at the smallest batch; dashed: that batch)",
                 ylabel="B_simple (window means)",
                 title=f"{suite}: B_simple over training at the smallest batch")
        for ax in (ax_s, ax_n):
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "prediction.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True)
    p.add_argument("--results", type=Path, default=Path("docs/results"))
    p.add_argument("--out", type=Path, default=Path("docs/results/noise-scale"))
    p.add_argument("--train-loss-target", nargs=2, action="append", metavar=("SUITE", "LOSS"),
                   default=[["mlm-scaling", "5.95"], ["image-scaling", "0.5"]],
                   help="training-loss target per suite, reached by every ladder run (defaults: 5.95, 0.5)")
    args = p.parse_args(argv)
    targets = {suite: float(loss) for suite, loss in args.train_loss_target}
    checks = [compare(run, args.results, targets) for run in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check.json").write_text(json.dumps(checks, indent=1))
    plot(checks, args.out)
    for c in checks:
        print(f"\n### {c['suite']} / {c['optimizer']}: B_simple = {c['b_noise']} near step {c['s0']}\n")
        print(markdown(c))
        print(f"\nsteps to a smoothed training loss <= {c['train_loss_target']} (B_simple there: "
              f"{c['b_noise_at_train_loss_target']}):\n")
        print(markdown_train_loss(c))


if __name__ == "__main__":
    main()
