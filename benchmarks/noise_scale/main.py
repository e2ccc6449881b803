"""Overhead of the gradient noise scale: training steps with and without ``NoiseScaleTracker``, in one run.

The two kinds of step alternate in a shuffled order on the same model and optimizer (LAMB), so a change
in the machine's load affects both alike; batch construction is outside the timed region, the forward,
backward, tracker update and optimizer step inside it. Prints medians and their ratio, writes JSON.

    python benchmarks/noise_scale/main.py --task mlm --batch 256 --micro 64 --steps 40 --out result.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time

import torch

from largebatch.optim import create_optimizer
from largebatch.tasks import build_task
from largebatch.train.noise_scale import NoiseScaleTracker

TASK_OPTIONS = {  # the suites' models (mlm-scaling, image-scaling) and the default `largebatch train` MLM
    "mlm": dict(vocab_size=4096, seq_len=32, hidden=64, layers=2, heads=2, intermediate=256, dropout=0.0),
    "mlm-default": dict(dropout=0.0),
    "image": dict(width=8, blocks=1),
}


def timed_step(task, model, optimizer, micro_batches, sizes, tracker) -> float:
    total = sum(task.count(b) for b in micro_batches)
    start = time.perf_counter()
    for batch, size in zip(micro_batches, sizes):
        if tracker is not None:
            tracker.micro_batch(samples=size, grad_scale=task.count(batch) / total)
        summed, _ = task.loss(model, batch)
        (summed / total).backward()
    if tracker is not None:
        tracker.update(sum(sizes))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def tracker_cost_s(tracker: NoiseScaleTracker, micro_batches: int, repeats: int = 50) -> float:
    """The tracker's own work for one step, timed alone (best of 5): per micro-batch the hooks' norms of
    every tensor's gradient (the current ``.grad`` standing in for the backward's), then ``update``. On a
    loaded machine this bounds the added work far more tightly than the difference of two step times."""
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            for _ in range(micro_batches):
                tracker.micro_batch(samples=1, grad_scale=1.0)
                for j, p in enumerate(tracker.params):
                    tracker._record(j, p.grad)  # what the gradient hook runs
            tracker.update(micro_batches)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASK_OPTIONS), default="mlm")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--micro", type=int, default=64)
    p.add_argument("--steps", type=int, default=40, help="timed steps of each kind")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = build_task(args.task.split("-")[0], seed=0, **TASK_OPTIONS[args.task])
    model = task.model
    model.train()
    optimizer = create_optimizer("lamb", model, lr=1e-3)
    tracker = NoiseScaleTracker(model)
    gen = torch.Generator().manual_seed(0)
    kinds = ["with", "without"] * (args.steps + 2)
    random.Random(0).shuffle(kinds)
    times: dict[str, list[float]] = {"with": [], "without": []}
    summary_s = []
    load_before = os.getloadavg()
    seen = {"with": 0, "without": 0}
    for i, kind in enumerate(kinds):
        indices = torch.randperm(task.train_size, generator=gen)[:args.batch]
        parts = list(torch.split(indices, args.micro))
        micro = [task.batch(idx, torch.Generator().manual_seed(i * 1000 + j)) for j, idx in enumerate(parts)]
        t = timed_step(task, model, optimizer, micro, [len(x) for x in parts], tracker if kind == "with" else None)
        seen[kind] += 1
        if seen[kind] > 2:  # the first steps of each kind warm up allocators and caches
            times[kind].append(t)
        if kind == "with" and seen[kind] > 2:
            start = time.perf_counter()
            tracker.summary()
            summary_s.append(time.perf_counter() - start)
    for p in model.parameters():  # gradients to stand in for a backward's in tracker_cost_s
        p.grad = torch.randn_like(p)
    own = tracker_cost_s(tracker, len(parts))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"task": args.task, "batch": args.batch, "micro": args.micro, "threads": args.threads,
              "tensors": len(tracker.params), "steps_each": {k: len(v) for k, v in times.items()},
              "median_step_s": med, "ratio_with_over_without": med["with"] / med["without"],
              "min_step_s": {k: min(v) for k, v in times.items()},
              "tracker_work_s": own, "tracker_work_over_median_step": own / med["without"],
              "median_summary_s": statistics.median(summary_s), "summary": tracker.summary(),
              "loadavg_before_after": [load_before, os.getloadavg()], "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
