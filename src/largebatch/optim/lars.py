r"""LARS: the paper's Algorithm 1 by default, the original 2017 form and LARC clipping as modes.

``mode="paper"`` (You et al. 2020, Algorithm 1, SPEC §2)::

    m_t = β1·m + (1−β1)·(g + λx)          (decay enters the momentum, L2 style)
    x ← x − η·φ(‖x‖)/‖m_t‖·m_t             per tensor; ratio := 1 if ‖x‖ = 0 or ‖m_t‖ = 0

``mode="2017"`` (You, Gitman & Ginsburg 2017; NVIDIA LARC, torchlars)::

    local = η_tc·‖x‖/(‖g‖ + λ‖x‖ + ε)      (1 if ‖x‖ = 0 or ‖g‖ = 0; LARC clip: min(local/η, 1))
    buf ← μ·buf + local·(g + λx)            (heavy-ball momentum, buffer starts at 0)
    x ← x − η·buf                           (Nesterov: x ← x − η·(local·(g + λx) + μ·buf))

The LR multiplies the buffer when it is applied (LARC/torch SGD convention), so with a constant LR the
2017 form ``v ← μv + η·local·d; x ← x − v`` is the same thing.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _kernel
from ._base import TrustRatioOptimizer, check_choice, check_number, invalid, local_tensor, run_in_buckets
from .lamb import _norm, _ratios
from .trust_ratio import lars_2017_local_lr

MODE_CHOICES = ("paper", "2017")


class Lars(TrustRatioOptimizer):
    r"""LARS, defaults = the paper's Algorithm 1 (β1 = 0.9, λ = 0.01 inside the momentum).

    Args:
        params: parameters or param-group dicts (see :func:`largebatch.param_groups`).
        lr: η. momentum: β1 (paper mode) or μ (2017 mode). weight_decay: λ.
        mode: ``"paper"`` | ``"2017"`` (see module docstring).
        trust_coefficient: η_tc of the 2017 form (0.001 in the 2017 paper); 2017 mode only.
        larc_clip: LARC's clipping min(local/η, 1); 2017 mode only.
        eps: ε in the 2017 local LR denominator.
        nesterov: paper mode: the direction is β1·m_t + (1−β1)·(g + λx); 2017 mode: Nesterov SGD.
        grad_averaging: paper mode m = β1·m + (1−β1)·d (True) or β1·m + d (False).
        trust_ratio, phi, phi_min, phi_max, max_grad_norm, master_weights, foreach, fused: as in
            :class:`largebatch.Lamb` (φ applies to the paper mode).
    """

    _shaped_state_keys = ("momentum_buffer", "master_param")

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0.9, weight_decay: float = 0.01, *,
                 mode: str = "paper", trust_coefficient: float = 0.001, larc_clip: bool = False,
                 eps: float = 1e-8, nesterov: bool = False, grad_averaging: bool = True,
                 trust_ratio: bool | str = True, phi: str = "identity", phi_min: float | None = None,
                 phi_max: float | None = None, max_grad_norm: float | None = None,
                 master_weights: bool = False, foreach: bool | None = None, fused: bool | None = None):
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, low_inclusive=False)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, mode=mode,
                        trust_coefficient=trust_coefficient, larc_clip=larc_clip, eps=eps, nesterov=nesterov,
                        grad_averaging=grad_averaging, trust_ratio=trust_ratio, phi=phi, phi_min=phi_min,
                        phi_max=phi_max, max_grad_norm=max_grad_norm, master_weights=master_weights,
                        foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._validate_common(group)
        check_number("momentum", group["momentum"], high=1.0)
        check_choice("mode", group["mode"], MODE_CHOICES)
        check_number("trust_coefficient", group["trust_coefficient"], low_inclusive=False)
        check_number("eps", group["eps"])
        for flag in ("larc_clip", "nesterov", "grad_averaging"):
            check_choice(flag, group[flag], (True, False))
        if group["mode"] == "paper" and group["larc_clip"]:
            raise invalid("larc_clip", True, "False when mode='paper' (LARC clipping belongs to mode='2017')")
        if group["mode"] == "2017" and group["phi"] != "identity":
            raise invalid("phi", group["phi"], "'identity' when mode='2017' (the 2017 form has no φ)")
        if group["mode"] == "2017" and group["larc_clip"] and float(group["lr"]) == 0.0:
            raise invalid("lr", group["lr"], "> 0 with larc_clip=True (LARC divides by the LR)")

    @staticmethod
    def _init_state(x: Tensor, state: dict) -> None:
        state["momentum_buffer"] = torch.zeros_like(x, memory_format=torch.preserve_format)

    def _step_group(self, group, params, xs, grads, states, *, clip, sharded, trust):
        self._advance_steps(states)
        bufs = [local_tensor(s["momentum_buffer"]) for s in states]
        impl = self._choose_impl(group, [xs, grads, bufs],
                                 not sharded and self._kernel_eligible(group, xs, grads, bufs))
        fn = {"fused": _fused_lars, "foreach": _multi_tensor_lars, "single_tensor": _single_tensor_lars}[impl]
        kwargs = dict(lr=float(group["lr"]), clip=clip, sharded=sharded,
                      reduce_sq=lambda sq: self._reduce_sq_norms(sq, params))
        if impl == "foreach" and not sharded:  # bounded temporaries (sharded norms are reduced all at once)
            return run_in_buckets(fn, [xs, grads, bufs], [trust], group, **kwargs)
        return fn(xs, grads, bufs, trust, group, **kwargs)


def _local_lrs(xn: Tensor, gn: Tensor, trust: Tensor, group: dict, lr: float) -> Tensor:
    local = lars_2017_local_lr(xn, gn, trust_coefficient=group["trust_coefficient"],
                               weight_decay=group["weight_decay"], eps=group["eps"], lr=lr,
                               larc_clip=group["larc_clip"])
    return torch.where(trust, local, torch.ones_like(local))


def _single_tensor_lars(xs, grads, bufs, trust, group, *, lr, clip, reduce_sq, sharded):
    """The readable path. Norms of every tensor are computed before any tensor is written, so the same
    code serves sharded parameters (one all-reduce of the stacked squared norms)."""
    wd, mom = group["weight_decay"], group["momentum"]
    beta3 = 1.0 - mom if group["grad_averaging"] else 1.0
    paper = group["mode"] == "paper"
    gs = [g * clip.to(g.dtype) if clip is not None else g for g in grads]  # never in place on p.grad
    directions, sq = [], []
    for x, g, buf in zip(xs, gs, bufs):
        if paper:
            d = g.add(x, alpha=wd) if wd != 0 else g
            buf.mul_(mom).add_(d, alpha=beta3)
            u = buf.mul(mom).add_(d, alpha=beta3) if group["nesterov"] else buf
            directions.append(u)
            sq.append(torch.stack([_norm(x), _norm(u)]).square())
        else:
            sq.append(torch.stack([_norm(x), _norm(g)]).square())
    sq = torch.stack(sq)
    norms = (reduce_sq(sq) if sharded else sq).sqrt()
    xn, un = norms[:, 0], norms[:, 1]
    if paper:
        ratio = _ratios(xn, un, trust, group)
        for i, (x, u) in enumerate(zip(xs, directions)):
            x.sub_(u * (ratio[i].to(x.dtype) * lr))
    else:
        ratio = _local_lrs(xn, un, trust, group, lr)
        for i, (x, g, buf) in enumerate(zip(xs, gs, bufs)):
            d = g.add(x, alpha=wd) if wd != 0 else g.clone()
            d.mul_(ratio[i].to(x.dtype))
            buf.mul_(mom).add_(d)
            u = d.add_(buf, alpha=mom) if group["nesterov"] else buf
            x.add_(u, alpha=-lr)
    return torch.stack([xn, un, ratio], dim=1)


def _multi_tensor_lars(xs, grads, bufs, trust, group, *, lr, clip, reduce_sq, sharded):
    wd, mom = group["weight_decay"], group["momentum"]
    beta3 = 1.0 - mom if group["grad_averaging"] else 1.0
    paper = group["mode"] == "paper"
    gs = torch._foreach_mul(grads, clip.to(xs[0].device, xs[0].dtype)) if clip is not None else grads
    ds = torch._foreach_add(gs, xs, alpha=wd) if wd != 0 else gs
    norm_dtype = torch.promote_types(xs[0].dtype, torch.float32)
    xn = torch.stack(torch._foreach_norm(xs, 2, dtype=norm_dtype))
    if paper:
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, ds, alpha=beta3)
        if group["nesterov"]:
            us = torch._foreach_mul(bufs, mom)
            torch._foreach_add_(us, ds, alpha=beta3)
        else:
            us = bufs
        un = torch.stack(torch._foreach_norm(us, 2, dtype=norm_dtype))
    else:
        un = torch.stack(torch._foreach_norm(gs, 2, dtype=norm_dtype))
    if sharded:
        norms = reduce_sq(torch.stack([xn, un], dim=1).square()).sqrt()
        xn, un = norms[:, 0], norms[:, 1]
    if paper:
        ratio = _ratios(xn, un, trust, group)
        scaled = torch._foreach_mul(us, list((ratio.to(xs[0].dtype) * -lr).unbind(0)))
        torch._foreach_add_(xs, scaled)
    else:
        ratio = _local_lrs(xn, un, trust, group, lr)
        ds = torch._foreach_mul(ds, list(ratio.to(xs[0].dtype).unbind(0)))  # new tensors: grads untouched
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, ds)
        if group["nesterov"]:
            torch._foreach_add_(ds, bufs, alpha=mom)
            torch._foreach_add_(xs, ds, alpha=-lr)
        else:
            torch._foreach_add_(xs, bufs, alpha=-lr)
    return torch.stack([xn, un, ratio], dim=1)


def kernel_hyper(group: dict, *, lr: float, clip: float | None) -> _kernel.LarsHyper:
    """A param group's settings as the C kernel's scalars (the benchmark's profile uses it too)."""
    mom = group["momentum"]
    return _kernel.LarsHyper(
        momentum=mom, beta3=1.0 - mom if group["grad_averaging"] else 1.0,
        weight_decay=group["weight_decay"], clip=1.0 if clip is None else float(clip), lr=lr,
        trust_coefficient=group["trust_coefficient"], eps=group["eps"], mode_2017=group["mode"] == "2017",
        nesterov=group["nesterov"], larc_clip=group["larc_clip"], phi=group["phi"],
        phi_min=group["phi_min"], phi_max=group["phi_max"])


def _fused_lars(xs, grads, bufs, trust, group, *, lr, clip, reduce_sq, sharded):
    return _kernel.lars_step(xs, grads, bufs, trust, kernel_hyper(group, lr=lr, clip=clip))
