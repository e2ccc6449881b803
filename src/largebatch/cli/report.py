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
    p.add_argument("--compact", type=int, metavar="N", default=None,
                   help="first thin every finished run's metrics.jsonl to at most N records (all evaluations "
                        "kept), to commit a study; irreversible")


def run(args: argparse.Namespace) -> int:
    from largebatch.study.report import build_report

    try:
        suite = None
        if getattr(args, "suite", None):
            from largebatch.study.suites import get_suite
            suite = get_suite(args.suite)
        if getattr(args, "compact", None):
            from largebatch.study.archive import compact_study

            if args.compact < 10:
                raise ValueError(f"Invalid --compact: {args.compact} (allowed: >= 10 records)")
            for name, kept, total in compact_study(args.study_dir, args.compact):
                print(f"compacted {name}: kept {kept} of {total} records", file=sys.stderr)
        path = build_report(args.study_dir, suite)
    except (FileNotFoundError, ValueError) as exc:
        print(f"largebatch report: error: {exc}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0
