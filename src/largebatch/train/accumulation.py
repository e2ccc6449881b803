"""Exact gradient accumulation.

k micro-batches give the same gradient as one batch k× larger: each micro-batch contributes its SUMMED
loss divided by the TOTAL number of samples (or masked tokens) of the whole effective batch — not the
mean of per-micro-batch means, which is wrong whenever micro-batches differ in size or token count.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def split_indices(indices: Tensor, micro_batch_size: int) -> list[Tensor]:
    """Cut an effective batch into micro-batches (the last one may be shorter)."""
    if micro_batch_size < 1:
        raise ValueError(f"Invalid micro_batch_size: {micro_batch_size} (allowed: >= 1)")
    return list(torch.split(indices, micro_batch_size))


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[dict[str, Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, int]],
    *,
    count_fn: Callable[[dict[str, Tensor]], int],
    no_sync: Callable[[], Any] | None = None,
    autocast: Callable[[], Any] | None = None,
    backward: Callable[[Tensor], None] | None = None,
    total: int | None = None,
    scale: float = 1.0,
    on_micro_batch: Callable[[int, dict[str, Tensor]], None] | None = None,
) -> tuple[float, int]:
    """Forward/backward every micro-batch, normalised by the true total count; returns (mean loss, count).

    ``count_fn(batch)`` gives a micro-batch's sample / masked-token count *before* any forward pass, so the
    normaliser is known up front. ``no_sync`` (DDP) wraps every micro-step but the last;
    ``autocast`` wraps forward passes; ``backward`` replaces ``loss.backward()`` (e.g. a GradScaler).
    Data parallel: ``total`` is the count over ALL ranks and ``scale`` the world size (DDP averages
    gradients over ranks, so each rank's sum/total is multiplied back); the returned loss is this rank's
    summed loss divided by the global total. ``on_micro_batch(i, batch)`` is called before each micro-batch's
    forward (the gradient noise scale announces each backward to its tracker there).
    """
    if total is None:
        total = sum(count_fn(b) for b in micro_batches)
    if total == 0:
        raise ValueError("the effective batch has nothing to predict (0 samples / masked tokens)")
    loss_sum = 0.0
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        if on_micro_batch is not None:
            on_micro_batch(i, batch)
        sync_ctx = no_sync() if (no_sync is not None and i < last) else contextlib.nullcontext()
        with sync_ctx:
            with autocast() if autocast is not None else contextlib.nullcontext():
                summed, _ = loss_fn(model, batch)
            scaled = summed * (scale / total) if scale != 1.0 else summed / total
            (backward or Tensor.backward)(scaled)
        loss_sum += float(summed.detach())
    return loss_sum / total, total
