"""``largebatch plot RUN...``: loss / accuracy / LR / trust-ratio curves of training runs to a PNG, and
B_simple beside the batch size to ``<output>_noise_scale.png`` for runs trained with ``--noise-scale``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, help="run directories written by `largebatch train`")
    p.add_argument("-o", "--output", type=Path, default=Path("curves.png"), help="PNG file (default curves.png)")
    p.add_argument("--title")


def run(args: argparse.Namespace) -> int:
    from largebatch.plots import plot_noise_scale, plot_runs, read_metrics

    try:
        out = plot_runs(args.runs, args.output, title=args.title)
        measured = any(r.get("b_simple") is not None for run in args.runs for r in read_metrics(run))
    except FileNotFoundError as exc:
        print(f"largebatch plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if measured:
        noise = plot_noise_scale(args.runs, out.with_name(f"{out.stem}_noise_scale{out.suffix}"), title=args.title)
        print(f"wrote {noise}")
    return 0
