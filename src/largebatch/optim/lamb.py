r"""LAMB (You et al. 2020, Algorithm 2) with every variant other libraries hard-code as a flag.

The defaults are the paper's algorithm (SPEC §1)::

    m_t = β1·m + (1−β1)·g                 v_t = β2·v + (1−β2)·g²
    m̂ = m_t/(1−β1^t)                       v̂ = v_t/(1−β2^t)
    u = m̂/(√v̂ + ε) + λ·x                   (decoupled decay INSIDE the trust ratio)
    x ← x − η·φ(‖x‖)/‖u‖·u                  per parameter tensor; ratio := 1 if ‖x‖ = 0 or ‖u‖ = 0

Three implementations compute the same thing (the tests pin each to a float64 paper-literal reference):
``single_tensor`` (the readable loop below), ``foreach`` (multi-tensor ops, any device: the CUDA path) and
``fused`` (a C kernel for contiguous float32/float64 CPU tensors: two passes per tensor, the second one
backwards while the tensor is still in cache; the only temporary is one reusable scratch buffer of the
largest tensor's size). ``fused=None, foreach=None`` picks the fastest.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _kernel
from ._base import TrustRatioOptimizer, check_choice, check_number, invalid, local_tensor, run_in_buckets
from .trust_ratio import trust_ratio

BIAS_CORRECTION_CHOICES = ("inside", "step_size", "none")
WEIGHT_DECAY_MODE_CHOICES = ("decoupled", "l2", "decoupled_outside")
NESTEROV_CHOICES = (None, "n-lamb", "nn-lamb")


def lamb_coefficients(steps: Tensor, *, lr: float, beta1: float, beta2: float, bias_correction: str,
                      nesterov: str | None, grad_averaging: bool) -> Tensor:
    """Per-tensor scalars of one LAMB step as an [n, 5] float64 tensor: a_m, b_m, a_v, b_v, step_scale.

    With them the direction is  m̂ = a_m·m_t + b_m·g,  v̂ = a_v·v_t + b_v·g²  and the update is
    x ← x − step_scale·ratio·u. This is the only place where bias correction and Nesterov live:

    - bias_correction "inside": c1(t) = 1−β1^t, c2(t) = 1−β2^t divide m and v (paper);
      "step_size": no division, step_scale = lr·√c2(t)/c1(t) after the trust ratio (torch-optimizer
      ``debias=True``, apex ``bias_correction`` inside the step size); "none": no correction at all.
    - nesterov "n-lamb" (Dozat 2016, NAdam): m̂ = β1·m_t/c1(t+1) + β3·g/c1(t);
      "nn-lamb" additionally v̂ = β2·v_t/c2(t+1) + (1−β2)·g²/c2(t). With no inside correction c ≡ 1.
    """
    t = steps.to(torch.float64)
    one = torch.ones_like(t)
    beta3 = 1.0 - beta1 if grad_averaging else 1.0
    if bias_correction == "inside":
        c1, c2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        c1_next, c2_next = 1.0 - beta1 ** (t + 1), 1.0 - beta2 ** (t + 1)
    else:
        c1 = c2 = c1_next = c2_next = one
    if nesterov is None:
        a_m, b_m = 1.0 / c1, torch.zeros_like(t)
    else:
        a_m, b_m = beta1 / c1_next, beta3 / c1
    if nesterov == "nn-lamb":
        a_v, b_v = beta2 / c2_next, (1.0 - beta2) / c2
    else:
        a_v, b_v = 1.0 / c2, torch.zeros_like(t)
    if bias_correction == "step_size":
        scale = lr * torch.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    else:
        scale = lr * one
    return torch.stack([a_m, b_m, a_v, b_v, scale], dim=1)


class Lamb(TrustRatioOptimizer):
    r"""LAMB, defaults = the paper's Algorithm 2 (β=(0.9, 0.999), ε=1e-6 outside √, λ=0.01 inside the ratio).

    Args:
        params: parameters or param-group dicts (see :func:`largebatch.param_groups`).
        lr, betas, eps, weight_decay: as in the paper.
        bias_correction: ``"inside"`` (paper) | ``"step_size"`` (applied to the step after the ratio:
            ``lr·√(1−β2^t)/(1−β1^t)``) | ``"none"`` (authors' ResNet code, Google ALBERT).
        weight_decay_mode: ``"decoupled"`` (paper: u = r + λx, so λx is inside ‖u‖) | ``"l2"``
            (g ← g + λx before the moments) | ``"decoupled_outside"`` (x ← x − ηλx next to the
            trust-ratio step of r; the ratio uses the pre-decay x).
        trust_ratio: ``True`` (every tensor, paper) | ``False`` (none: an Adam step) | ``"decayed"``
            (only tensors whose group has weight_decay ≠ 0: apex FusedLAMB and timm). Per group as well,
            which is how exclusion lists are expressed (:func:`largebatch.param_groups`).
        phi, phi_min, phi_max: the scaling function φ, see :func:`largebatch.optim.trust_ratio.trust_ratio`.
        max_grad_norm: NVLAMB pre-normalisation: every gradient is divided by
            max(1, ‖g‖_global/max_grad_norm) before the moments (apex FusedLAMB default 1.0). ``None``: off.
        eps_inside_sqrt: denominator √(v̂+ε) instead of √v̂ + ε.
        grad_averaging: m = β1·m + (1−β1)·g (True) or β1·m + g (False), as apex/timm expose it.
        nesterov: ``None`` | ``"n-lamb"`` | ``"nn-lamb"`` (paper appendix; derived from Dozat 2016, see
            :func:`lamb_coefficients`).
        master_weights: keep an fp32 copy of bf16/fp16 parameters in the state (``"master_param"``) and
            update that; the low-precision parameter is a rounded copy. Moments are fp32.
        foreach, fused: implementation choice (``None``: fastest available).

    ``step()`` never modifies ``p.grad``. Per-tensor ‖x‖, ‖u‖ and ratio of the last step:
    :meth:`telemetry`.
    """

    _shaped_state_keys = ("exp_avg", "exp_avg_sq", "master_param")

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, *, bias_correction: str = "inside",
                 weight_decay_mode: str = "decoupled", trust_ratio: bool | str = True, phi: str = "identity",
                 phi_min: float | None = None, phi_max: float | None = None,
                 max_grad_norm: float | None = None, eps_inside_sqrt: bool = False,
                 grad_averaging: bool = True, nesterov: str | None = None, master_weights: bool = False,
                 foreach: bool | None = None, fused: bool | None = None):
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, low_inclusive=False)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, weight_decay_mode=weight_decay_mode,
                        trust_ratio=trust_ratio, phi=phi, phi_min=phi_min, phi_max=phi_max,
                        max_grad_norm=max_grad_norm, eps_inside_sqrt=eps_inside_sqrt,
                        grad_averaging=grad_averaging, nesterov=nesterov, master_weights=master_weights,
                        foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._validate_common(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise invalid("betas", betas, "a pair (beta1, beta2)")
        check_number("betas[0]", betas[0], high=1.0)
        check_number("betas[1]", betas[1], high=1.0)
        check_number("eps", group["eps"])
        check_choice("bias_correction", group["bias_correction"], BIAS_CORRECTION_CHOICES)
        check_choice("weight_decay_mode", group["weight_decay_mode"], WEIGHT_DECAY_MODE_CHOICES)
        check_choice("nesterov", group["nesterov"], NESTEROV_CHOICES)
        check_choice("eps_inside_sqrt", group["eps_inside_sqrt"], (True, False))
        check_choice("grad_averaging", group["grad_averaging"], (True, False))
        if group["bias_correction"] == "step_size" and group["nesterov"] is not None:
            raise invalid("nesterov", group["nesterov"],
                          "None when bias_correction='step_size' (Nesterov needs the corrected moments)")

    @staticmethod
    def _init_state(x: Tensor, state: dict) -> None:
        state["exp_avg"] = torch.zeros_like(x, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(x, memory_format=torch.preserve_format)

    def _step_group(self, group, params, xs, grads, states, *, clip, sharded, trust):
        ms = [local_tensor(s["exp_avg"]) for s in states]
        vs = [local_tensor(s["exp_avg_sq"]) for s in states]
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        coefs = lamb_coefficients(self._advance_steps(states), lr=lr, beta1=beta1, beta2=beta2,
                                  bias_correction=group["bias_correction"], nesterov=group["nesterov"],
                                  grad_averaging=group["grad_averaging"])
        impl = self._choose_impl(group, [xs, grads, ms, vs],
                                 not sharded and self._kernel_eligible(group, xs, grads, ms, vs))
        fn = {"fused": _fused_lamb, "foreach": _multi_tensor_lamb, "single_tensor": _single_tensor_lamb}[impl]
        kwargs = dict(lr=lr, clip=clip, scratch=self._scratch, sharded=sharded,
                      reduce_sq=lambda sq: self._reduce_sq_norms(sq, params))
        if impl == "foreach" and not sharded:  # bounded temporaries (sharded norms are reduced all at once)
            return run_in_buckets(fn, [xs, grads, ms, vs], [coefs, trust], group, **kwargs)
        return fn(xs, grads, ms, vs, coefs, trust, group, **kwargs)


# ---------------------------------------------------------------------------------------- kernels
def _lamb_direction(x: Tensor, g: Tensor, m: Tensor, v: Tensor, coef: list[float], group: dict,
                    clip: Tensor | None) -> Tensor:
    """Update m and v in place and return the new tensor u = m̂/(√v̂+ε) (+ λx when decoupled)."""
    beta1, beta2 = group["betas"]
    beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
    wd, mode = group["weight_decay"], group["weight_decay_mode"]
    a_m, b_m, a_v, b_v, _ = coef
    if clip is not None:
        g = g * clip.to(g.dtype)  # never in place: p.grad is the user's
    if mode == "l2" and wd != 0:
        g = g.add(x, alpha=wd)
    m.mul_(beta1).add_(g, alpha=beta3)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    m_hat = m * a_m
    if b_m:
        m_hat.add_(g, alpha=b_m)
    v_hat = v * a_v
    if b_v:
        v_hat.addcmul_(g, g, value=b_v)
    if group["eps_inside_sqrt"]:
        denom = v_hat.add_(group["eps"]).sqrt_()
    else:
        denom = v_hat.sqrt_().add_(group["eps"])
    u = m_hat.div_(denom)
    if mode == "decoupled" and wd != 0:
        u.add_(x, alpha=wd)
    return u


def _norm(t: Tensor) -> Tensor:
    # float32 accumulation at least (bf16 norms would be too coarse for the ratio)
    return torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32))


def _ratios(param_norm: Tensor, update_norm: Tensor, trust: Tensor, group: dict) -> Tensor:
    r = trust_ratio(param_norm, update_norm, phi=group["phi"], phi_min=group["phi_min"], phi_max=group["phi_max"])
    return torch.where(trust, r, torch.ones_like(r))


def _apply(x: Tensor, u: Tensor, ratio: Tensor, scale: float, group: dict, lr: float) -> None:
    """x ← x·(1 − ηλ [outside mode]) − scale·ratio·u   (u is our temporary: scaled in place)."""
    if group["weight_decay_mode"] == "decoupled_outside" and group["weight_decay"] != 0:
        x.mul_(1.0 - lr * group["weight_decay"])
    u.mul_(ratio.to(u.dtype) * -scale)
    x.add_(u)


def _single_tensor_lamb(xs, grads, ms, vs, coefs, trust, group, *, lr, clip, reduce_sq, sharded, scratch):
    """The readable path: one tensor at a time (all directions kept only when norms must be reduced)."""
    rows = coefs.tolist()
    trust_list = trust.tolist()
    out, pending = [], []
    for i, (x, g, m, v) in enumerate(zip(xs, grads, ms, vs)):
        u = _lamb_direction(x, g, m, v, rows[i], group, clip)
        xn, un = _norm(x), _norm(u)
        if sharded:
            pending.append(u)
            out.append(torch.stack([xn.square(), un.square()]))
            continue
        ratio = _ratios(xn, un, trust[i], group) if trust_list[i] else torch.ones_like(xn)
        _apply(x, u, ratio, rows[i][4], group, lr)
        out.append(torch.stack([xn, un, ratio]))
    if not sharded:
        return torch.stack(out)
    norms = reduce_sq(torch.stack(out)).sqrt()
    ratio = _ratios(norms[:, 0], norms[:, 1], trust, group)
    for i, (x, u) in enumerate(zip(xs, pending)):
        _apply(x, u, ratio[i], rows[i][4], group, lr)
    return torch.cat([norms, ratio[:, None]], dim=1)


def _multi_tensor_lamb(xs, grads, ms, vs, coefs, trust, group, *, lr, clip, reduce_sq, sharded, scratch):
    """Multi-tensor path (torch._foreach_*): the same maths, a handful of kernel launches per group."""
    beta1, beta2 = group["betas"]
    beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
    wd, mode = group["weight_decay"], group["weight_decay_mode"]
    a_m, b_m, a_v, b_v, scale = (c.tolist() for c in coefs.unbind(1))
    gs = grads
    if clip is not None:
        gs = torch._foreach_mul(gs, clip.to(xs[0].device, xs[0].dtype))
    if mode == "l2" and wd != 0:
        gs = torch._foreach_add(gs, xs, alpha=wd)
    torch._foreach_mul_(ms, beta1)
    torch._foreach_add_(ms, gs, alpha=beta3)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
    u = torch._foreach_mul(ms, a_m)
    if any(b_m):
        torch._foreach_add_(u, torch._foreach_mul(gs, b_m))
    denom = torch._foreach_mul(vs, a_v)
    if any(b_v):
        torch._foreach_addcmul_(denom, gs, gs, b_v)
    if group["eps_inside_sqrt"]:
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_sqrt_(denom)
    else:
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
    torch._foreach_div_(u, denom)
    del denom
    if mode == "decoupled" and wd != 0:
        torch._foreach_add_(u, xs, alpha=wd)
    norm_dtype = torch.promote_types(xs[0].dtype, torch.float32)
    xn = torch.stack(torch._foreach_norm(xs, 2, dtype=norm_dtype))
    un = torch.stack(torch._foreach_norm(u, 2, dtype=norm_dtype))
    if sharded:
        norms = reduce_sq(torch.stack([xn, un], dim=1).square()).sqrt()
        xn, un = norms[:, 0], norms[:, 1]
    ratio = _ratios(xn, un, trust, group)
    step = ratio.to(xs[0].dtype) * -torch.tensor(scale, dtype=xs[0].dtype, device=ratio.device)
    torch._foreach_mul_(u, list(step.unbind(0)))
    if mode == "decoupled_outside" and wd != 0:
        torch._foreach_mul_(xs, 1.0 - lr * wd)
    torch._foreach_add_(xs, u)
    return torch.stack([xn, un, ratio], dim=1)


def kernel_hyper(group: dict, *, lr: float, clip: float | None) -> _kernel.LambHyper:
    """A param group's settings as the C kernel's scalars (the benchmark's profile uses it too)."""
    beta1, beta2 = group["betas"]
    wd, mode = group["weight_decay"], group["weight_decay_mode"]
    return _kernel.LambHyper(
        beta1=beta1, beta2=beta2, beta3=1.0 - beta1 if group["grad_averaging"] else 1.0,
        eps=group["eps"], eps_inside_sqrt=group["eps_inside_sqrt"],
        clip=1.0 if clip is None else float(clip),
        l2=wd if mode == "l2" else 0.0, wd_in=wd if mode == "decoupled" else 0.0,
        decay_out=1.0 - lr * wd if mode == "decoupled_outside" else 1.0,
        phi=group["phi"], phi_min=group["phi_min"], phi_max=group["phi_max"])


def _fused_lamb(xs, grads, ms, vs, coefs, trust, group, *, lr, clip, reduce_sq, sharded, scratch):
    """C kernel: per tensor, pass 1 updates m, v, writes u to the scratch and sums ‖x‖², ‖u‖²;
    pass 2 writes x. ``scratch(dtype, n)`` returns the optimizer's reusable buffer."""
    return _kernel.lamb_step(xs, grads, ms, vs, coefs, trust, kernel_hyper(group, lr=lr, clip=clip), scratch)
