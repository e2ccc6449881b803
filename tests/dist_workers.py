"""Worker functions for the 2-process gloo tests (importable by spawned processes)."""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch import nn

import largebatch

CASES = {
    "lamb": (largebatch.Lamb, dict(lr=0.05)),
    "lamb_decayed": (largebatch.Lamb, dict(lr=0.05, trust_ratio="decayed")),
    "lamb_no_trust": (largebatch.Lamb, dict(lr=0.05, trust_ratio=False)),
    "lamb_clamp_norm_prenorm": (largebatch.Lamb, dict(lr=0.05, phi="clamp_norm", phi_min=0.0, phi_max=1.0,
                                                      max_grad_norm=0.5)),
    "lamb_foreach": (largebatch.Lamb, dict(lr=0.05, foreach=True, fused=False)),
    "lars": (largebatch.Lars, dict(lr=0.05)),
    "lars_2017": (largebatch.Lars, dict(lr=0.5, mode="2017")),
}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.LayerNorm(7), nn.Linear(7, 3)).double()


def fsdp_vs_unsharded(rank: int, world: int, port: int, out: str, per_slice: bool) -> None:
    """Each rank trains an FSDP2-sharded copy and an unsharded copy on the same data; rank 0 writes
    the largest difference per case. ``per_slice``: break the norm reduction (the test checks it fails)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if per_slice:
        largebatch.Lamb._reduce_sq_norms = staticmethod(lambda sq, params: sq)
        largebatch.Lars._reduce_sq_norms = staticmethod(lambda sq, params: sq)
    mesh = init_device_mesh("cpu", (world,))
    diffs = {}
    for name, (cls, kw) in CASES.items():
        sharded, ref = _model(), _model()
        for m in sharded:
            if any(True for _ in m.parameters()):
                fully_shard(m, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        opt = cls(largebatch.param_groups(sharded), **kw)
        ref_opt = cls(largebatch.param_groups(ref), **kw)
        diffs[name] = _lockstep_worst_diff(sharded, opt, ref, ref_opt, full=lambda p: p.full_tensor())
    if rank == 0:
        with open(out, "w") as f:
            json.dump(diffs, f)
    dist.barrier()
    dist.destroy_process_group()


def _lockstep_worst_diff(model, opt, ref, ref_opt, *, full) -> float:
    """5 steps of (model, opt) and (ref, ref_opt) on the same data (same on every rank); the largest
    parameter difference seen, ``full(p)`` giving a parameter's whole tensor."""
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(5):
        x = torch.randn(8, 6, dtype=torch.float64, generator=gen)
        for m, o in ((model, opt), (ref, ref_opt)):
            m(x).pow(2).mean().backward()
            o.step()
            o.zero_grad()
        for p, q in zip(model.parameters(), ref.parameters()):
            worst = max(worst, (full(p) - q).abs().max().item())
    return worst


def zero_vs_unsharded(rank: int, world: int, port: int, out: str) -> None:
    """ZeroRedundancyOptimizer wrapping Lamb/Lars: each rank updates whole tensors, so the ratios are exact."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    diffs = {}
    for name in ("lamb", "lamb_decayed", "lars", "lars_2017"):
        cls, kw = CASES[name]
        model, ref = _model(), _model()
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kw)
        ref_opt = cls(ref.parameters(), **kw)
        diffs[name] = _lockstep_worst_diff(model, opt, ref, ref_opt, full=lambda p: p)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(diffs, f)
    dist.barrier()
    dist.destroy_process_group()


def stuck_peer(rank: int, world: int, port: int, out: str, timeout_s: float) -> None:
    """Rank 1 stops itself (SIGSTOP) after a first all-reduce; rank 0's next collective must end after
    ``timeout_s`` with largebatch's one-line CollectiveTimeout, which it writes to ``out``."""
    import signal
    import time

    from largebatch.train import distributed as D

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    ctx = D.init_from_env("gloo", timeout_s=timeout_s)
    D.all_reduce_sum([1.0], ctx)  # both ranks are alive here
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    start = time.monotonic()
    try:
        with D.timeouts_reported(ctx, timeout_s):
            D.all_reduce_sum([1.0], ctx)
        result = {"error": None}
    except D.CollectiveTimeout as exc:
        result = {"error": str(exc), "type": type(exc).__name__}
    except Exception as exc:  # noqa: BLE001 - reported for the test's message
        result = {"error": str(exc)[:2000], "type": type(exc).__name__}
    result["waited_s"] = time.monotonic() - start
    with open(out, "w") as f:
        json.dump(result, f)
    os._exit(0)  # a group with a stopped peer cannot be torn down cleanly (gloo aborts at exit)
