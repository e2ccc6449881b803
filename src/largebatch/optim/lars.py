r"""LARS: the paper's Algorithm 1 by default, the original 2017 form and LARC clipping as modes.

``mode="paper"`` (You et al. 2020, Algorithm 1; docs/algorithms.md, "LARS")::

    m_t = β1·m + (1−β1)·(g + λx)          (decay enters the momentum, L2 style)
    x ← x − η·φ(‖x‖)/‖m_t‖·m_t             per tensor; ratio := 1 if ‖x‖ = 0 or ‖m_t‖ = 0

``mode="2017"`` (You, Gitman & Ginsburg 2017; NVIDIA LARC, torchlars)::

    local = η_tc·‖x‖/(‖g‖ + λ‖x‖ + ε)      (1 if ‖x‖ = 0 or ‖g‖ = 0; LARC clip: min(local/η, 1))
    buf ← μ·buf + local·(g + λx)            (heavy-ball momentum, buffer starts at 0)
    x ← x − η·buf                           (Nesterov: x ← x − η·(local·(g + λx) + μ·buf))

The LR multiplies the buffer when it is applied (LARC/torch SGD convention), so with a constant LR the
2017 form ``v ← μv + η·local·d; x ← x − v`` is the same thing. A group's flags are read once into a
:class:`LarsHyper`; ``mode`` is branched on once per implementation (which pair of functions runs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from . import kernel, masked_writes
from ._base import TrustRatioOptimizer, check_choice, check_number, invalid, local_tensor, run_in_buckets
from .trust_ratio import lars_2017_local_lr, masked, stacked_norms, tensor_norm, trust_ratio

MODE_CHOICES = ("paper", "2017")


@dataclass(frozen=True)
class LarsHyper:
    """One param group's flags as plain numbers, read once per step by :meth:`from_group`.
    ``beta3`` is the direction's weight in the paper-mode momentum (``grad_averaging``)."""

    lr: float
    momentum: float
    beta3: float
    weight_decay: float
    trust_coefficient: float
    eps: float
    mode_2017: bool
    nesterov: bool
    larc_clip: bool
    phi: str
    phi_min: float | None
    phi_max: float | None

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> LarsHyper:
        mom = group["momentum"]
        return cls(lr=float(group["lr"]), momentum=mom, beta3=1.0 - mom if group["grad_averaging"] else 1.0,
                   weight_decay=group["weight_decay"], trust_coefficient=group["trust_coefficient"],
                   eps=group["eps"], mode_2017=group["mode"] == "2017", nesterov=group["nesterov"],
                   larc_clip=group["larc_clip"], phi=group["phi"], phi_min=group["phi_min"],
                   phi_max=group["phi_max"])

    def ratios(self, param_norm: Tensor, other_norm: Tensor, trust: Tensor) -> Tensor:
        """Paper mode φ(‖x‖)/‖m‖, 2017 mode the local LR from ‖x‖, ‖g‖; 1 where ``trust`` is not set."""
        if self.mode_2017:
            r = lars_2017_local_lr(param_norm, other_norm, trust_coefficient=self.trust_coefficient,
                                   weight_decay=self.weight_decay, eps=self.eps, lr=self.lr,
                                   larc_clip=self.larc_clip)
        else:
            r = trust_ratio(param_norm, other_norm, phi=self.phi, phi_min=self.phi_min, phi_max=self.phi_max)
        return masked(r, trust)


class Lars(TrustRatioOptimizer):
    r"""LARS, defaults = the paper's Algorithm 1 (β1 = 0.9, λ = 0.01 inside the momentum).

    Args:
        params: parameters or param-group dicts (see :func:`largebatch.param_groups`).
        lr: η. momentum: β1 (paper mode) or μ (2017 mode). weight_decay: λ.
        mode: ``"paper"`` | ``"2017"`` (see module docstring).
        trust_coefficient: η_tc of the 2017 form (0.001 in the 2017 paper); 2017 mode only.
        larc_clip: LARC's clipping min(local/η, 1); 2017 mode only. At η = 0 (a warmup from 0, the
            end of a decay) it is 1, its limit as η → 0, as in apex LARC.
        eps: ε in the 2017 local LR denominator.
        nesterov: paper mode: the direction is β1·m_t + (1−β1)·(g + λx); 2017 mode: Nesterov SGD.
        grad_averaging: paper mode m = β1·m + (1−β1)·d (True) or β1·m + d (False).
        trust_ratio, phi, phi_min, phi_max, max_grad_norm, master_weights, foreach, fused, nonfinite,
            sync_free: as in :class:`largebatch.Lamb` (φ applies to the paper mode). Sync-free, LARS has no
            step-dependent coefficient; its counters still advance on the device by the finite flag.
    """

    _moment_keys = ("momentum_buffer",)
    _signature_keys = ("momentum", "mode", "trust_coefficient", "trust_ratio")

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, momentum: float = 0.9, weight_decay: float = 0.01, *,
                 mode: str = "paper", trust_coefficient: float = 0.001, larc_clip: bool = False,
                 eps: float = 1e-8, nesterov: bool = False, grad_averaging: bool = True,
                 trust_ratio: bool | str = True, phi: str = "identity", phi_min: float | None = None,
                 phi_max: float | None = None, max_grad_norm: float | None = None,
                 master_weights: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 nonfinite: str = "skip", sync_free: bool | None = None):
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, low_inclusive=False)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, mode=mode,
                        trust_coefficient=trust_coefficient, larc_clip=larc_clip, eps=eps, nesterov=nesterov,
                        grad_averaging=grad_averaging, trust_ratio=trust_ratio, phi=phi, phi_min=phi_min,
                        phi_max=phi_max, max_grad_norm=max_grad_norm, master_weights=master_weights,
                        foreach=foreach, fused=fused, nonfinite=nonfinite, sync_free=sync_free)
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

    @staticmethod
    def _init_state(x: Tensor, state: dict) -> None:
        state["momentum_buffer"] = torch.zeros_like(x, memory_format=torch.preserve_format)

    def _step_group(self, group, params, xs, grads, states, *, clip, sharded, trust, ok=None, sync_free=False):
        self._advance_steps(states, ok, sync_free)
        bufs = [local_tensor(s["momentum_buffer"]) for s in states]
        h = LarsHyper.from_group(group)
        # sync-free: the multi-tensor path, every write masked by ``ok``
        impl = "foreach" if sync_free else self._choose_impl(
            group, [xs, grads, bufs], not sharded and self._kernel_eligible(group, xs, grads, bufs))
        if impl == "fused":
            return kernel.lars_step(xs, grads, bufs, trust, h, 1.0 if clip is None else float(clip))
        extra = {"ok": ok} if sync_free else {}
        reduce_sq = (lambda sq: self._reduce_sq_norms(sq, params)) if sharded else None
        if impl == "foreach" and not sharded:  # bounded temporaries (sharded norms are reduced all at once)
            return run_in_buckets(multi_tensor_lars, [xs, grads, bufs], [trust], h, clip, reduce_sq, **extra)
        fn = multi_tensor_lars if impl == "foreach" else single_tensor_lars
        return fn(xs, grads, bufs, trust, h, clip, reduce_sq, **extra)


# ---------------------------------------------------------------------------------------- paths
def _ratios_from_sq(sq: Tensor, trust: Tensor, h: LarsHyper, reduce_sq) -> Tensor:
    """[n, 3] (‖x‖, ‖u‖, ratio) from [n, 2] squared norms, summed over shards first when sharded."""
    norms = (reduce_sq(sq) if reduce_sq is not None else sq).sqrt()
    return torch.cat([norms, h.ratios(norms[:, 0], norms[:, 1], trust)[:, None]], dim=1)


def _paper_directions(xs, gs, bufs, h: LarsHyper) -> list[Tensor]:
    """m ← β1·m + β3·(g + λx); the direction is m (Nesterov: β1·m + β3·(g + λx))."""
    out = []
    for x, g, buf in zip(xs, gs, bufs):
        d = g.add(x, alpha=h.weight_decay) if h.weight_decay != 0 else g
        buf.mul_(h.momentum).add_(d, alpha=h.beta3)
        out.append(buf.mul(h.momentum).add_(d, alpha=h.beta3) if h.nesterov else buf)
    return out


def _paper_apply(xs, gs, bufs, us, ratio: Tensor, h: LarsHyper) -> None:
    """x ← x − η·r·u."""
    for i, (x, u) in enumerate(zip(xs, us)):
        x.sub_(u * (ratio[i].to(x.dtype) * h.lr))


def _2017_apply(xs, gs, bufs, us, ratio: Tensor, h: LarsHyper) -> None:
    """buf ← μ·buf + local·(g + λx); x ← x − η·buf (Nesterov: x ← x − η·(local·(g + λx) + μ·buf))."""
    for i, (x, g, buf) in enumerate(zip(xs, gs, bufs)):
        d = g.add(x, alpha=h.weight_decay) if h.weight_decay != 0 else g.clone()
        d.mul_(ratio[i].to(x.dtype))
        buf.mul_(h.momentum).add_(d)
        x.add_(d.add_(buf, alpha=h.momentum) if h.nesterov else buf, alpha=-h.lr)


def single_tensor_lars(xs, grads, bufs, trust: Tensor, h: LarsHyper, clip: Tensor | None,
                       reduce_sq=None) -> Tensor:
    """The readable path. Norms of every tensor are computed before any tensor is written, so the same
    code serves sharded parameters (``reduce_sq``: one all-reduce of the stacked squared norms)."""
    gs = [g * clip.to(g.dtype) if clip is not None else g for g in grads]  # never in place on p.grad
    # 2017 mode: the ratio uses ‖g‖ and the momentum is updated after it
    us = gs if h.mode_2017 else _paper_directions(xs, gs, bufs, h)
    sq = torch.stack([torch.stack([tensor_norm(x), tensor_norm(u)]).square() for x, u in zip(xs, us)])
    rows = _ratios_from_sq(sq, trust, h, reduce_sq)
    (_2017_apply if h.mode_2017 else _paper_apply)(xs, gs, bufs, us, rows[:, 2], h)
    return rows


def _multi_paper(xs, gs, bufs, trust: Tensor, h: LarsHyper, reduce_sq, ok: Tensor | None) -> Tensor:
    ds = torch._foreach_add(gs, xs, alpha=h.weight_decay) if h.weight_decay != 0 else gs
    xn = stacked_norms(xs)
    masked_writes.mul_add_(bufs, h.momentum, ds, h.beta3, ok)
    if h.nesterov:
        us = torch._foreach_mul(bufs, h.momentum)
        torch._foreach_add_(us, ds, alpha=h.beta3)
    else:
        us = bufs
    rows = _stacked_rows(xn, stacked_norms(us), trust, h, reduce_sq)
    masked_writes.add_(xs, torch._foreach_mul(us, list((rows[:, 2].to(xs[0].dtype) * -h.lr).unbind(0))), 1.0, ok)
    return rows


def _multi_2017(xs, gs, bufs, trust: Tensor, h: LarsHyper, reduce_sq, ok: Tensor | None) -> Tensor:
    ds = torch._foreach_add(gs, xs, alpha=h.weight_decay) if h.weight_decay != 0 else gs
    rows = _stacked_rows(stacked_norms(xs), stacked_norms(gs), trust, h, reduce_sq)
    ds = torch._foreach_mul(ds, list(rows[:, 2].to(xs[0].dtype).unbind(0)))  # new tensors: grads untouched
    masked_writes.mul_add_(bufs, h.momentum, ds, 1.0, ok)
    if h.nesterov:
        torch._foreach_add_(ds, bufs, alpha=h.momentum)
        masked_writes.add_(xs, ds, -h.lr, ok)
    else:
        masked_writes.add_(xs, bufs, -h.lr, ok)
    return rows


def _stacked_rows(xn: Tensor, un: Tensor, trust: Tensor, h: LarsHyper, reduce_sq) -> Tensor:
    if reduce_sq is not None:
        norms = reduce_sq(torch.stack([xn, un], dim=1).square()).sqrt()
        xn, un = norms[:, 0], norms[:, 1]
    return torch.stack([xn, un, h.ratios(xn, un, trust)], dim=1)


def multi_tensor_lars(xs, grads, bufs, trust: Tensor, h: LarsHyper, clip: Tensor | None,
                      reduce_sq=None, *, ok: Tensor | None = None) -> Tensor:
    """Multi-tensor path (torch._foreach_*): the same maths, a handful of kernel launches per group;
    ``ok`` (sync-free skip, a 0-dim bool on the device): every write of the buffers and x masked by it."""
    gs = torch._foreach_mul(grads, clip.to(xs[0].device, xs[0].dtype)) if clip is not None else grads
    return (_multi_2017 if h.mode_2017 else _multi_paper)(xs, gs, bufs, trust, h, reduce_sq, ok)
