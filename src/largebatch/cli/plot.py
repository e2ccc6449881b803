"""``largebatch plot RUN...``: loss / accuracy / LR / trust-ratio curves of training runs to a PNG."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", type=Path, help="run directories written by `largebatch train`")
    p.add_argument("-o", "--output", type=Path, default=Path("curves.png"), help="PNG file (default curves.png)")
    p.add_argument("--title")


def run(args: argparse.Namespace) -> int:
    from largebatch.plots import plot_runs

    try:
        out = plot_runs(args.runs, args.output, title=args.title)
    except FileNotFoundError as exc:
        print(f"largebatch plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
