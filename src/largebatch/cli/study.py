"""``largebatch study SUITE``: run a batch-scaling suite (resumable) and write its report."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from largebatch.study.suites import SUITES

    p.add_argument("suite", choices=list(SUITES), help="; ".join(f"{n}: {s.description}" for n, s in SUITES.items()))
    p.add_argument("--out", type=Path, help="study directory (default studies/<suite>); rerun to resume")
    p.add_argument("--threads", type=int,
                   help="threads per run (default: all cores, shared out between the --jobs runs)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process (default 1); the runs of a stage that do not "
                        "depend on each other (a grid, the ladder, the seeds) share the cores; results as with 1")
    p.add_argument("--verbose", action="store_true", help="show each run's own output and progress bar")
    for flag, nargs, what in (("--data", "+", "training text (files, folders, globs) instead of the suite's corpus"),
                              ("--eval-data", "+", "held-out text for validation and test"),
                              ("--model-config", None, "a transformers config JSON instead of the suite's model")):
        p.add_argument(flag, nargs=nargs, help=f"mlm suites: {what}; a task option of every run, named in the report "
                                               "(docs/own-data.md)")
    p.add_argument("--baselines-only", action="store_true",
                   help="only the baselines, then the report: fine-tuning suites: a randomly initialised encoder "
                        "fine-tuned with the same recipe, TF-IDF + logistic regression (needs no pre-trained "
                        "checkpoints); mlm suites: the bigram baseline (baselines.json; no run is trained)")


def run(args: argparse.Namespace) -> int:
    from largebatch.study.report import build_report
    from largebatch.study.runner import FinetuneRunner, StudyBusyError, SuiteRunner
    from largebatch.study.suites import SUITES, get_suite
    from largebatch.tasks import DataMissingError
    from largebatch.train.allocator import keep_freed_memory

    suite = get_suite(args.suite)
    given = {k: v for k in ("data", "eval_data", "model_config") if (v := getattr(args, k, None))}
    # the user's corpus replaces the default one: not for a suite defined by its corpus (mlm-news)
    own = [n for n, s in SUITES.items() if s.task == "mlm" and "corpus" not in s.task_options]
    if given and suite.name not in own:
        print(f"largebatch study: error: Invalid --{next(iter(given)).replace('_', '-')} for suite {suite.name!r} "
              f"(allowed: a suite of the mlm task: {' | '.join(own)})", file=sys.stderr)
        return 2
    if given:  # the user's corpus / model: a task option of every run (config.json records it)
        suite = dataclasses.replace(suite, task_options={**suite.task_options, **given})
    out = args.out or Path("studies") / suite.name
    runner_cls = FinetuneRunner if suite.source else SuiteRunner
    if args.baselines_only and not (suite.source or suite.task == "mlm"):
        print(f"largebatch study: error: Invalid --baselines-only for suite {suite.name!r} (allowed: a fine-tuning "
              f"or mlm suite: {' | '.join(n for n, s in SUITES.items() if s.source or s.task == 'mlm')})",
              file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"largebatch study: error: Invalid --jobs: {args.jobs} (allowed: an integer >= 1)", file=sys.stderr)
        return 2
    keep_freed_memory()
    try:
        extra = {"baselines_only": True} if args.baselines_only else {}
        runner_cls(suite, out, threads=args.threads, verbose=args.verbose, jobs=args.jobs, **extra).run()
    except (DataMissingError, FileNotFoundError, StudyBusyError) as exc:
        print(f"largebatch study: error: {exc}", file=sys.stderr)
        return 2
    try:
        report = build_report(out, suite)
    except FileNotFoundError:
        if not args.baselines_only:
            raise
        print(f"baselines written under {out}; no finished run yet, so no report")
        return 0
    print(report.read_text())
    print(f"report: {report}")
    return 0
