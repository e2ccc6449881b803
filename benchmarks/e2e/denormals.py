"""Forward + backward of one default fp32 step (2 × 128) with a run's initial and trained weights, with and
without ``torch.set_flush_denormal`` (README.md, "The main job"): is a late fp32 step slow on subnormals?

    largebatch train --micro-batch-size 128 --precision fp32 --threads 1 --out runs/fp32
    python benchmarks/e2e/denormals.py runs/fp32/ckpt-00000373.pt    # the same LARGEBATCH_CACHE as the run
"""
import copy
import statistics
import sys
import time

import torch

from largebatch.tasks import build_task
from largebatch.train.allocator import keep_freed_memory
from largebatch.train.data import sample_indices, step_generator


def step_seconds(task, model, step: int) -> float:
    idx = sample_indices(step, 256, task.train_size, 0)
    batches = [task.batch(i, step_generator(0, step, k)) for k, i in enumerate(idx.split(128))]
    total = sum(task.count(b) for b in batches)
    t0 = time.perf_counter()
    for b in batches:
        summed, _ = task.loss(model, b)
        (summed / total).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(checkpoint: str, rounds: int = 4) -> None:
    torch.set_num_threads(1)
    keep_freed_memory()
    task = build_task("mlm", dropout=0.0)
    trained = copy.deepcopy(task.model)
    trained.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["model"])
    times: dict[tuple[str, bool], list[float]] = {}
    for r in range(rounds):
        for name, model in (("initial", task.model), ("trained", trained)):
            for flush in (False, True):
                torch.set_flush_denormal(flush)
                times.setdefault((name, flush), []).append(step_seconds(task, model, r))
    for (name, flush), t in times.items():
        print(f"{name} weights, flush_denormal={flush}: median {statistics.median(t[1:]):.3f} s")


if __name__ == "__main__":
    main(sys.argv[1])
