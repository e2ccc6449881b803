"""Data-parallel training on torch.distributed (launched with ``torchrun``).

``init_from_env()`` starts the process group when torchrun's environment says there are several
processes (gloo on CPU, nccl on GPU). Each rank takes a contiguous slice of every global batch; the loss
is normalised by the GLOBAL number of samples / masked tokens (one small all-reduce per step) and scaled
by the world size, because DDP averages gradients: the update equals the single-process update on the
whole global batch. Gradients are synchronised once per effective batch (``no_sync`` on the other
micro-steps). FSDP2 sharding is handled inside the optimizers (whole-tensor norms): see docs/distributed.md.

Every collective of training waits at most ``timeout_s`` (``dist_timeout``, default 10 minutes instead of
torch's 30): a rank that is stuck (stopped, deadlocked) or dead makes the others fail with
``CollectiveTimeout``, one line naming the rank and the limit, and torchrun then ends the job. The waits
while rank 0 alone works (building caches before training, writing the results after it) use a separate
gloo group with at least torch's 30 minutes, so a short ``dist_timeout`` does not cut them.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    solo_group: Any = None  # the group of the waits while rank 0 alone works (see the module docstring)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: seconds a collective may wait for the other ranks (torch's own default is 30 minutes)
DEFAULT_TIMEOUT_S = 600.0
#: the least the other ranks wait while rank 0 alone builds caches or writes results (torch's default)
SOLO_TIMEOUT_S = 1800.0


class CollectiveTimeout(RuntimeError):
    """Another rank did not answer within the process-group timeout."""


def check_timeout(timeout_s) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (
            math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"Invalid dist_timeout: {timeout_s!r} (allowed: a finite number of seconds > 0)")
    return float(timeout_s)


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    timeout_s = check_timeout(timeout_s)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    solo = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(timeout_s, SOLO_TIMEOUT_S)))
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), solo)
    if torch.cuda.is_available():
        torch.cuda.set_device(ctx.local_rank)
    return ctx


STRATEGIES = ("ddp", "fsdp")


def wrap_model(model: nn.Module, ctx: DistContext, strategy: str = "ddp") -> nn.Module:
    """DDP (replicated parameters) or FSDP2 (``fully_shard``: every parameter sharded over the ranks).

    FSDP2 shards the root module as one unit, which keeps tied weights (BERT's decoder and word
    embeddings) tied. Lamb/Lars then take trust ratios from whole-tensor norms (one all-reduce per group).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Invalid strategy: {strategy!r} (allowed: {' | '.join(STRATEGIES)})")
    if not ctx.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return fully_shard(model, mesh=init_device_mesh(device, (ctx.world_size,)))
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Whole (unsharded, CPU) model and optimizer state keyed by parameter name: the same format for
    1 process, DDP and FSDP2, so a checkpoint resumes on any number of processes. Collective under FSDP2."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer, model_state: dict, optim_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


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
    """Context for the micro-steps that must not synchronise gradients (all but the last)."""
    if not ctx.enabled:
        return None
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return lambda: _fsdp_no_sync(model)
    return None


def any_true(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if it is true on one (e.g. 'some shard has a non-finite gradient')."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _is_timeout(exc: BaseException) -> bool:
    """gloo raises a plain RuntimeError ('Timed out waiting 2000ms for recv'), NCCL's watchdog a
    DistBackendError ('collective operation timeout')."""
    text = str(exc).lower()
    return "timed out" in text or "operation timeout" in text


@contextlib.contextmanager
def timeouts_reported(ctx: DistContext, timeout_s: float):
    """Turn a collective's timeout (gloo and NCCL word it differently, with pages of context) into one line."""
    try:
        yield
    except RuntimeError as exc:
        if not ctx.enabled or not _is_timeout(exc):
            raise
        raise CollectiveTimeout(f"rank {ctx.rank} of {ctx.world_size}: no answer from the other process(es) within "
                                f"dist_timeout={timeout_s:g} s: a rank is stuck or dead") from None


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier(group=ctx.solo_group)  # rank 0 may still be writing the results
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(ctx: DistContext):
    """Let rank 0 build caches (tokenizer) before the others read them; all leave together (on the solo group:
    building may take longer than dist_timeout)."""
    if ctx.enabled and not ctx.is_main:
        dist.barrier(group=ctx.solo_group)
    yield
    if ctx.enabled and ctx.is_main:
        dist.barrier(group=ctx.solo_group)
    if ctx.enabled:  # the others' builds (from the caches) done too: the training collectives start together
        dist.barrier(group=ctx.solo_group)
