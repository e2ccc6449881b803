"""``largebatch report DIR``: rebuild a study's report.md, results.json and plots from its run files.

Works on a study that is still running (a partial report). Exit status 2 with a one-line reason when the
directory holds no finished runs or its suite cannot be told.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", type=Path, help="directory written by `largebatch study`")
    p.add_argument("--suite", help="the suite's name, when the directory has no study.json yet and is not named "
                                   "after its suite")


def run(args: argparse.Namespace) -> int:
    from largebatch.study.report import build_report

    try:
        suite = None
        if getattr(args, "suite", None):
            from largebatch.study.suites import get_suite
            suite = get_suite(args.suite)
        path = build_report(args.study_dir, suite)
    except (FileNotFoundError, ValueError) as exc:
        print(f"largebatch report: error: {exc}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0
