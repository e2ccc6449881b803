"""``largebatch study SUITE``: run a batch-scaling suite (resumable) and write its report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from largebatch.study.suites import SUITES

    p.add_argument("suite", choices=list(SUITES), help="; ".join(f"{n}: {s.description}" for n, s in SUITES.items()))
    p.add_argument("--out", type=Path, help="study directory (default studies/<suite>); rerun to resume")
    p.add_argument("--threads", type=int)
    p.add_argument("--verbose", action="store_true", help="show each run's own output and progress bar")
    p.add_argument("--baselines-only", action="store_true",
                   help="finetune: only the baselines (a randomly initialised encoder fine-tuned with the same "
                        "recipe, TF-IDF + logistic regression); needs no pre-trained checkpoints")


def run(args: argparse.Namespace) -> int:
    from largebatch.study.report import build_report
    from largebatch.study.runner import FinetuneRunner, SuiteRunner
    from largebatch.study.suites import SUITES, get_suite
    from largebatch.tasks import DataMissingError
    from largebatch.train.allocator import keep_freed_memory

    suite = get_suite(args.suite)
    out = args.out or Path("studies") / suite.name
    runner_cls = FinetuneRunner if suite.source else SuiteRunner
    if args.baselines_only and not suite.source:
        print(f"largebatch study: error: Invalid --baselines-only for suite {suite.name!r} (allowed: a fine-tuning "
              f"suite: {' | '.join(n for n, s in SUITES.items() if s.source)})", file=sys.stderr)
        return 2
    keep_freed_memory()
    try:
        extra = {"baselines_only": True} if args.baselines_only else {}
        runner_cls(suite, out, threads=args.threads, verbose=args.verbose, **extra).run()
    except (DataMissingError, FileNotFoundError) as exc:
        print(f"largebatch study: error: {exc}", file=sys.stderr)
        return 2
    report = build_report(out, suite)
    print(report.read_text())
    print(f"report: {report}")
    return 0
