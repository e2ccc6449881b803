"""``largebatch report DIR``: rebuild a study's report.md, results.json and plots from its run files."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", type=Path, help="directory written by `largebatch study`")


def run(args: argparse.Namespace) -> int:
    from largebatch.study.report import build_report

    try:
        path = build_report(args.study_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"largebatch report: error: {exc}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0
