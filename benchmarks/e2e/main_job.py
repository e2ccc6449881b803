"""Where the default `largebatch train` (BERT MLM on Shakespeare) spends its time, and what moves it.

    python benchmarks/e2e/main_job.py --rounds 4 --out benchmarks/e2e/results/main-job.json

1. Setup, timed once in this process: importing transformers, building the task (plays, WordPiece
   tokenizer: trained when not cached, so a fresh machine pays it; the cache is skipped here with a
   temporary LARGEBATCH_CACHE unless --warm-cache), encoding, the model.
2. One optimizer step of the default recipe (batch 256) in each configuration below, and one evaluation
   of the validation split, timed round-robin in a shuffled order (every configuration has its own copy
   of the model and its own Lamb), so the machine's noise is shared; medians and ratios to the default.

Configurations: micro-batch 128 × 2 (the default) or 256 × 1; fp32 or bf16-autocast; torch threads.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def timed(label: str, out: dict, fn):
    t0 = time.perf_counter()
    value = fn()
    out[label] = time.perf_counter() - t0
    return value


def one_step(task, model, opt, step: int, micro: int, precision: str) -> float:
    from largebatch.train.accumulation import accumulate_gradients, split_indices
    from largebatch.train.loop import sample_indices, step_generator

    t0 = time.perf_counter()
    idx = sample_indices(step, 256, task.train_size, 0)
    batches = [task.batch(i, step_generator(0, step, k)) for k, i in enumerate(split_indices(idx, micro))]
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-autocast" else None
    accumulate_gradients(model, batches, task.loss, count_fn=task.count, autocast=amp)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--warm-cache", action="store_true", help="use the tokenizer cache (a machine that ran before)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from largebatch.train.allocator import keep_freed_memory

    keep_freed_memory()  # as `largebatch train` does
    setup: dict[str, float] = {}
    if not args.warm_cache:
        os.environ["LARGEBATCH_CACHE"] = tempfile.mkdtemp(prefix="lb-cache-")
    timed("import transformers", setup, lambda: __import__("transformers"))
    from largebatch import create_optimizer
    from largebatch.tasks import build_task

    task = timed("build task (plays, tokenizer, encoding, model)", setup, lambda: build_task("mlm", dropout=0.0))
    configs = {f"micro {m}, {prec}": (m, prec) for prec in ("fp32", "bf16-autocast") for m in (128, 256)}
    runs = {}
    for name, (micro, prec) in configs.items():
        model = copy.deepcopy(task.model)
        runs[name] = (model, create_optimizer("lamb", model, lr=0.015), micro, prec)
        one_step(task, *runs[name][:2], 0, micro, prec)
    times: dict[str, list[float]] = {n: [] for n in runs}
    times["evaluate (validation)"] = []
    order, rng = list(times), random.Random(0)
    for r in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            if name.startswith("evaluate"):
                t0 = time.perf_counter()
                task.evaluate(runs["micro 128, fp32"][0], "validation")
                times[name].append(time.perf_counter() - t0)
            else:
                model, opt, micro, prec = runs[name]
                times[name].append(one_step(task, model, opt, r + 1, micro, prec))
    base = statistics.median(times["micro 128, fp32"])
    result = {"load_before_after": os.getloadavg(), "threads": torch.get_num_threads(), "setup_s": setup,
              "median_s": {n: statistics.median(t) for n, t in times.items()},
              "ratio_to_default_step": {n: statistics.median(t) / base for n, t in times.items()},
              "samples_per_s": {n: 256 / statistics.median(t) for n, t in times.items() if "micro" in n}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
