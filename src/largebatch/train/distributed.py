"""Data-parallel training on torch.distributed (launched with ``torchrun``).

``init_from_env()`` starts the process group when torchrun's environment says there are several
processes (gloo on CPU, nccl on GPU). Each rank takes a contiguous slice of every global batch; the loss
is normalised by the GLOBAL number of samples / masked tokens (one small all-reduce per step) and scaled
by the world size, because DDP averages gradients: the update equals the single-process update on the
whole global batch. Gradients are synchronised once per effective batch (``no_sync`` on the other
micro-steps). FSDP2 sharding is handled inside the optimizers (whole-tensor norms): see docs/distributed.md.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(backend: str | None = None) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(ctx.local_rank)
    return ctx


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model)


def rank_slice(indices: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous share of a global batch (shares differ by at most one sample)."""
    if not ctx.enabled:
        return indices
    return torch.tensor_split(indices, ctx.world_size)[ctx.rank]


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def no_sync(model: nn.Module, ctx: DistContext):
    if ctx.enabled and hasattr(model, "no_sync"):
        return model.no_sync
    return None


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(ctx: DistContext):
    """Let rank 0 build caches (tokenizer) before the others read them."""
    if ctx.enabled and not ctx.is_main:
        dist.barrier()
    yield
    if ctx.enabled and ctx.is_main:
        dist.barrier()
