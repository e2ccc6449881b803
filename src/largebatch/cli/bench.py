"""``largebatch bench``: one optimizer step, ours vs torch's fused AdamW and the peer libraries, one run;
``largebatch bench --e2e``: whole training steps of BERT-base and ResNet-50 with fused AdamW, Lamb and Lars;
``largebatch bench --toolkit``: ``largebatch train`` beside a minimal loop and HF ``Trainer`` on the main job's work."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="bert-base,resnet50,many-small",
                   help="comma-separated sets: bert-base, resnet50, many-small, tiny")
    p.add_argument("--steps", type=int,
                   help="timed steps per optimizer (median reported; default 15, with --e2e 5, with --toolkit 50)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2, with --e2e 1, with --toolkit 5)")
    p.add_argument("--optimizers", help="comma-separated subset of names (default: all; see the table)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="writes results.json/.md and step_time.png")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the profile (our kernel's passes timed one at a time, and its arithmetic cost)")
    e2e = p.add_argument_group("end-to-end training steps (--e2e; benchmarks/e2e/README.md)")
    e2e.add_argument("--e2e", action="store_true",
                     help="time whole training steps (forward, backward, step, zero_grad) instead of the step alone")
    e2e.add_argument("--models", default="bert-base,resnet50", help="comma-separated: bert-base, resnet50")
    e2e.add_argument("--precisions", default="fp32,bf16-autocast", help="comma-separated: fp32, bf16-autocast")
    e2e.add_argument("--batch", default="bert-base=8,resnet50=16",
                     help="batch size per model, e.g. bert-base=8,resnet50=16 (BERT: 128-token sequences; "
                          "ResNet-50: 224×224 images)")
    kit = p.add_argument_group("the training loop against others (--toolkit; benchmarks/e2e/README.md)")
    kit.add_argument("--toolkit", action="store_true",
                     help="time `largebatch train` (logging at its defaults and off), a minimal hand-written loop and "
                          "HF Trainer on the same work, interleaved step by step")
    kit.add_argument("--train-args", default="", metavar="ARGS",
                     help="the work: `largebatch train` options in one string (default: none, the main job), "
                          "e.g. \"--micro-batch-size 256 --precision bf16-autocast\"")


def fail(message: str) -> int:
    print(f"largebatch bench: error: {message}", file=sys.stderr)
    return 2


def environment(args: argparse.Namespace, load_before: float) -> dict:
    """Date, versions, threads, CPU, load and the command line of a run."""
    import datetime
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
            "steps": args.steps, "warmup": args.warmup,
            "command": command_line(args)}


def command_line(args: argparse.Namespace) -> str:
    """The equivalent ``largebatch bench ...`` command (benchmarks/*/main.py add ``--e2e`` themselves)."""
    argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    for flag in ("--e2e", "--toolkit"):
        if getattr(args, flag[2:]) and flag not in argv:
            argv = [flag, *argv]
    return "largebatch bench " + " ".join(shlex.quote(a) for a in argv)


def run(args: argparse.Namespace) -> int:
    if args.e2e and args.toolkit:
        return fail("--e2e and --toolkit (allowed: one of them)")
    if args.e2e:
        return run_e2e(args)
    if args.toolkit:
        return run_toolkit(args)
    args.steps = 15 if args.steps is None else args.steps
    args.warmup = 2 if args.warmup is None else args.warmup
    import os

    import torch
    from tqdm.auto import tqdm

    from largebatch.bench import peers, profile, report, runner
    from largebatch.bench.shapes import SETS

    sets = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in sets if s not in SETS]
    if unknown or args.steps < 1 or args.warmup < 0:
        print(f"largebatch bench: error: unknown shape sets {unknown} (allowed: {', '.join(SETS)}) or bad "
              "--steps/--warmup", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    runner.pin_mmap_threshold()
    factories = peers.optimizer_factories()
    yardstick = next(iter(factories))
    if args.optimizers:
        wanted = [n.strip() for n in args.optimizers.split(",")]
        missing = [n for n in wanted if n not in factories]
        if missing:
            print(f"largebatch bench: error: unknown optimizers {missing} (allowed: {', '.join(factories)})",
                  file=sys.stderr)
            return 2
        factories = {n: f for n, f in factories.items() if n in wanted or n == yardstick}
    for name, (_, reason) in factories.items():
        if reason:
            print(f"note: {name}: {reason}", file=sys.stderr)
    load_before = os.getloadavg()[0]
    bandwidth = runner.bandwidth_gbs()
    live = sum(1 for f, _ in factories.values() if f is not None)
    bar = tqdm(total=len(sets) * live * args.steps, desc="bench", unit="step")
    summaries = []
    for name in sets:
        shapes = SETS[name]()
        bar.set_postfix(set=name)
        results = runner.bench_set(shapes, factories, steps=args.steps, warmup=args.warmup,
                                   memory=not args.no_memory, progress=lambda: bar.update(1))
        summaries.append(runner.summarise(name, shapes, results, bandwidth))
    bar.close()
    profiles, compute = {}, {}
    if not args.no_profile:
        for name in tqdm(sets, desc="profile", unit="set"):
            profiles[name] = profile.profile_set(SETS[name](), repeats=args.steps)
        compute = profile.compute_cost()
    summary = {"environment": {**environment(args, load_before), "bandwidth_gbs": bandwidth},
               "sets": summaries, "profile": {"sets": profiles, "compute": compute}}
    paths = report.write(summary, args.out)
    print(report.markdown(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def parse_batches(text: str, allowed) -> dict[str, int]:
    """``"bert-base=8,resnet50=16"`` → {name: size}; ValueError naming --batch and what is allowed."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, size = item.partition("=")
        if name not in allowed or not size.isdigit() or int(size) < 1:
            raise ValueError(f"--batch: {item!r} (allowed: NAME=SIZE with NAME in {', '.join(allowed)}, SIZE >= 1)")
        out[name] = int(size)
    return out


def run_e2e(args: argparse.Namespace) -> int:
    import os

    import torch
    import transformers
    from tqdm.auto import tqdm

    from largebatch.bench import e2e, e2e_report
    from largebatch.bench.models import DEFAULT_BATCH, WORKLOADS

    args.steps = 5 if args.steps is None else args.steps
    args.warmup = 1 if args.warmup is None else args.warmup
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    chosen = e2e.variants()
    wanted = [n.strip() for n in args.optimizers.split(",")] if args.optimizers else list(chosen)
    try:
        batches = {**DEFAULT_BATCH, **parse_batches(args.batch, WORKLOADS)}
    except ValueError as exc:
        return fail(str(exc))
    checks = [("--models", [m for m in models if m not in WORKLOADS], WORKLOADS),
              ("--precisions", [p for p in precisions if p not in e2e.PRECISIONS], e2e.PRECISIONS),
              ("--optimizers", [n for n in wanted if n not in chosen], chosen)]
    for option, bad, allowed in checks:
        if bad:
            return fail(f"{option}: unknown {bad} (allowed: {', '.join(allowed)})")
    if args.steps < 1 or args.warmup < 0:
        return fail(f"--steps {args.steps} / --warmup {args.warmup} (allowed: steps >= 1, warmup >= 0)")
    yardstick = next(iter(chosen))
    chosen = {n: v for n, v in chosen.items() if n in wanted or n == yardstick}
    if args.threads:
        torch.set_num_threads(args.threads)
    from largebatch.train.allocator import keep_freed_memory

    keep_freed_memory()  # as `largebatch train` runs: freed activations stay in the process
    load_before = os.getloadavg()[0]
    bar = tqdm(total=len(models) * len(precisions) * len(chosen) * args.steps, desc="e2e", unit="step")
    sets: list[dict] = []
    summary = {"environment": {}, "sets": sets}
    for model in models:
        workload = WORKLOADS[model](batches[model])
        for precision in precisions:
            bar.set_postfix(model=model, precision=precision)
            results = e2e.time_variants(workload, precision, chosen, steps=args.steps, warmup=args.warmup,
                                        progress=lambda: bar.update(1))
            for name, r in results.items():
                if not args.no_memory:
                    r.memory = e2e.memory_in_subprocess(model, batches[model], precision, name, warmup=args.warmup,
                                                        threads=torch.get_num_threads())
            sets.append(e2e.summarise(workload, precision, results))
            # written after every set: a long run on a busy machine leaves its finished sets behind
            summary["environment"] = {**environment(args, load_before), "transformers": transformers.__version__}
            paths = e2e_report.write(summary, args.out)
        del workload
    bar.close()
    print(e2e_report.markdown(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def train_config(train_args: str, threads: int | None):
    """The work of ``--toolkit``: the config ``largebatch train ARGS`` would run (ValueError naming the option)."""
    from largebatch.cli import train as train_cli

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # one line, no exit: the caller reports it
            raise ValueError(f"--train-args: {message} (allowed: options of `largebatch train`)")

    parser = Parser(prog="largebatch bench --train-args", add_help=False)
    train_cli.add_arguments(parser)
    try:
        words = shlex.split(train_args)
    except ValueError as exc:
        raise ValueError(f"--train-args: {exc}: {train_args!r}") from None
    args = parser.parse_args(words)
    if args.resume is not None:
        raise ValueError("--train-args: --resume (allowed: options of a fresh run)")
    cfg = train_cli.build_config(args)
    return cfg if threads is None else dataclasses.replace(cfg, threads=threads)


def run_toolkit(args: argparse.Namespace) -> int:
    import os

    import torch
    import transformers

    from largebatch.bench import toolkit, toolkit_report
    from largebatch.train.allocator import keep_freed_memory

    args.steps = 50 if args.steps is None else args.steps  # steps 6-55: the main job's evaluation at 50
    args.warmup = 5 if args.warmup is None else args.warmup
    if args.steps < 1 or args.warmup < 0:
        return fail(f"--steps {args.steps} / --warmup {args.warmup} (allowed: steps >= 1, warmup >= 0)")
    try:
        cfg = train_config(args.train_args, args.threads)
    except (ValueError, TypeError) as exc:
        return fail(str(exc))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # as `largebatch train` runs
    load_before = os.getloadavg()[0]
    try:
        result = toolkit.compare(cfg, steps=args.steps, warmup=args.warmup)
    except ValueError as exc:
        return fail(str(exc))
    config = {k: getattr(cfg, k) for k in toolkit.WORK_FIELDS}
    summary = {"environment": {**environment(args, load_before), "transformers": transformers.__version__,
                               "load_averages_after": [round(x, 2) for x in os.getloadavg()]},
               "work": config, **result}
    paths = toolkit_report.write(summary, args.out)
    print(toolkit_report.markdown(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
