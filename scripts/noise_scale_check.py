"""The noise-scale prediction against the study's measured steps-to-target (docs/results/noise-scale/).

A thin wrapper over largebatch.study.noise_check (the pure functions, also behind the study reports' noise-scale
section, docs/study.md): for each (suite, optimizer) with a noise-scale run at the suite's smallest batch b0,
B_simple near the point where the committed b0 runs first met the validation target, the paper's model
S(B) = S_min·(1 + B_noise/B) with S_min fixed by the measured S(b0), and its prediction at every larger batch
beside the committed medians. Writes check.json and prediction.png into the output folder; prints markdown
tables.

    python scripts/noise_scale_check.py --runs DIR... --out docs/results/noise-scale
Each run directory holds a config.json naming the task and optimizer, and metrics.jsonl records with the
``window_*`` statistics of ``largebatch train --noise-scale`` (docs/noise-scale.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from largebatch.study import noise_check as nc
from largebatch.study.markdown import md_noise_rows, md_noise_train_loss_rows
from largebatch.study.report_plots import noise_prediction

SUITES = {"mlm": "mlm-scaling", "image": "image-scaling"}
ORDER = ("suite", "optimizer", "lr", "b0", "target", "s0", "s0_upper_bound", "b_noise", "b_noise_steps",
         "b_noise_window_range", "rows", "over_training", "run", "train_loss_target",
         "b_noise_at_train_loss_target", "train_loss_rows")


def train_loss_steps(results: dict, results_root: Path, optimizer: str, target: float) -> dict[int, list[int | None]]:
    """Steps to the training-loss ``target`` of every committed ladder run of ``optimizer``, by batch."""
    runs = results_root / results["suite"] / "runs"
    return nc.loss_steps({int(b): [runs / f"{optimizer}-b{b}-lr{cell['lr']:g}-s{seed}" for seed in cell["seeds"]]
                          for b, cell in results["table"][optimizer].items()}, target)


def compare(run: Path, results_root: Path, train_targets: dict[str, float], where: dict[str, str]) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    suite = SUITES[cfg["task"]]
    results = json.loads((results_root / where.get(suite, suite) / "results.json").read_text())
    measured = {int(b): cell for b, cell in results["steps_to_target"][cfg["optimizer"]].items()}
    by_loss = train_loss_steps(results, results_root, cfg["optimizer"], train_targets[suite])
    check = nc.compare(cfg["optimizer"], cfg["lr"], measured, nc.window_estimates(nc.read_records(run)), by_loss,
                       train_targets[suite])
    check.update(suite=suite, target=results["target"], run=run.name)
    return {k: check[k] for k in ORDER}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True)
    p.add_argument("--results", type=Path, default=Path("docs/results"))
    p.add_argument("--out", type=Path, default=Path("docs/results/noise-scale"))
    p.add_argument("--train-loss-target", nargs=2, action="append", metavar=("SUITE", "LOSS"),
                   default=[["mlm-scaling", "5.95"], ["image-scaling", "0.5"]],
                   help="training-loss target per suite, reached by every ladder run (defaults: 5.95, 0.5)")
    p.add_argument("--results-of", nargs=2, action="append", metavar=("SUITE", "DIR"), default=[],
                   help="the study directory under --results holding SUITE's results (default: SUITE). The check "
                        "of 2026-12-01 read image-scaling's results of that time, now committed as "
                        "image-scaling-no-exclusions")
    args = p.parse_args(argv)
    targets = {suite: float(loss) for suite, loss in args.train_loss_target}
    where = dict(args.results_of)
    checks = [compare(run, args.results, targets, where) for run in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "check.json").write_text(json.dumps(checks, indent=1))
    noise_prediction(args.out, [nc.plot_series(c, c["suite"], by_loss=False) for c in checks], "prediction.png",
                     "steps to the validation target")
    for c in checks:
        print(f"\n### {c['suite']} / {c['optimizer']}: B_simple = {c['b_noise']} near step {c['s0']}\n")
        print("\n".join(md_noise_rows(c)))
        print(f"\nsteps to a smoothed training loss <= {c['train_loss_target']} (B_simple there: "
              f"{c['b_noise_at_train_loss_target']}):\n")
        print("\n".join(md_noise_train_loss_rows(c)))


if __name__ == "__main__":
    main()
