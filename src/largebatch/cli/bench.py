"""``largebatch bench``: one optimizer step, ours vs torch's fused AdamW and the peer libraries, one run."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default="bert-base,resnet50,many-small",
                   help="comma-separated sets: bert-base, resnet50, many-small, tiny")
    p.add_argument("--steps", type=int, default=15, help="timed steps per optimizer (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--optimizers", help="comma-separated subset of names (default: all; see the table)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="writes results.json/.md and step_time.png")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the profile (our kernel's passes timed one at a time, and its arithmetic cost)")


def run(args: argparse.Namespace) -> int:
    import datetime
    import os
    import platform

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
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    summary = {"environment": {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
        "bandwidth_gbs": bandwidth, "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
        "steps": args.steps, "warmup": args.warmup,
        "command": "largebatch bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
    }, "sets": summaries, "profile": {"sets": profiles, "compute": compute}}
    paths = report.write(summary, args.out)
    print(report.markdown(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
