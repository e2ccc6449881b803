"""The samples of a step: a pure function of (seed, phase, step), so resuming needs no sampler state.

Each epoch is one seeded permutation of the training set, read as one stream; a step takes the next
``batch_size`` positions, each process its slice, split into micro-batches. The data randomness (MLM
masks) comes from a generator seeded per (step, micro-batch, rank).
"""
from __future__ import annotations

import functools

import torch

from . import distributed as D
from .accumulation import split_indices
from .run_plan import RunPlan


def sample_indices(step: int, batch_size: int, dataset_size: int, seed: int) -> torch.Tensor:
    """Indices of the samples of ``step``: positions [step·B, (step+1)·B) of the stream formed by one
    seeded permutation per epoch. A pure function, so resuming needs no sampler state."""
    start, stop = step * batch_size, (step + 1) * batch_size
    out = []
    pos = start
    while pos < stop:
        epoch, offset = divmod(pos, dataset_size)
        perm = epoch_permutation(dataset_size, seed, epoch)
        take = min(stop - pos, dataset_size - offset)
        out.append(perm[offset:offset + take])
        pos += take
    return torch.cat(out)


@functools.lru_cache(maxsize=4)
def epoch_permutation(dataset_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch (cached: drawing it every step is measurable at small batches)."""
    return torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Per-(step, micro-batch) generator for data randomness (MLM masks)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


def step_micro_batches(task, plan: RunPlan, seed: int, step: int, ctx: D.DistContext) -> list[dict]:
    """This process's micro-batches of global ``step`` (the task must be at the phase's sequence length)."""
    index, local = plan.locate(step)
    phase = plan.phases[index]
    indices = sample_indices(local, phase.batch_size, plan.train_sizes[index], plan.data_seed(seed, index))
    return [task.batch(idx, step_generator(seed, step, i + ctx.rank * 10_000))
            for i, idx in enumerate(split_indices(D.rank_slice(indices, ctx), phase.micro_batch_size))]


def data_position(plan: RunPlan, seed: int, step: int) -> dict[str, int]:
    """Where the data stream stands after global ``step`` (0-based): stored in checkpoints to make them
    self-describing (the step alone determines what comes next)."""
    index, local = plan.locate(step)
    epoch, offset = divmod((local + 1) * plan.phases[index].batch_size, plan.train_sizes[index])
    return {"phase": index, "epoch": epoch, "sample_in_epoch": offset, "seed": plan.data_seed(seed, index)}
