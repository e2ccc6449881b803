"""LAMB (You et al. 2020, Algorithm 2) with every variant other libraries hard-code as a flag.

A group's flags are read once into a :class:`LambHyper` record of plain numbers; the three
implementations take (tensors, per-tensor coefficients from :func:`lamb_coefficients`, that record):
``single_tensor`` (the readable loop, written like the algorithm box of :class:`Lamb`), ``foreach``
(multi-tensor ops, any device: the CUDA path) and ``fused`` (the C kernel for contiguous float32/float64
CPU tensors, :mod:`largebatch.optim.kernel`). ``fused=None, foreach=None`` picks the fastest. The maths
and the variants table: docs/algorithms.md, "LAMB".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from . import kernel, masked_writes
from ._base import TrustRatioOptimizer, check_choice, check_number, invalid, local_tensor, run_in_buckets
from .trust_ratio import masked, norm_dtype, stacked_norms, tensor_norm, trust_ratio

BIAS_CORRECTION_CHOICES = ("inside", "step_size", "none")
WEIGHT_DECAY_MODE_CHOICES = ("decoupled", "l2", "decoupled_outside")
NESTEROV_CHOICES = (None, "n-lamb", "nn-lamb")


@dataclass(frozen=True)
class LambHyper:
    """One param group's flags as plain numbers, read once per step by :meth:`from_group`.

    ``weight_decay_mode`` becomes three numbers, of which at most one is not neutral: ``l2`` (λ added to
    the gradient), ``wd_in`` (λ inside u, inside ‖u‖) and ``decay_out`` (the factor 1 − ηλ on x beside
    the ratio step). ``beta3`` is the gradient's weight in m (``grad_averaging``).
    """

    lr: float
    beta1: float
    beta2: float
    beta3: float
    eps: float
    eps_inside_sqrt: bool
    l2: float
    wd_in: float
    decay_out: float
    bias_correction: str
    nesterov: str | None
    phi: str
    phi_min: float | None
    phi_max: float | None

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> LambHyper:
        beta1, beta2 = group["betas"]
        lr, wd, mode = float(group["lr"]), group["weight_decay"], group["weight_decay_mode"]
        return cls(lr=lr, beta1=beta1, beta2=beta2, beta3=1.0 - beta1 if group["grad_averaging"] else 1.0,
                   eps=group["eps"], eps_inside_sqrt=group["eps_inside_sqrt"],
                   l2=wd if mode == "l2" else 0.0, wd_in=wd if mode == "decoupled" else 0.0,
                   decay_out=1.0 - lr * wd if mode == "decoupled_outside" else 1.0,
                   bias_correction=group["bias_correction"], nesterov=group["nesterov"],
                   phi=group["phi"], phi_min=group["phi_min"], phi_max=group["phi_max"])

    def ratios(self, param_norm: Tensor, update_norm: Tensor, trust: Tensor) -> Tensor:
        """φ(‖x‖)/‖u‖ with the zero-norm rule where ``trust`` is set, 1 elsewhere."""
        r = trust_ratio(param_norm, update_norm, phi=self.phi, phi_min=self.phi_min, phi_max=self.phi_max)
        return masked(r, trust)


def lamb_coefficients(steps: Tensor, h: LambHyper) -> Tensor:
    """Per-tensor scalars of one LAMB step as an [n, 5] float64 tensor: a_m, b_m, a_v, b_v, step_scale.

    With them the direction is  m̂ = a_m·m_t + b_m·g,  v̂ = a_v·v_t + b_v·g²  and the update is
    x ← x − step_scale·ratio·u. This is the only place where bias correction and Nesterov live
    (docs/algorithms.md, "Bias correction and Nesterov as coefficients"):

    - bias_correction "inside": c1(t) = 1−β1^t, c2(t) = 1−β2^t divide m and v (paper);
      "step_size": no division, step_scale = lr·√c2(t)/c1(t) after the trust ratio (torch-optimizer
      ``debias=True``, apex ``bias_correction`` inside the step size); "none": no correction at all.
    - nesterov "n-lamb" (Dozat 2016, NAdam): m̂ = β1·m_t/c1(t+1) + β3·g/c1(t);
      "nn-lamb" additionally v̂ = β2·v_t/c2(t+1) + (1−β2)·g²/c2(t). With no inside correction c ≡ 1.
    """
    t = steps.to(torch.float64)
    one = torch.ones_like(t)
    beta1, beta2 = h.beta1, h.beta2
    if h.bias_correction == "inside":
        c1, c2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        c1_next, c2_next = 1.0 - beta1 ** (t + 1), 1.0 - beta2 ** (t + 1)
    else:
        c1 = c2 = c1_next = c2_next = one
    if h.nesterov is None:
        a_m, b_m = 1.0 / c1, torch.zeros_like(t)
    else:
        a_m, b_m = beta1 / c1_next, h.beta3 / c1
    if h.nesterov == "nn-lamb":
        a_v, b_v = beta2 / c2_next, (1.0 - beta2) / c2
    else:
        a_v, b_v = 1.0 / c2, torch.zeros_like(t)
    if h.bias_correction == "step_size":
        scale = h.lr * torch.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
    else:
        scale = h.lr * one
    return torch.stack([a_m, b_m, a_v, b_v, scale], dim=1)


class Lamb(TrustRatioOptimizer):
    r"""LAMB, defaults = the paper's Algorithm 2 (β=(0.9, 0.999), ε=1e-6 outside √, λ=0.01 inside the ratio).

    .. math::
       \begin{aligned}
       &\textbf{input}: \eta, \beta_1, \beta_2, \epsilon, \lambda, \phi, x_0;\quad m_0, v_0 \leftarrow 0;
            \quad \beta_3 = 1-\beta_1 \text{ (grad\_averaging) or } 1 \\
       &\textbf{for } t = 1, 2, \dots \textbf{ and each parameter tensor } x: \\
       &\quad g \leftarrow \nabla f_t(x)\,/\max(1, \lVert \nabla f_t \rVert_{global}/\text{max\_grad\_norm})
            \quad \text{(max\_grad\_norm only; never in place)} \\
       &\quad g \leftarrow g + \lambda x \quad \text{(weight\_decay\_mode = "l2")} \\
       &\quad m \leftarrow \beta_1 m + \beta_3 g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
       &\quad \hat m = a_m m + b_m g, \qquad \hat v = a_v v + b_v g^2
            \quad \text{(bias correction, Nesterov: } \texttt{lamb\_coefficients}) \\
       &\quad u = \hat m / (\sqrt{\hat v} + \epsilon) \quad \text{or } \hat m / \sqrt{\hat v + \epsilon}
            \text{ (eps\_inside\_sqrt)} \\
       &\quad u \leftarrow u + \lambda x \quad \text{(weight\_decay\_mode = "decoupled", the paper)} \\
       &\quad r = \phi(\lVert x \rVert)/\lVert u \rVert; \quad r = 1 \text{ if } \lVert x \rVert = 0
            \text{ or } \lVert u \rVert = 0 \text{ or the tensor has no trust ratio} \\
       &\quad x \leftarrow x\,(1 - \eta\lambda) \quad \text{(weight\_decay\_mode = "decoupled\_outside")} \\
       &\quad x \leftarrow x - s_t\, r\, u \qquad (s_t = \eta, \text{ or } \eta\sqrt{1-\beta_2^t}/(1-\beta_1^t)
            \text{ with bias\_correction = "step\_size"})
       \end{aligned}

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
        nonfinite: what ``step()`` does when any gradient holds a NaN or ±inf: ``"skip"`` (default: the
            whole step is skipped — parameters, moments and step counters untouched — and counted in
            :attr:`skipped_steps`, saved with the state), ``"raise"`` (``FloatingPointError`` naming the
            first such tensor, nothing updated) or ``"propagate"`` (no check: torch AdamW's behaviour).
            Why skip by default: a NaN that reaches the moments stays there for good (that tensor's trust
            ratio is silently 1 from then on, and with ``max_grad_norm`` every tensor turns NaN), while a
            skipped step is what mixed-precision loss scaling already does with overflowing steps and
            costs one read of the gradients (none with ``max_grad_norm``, whose global norm decides it).
            See docs/algorithms.md, "Non-finite gradients".
        sync_free: ``step()`` reads nothing from the device on the host (``None``, default: on when the
            gradients are on an accelerator and no group sets ``foreach=False``; ``True`` forces it, also on
            CPU, where it only costs; ``False``: off). The step counters are tensors on the parameters'
            device incremented by the finite flag, the bias-correction coefficients are computed there, and
            with ``nonfinite="skip"`` every write of the step is masked by that flag (``torch.where``), so a
            skipped step leaves parameters, moments and counters bit for bit as they were without a host
            sync; :attr:`skipped_steps`, :attr:`last_step_skipped` and :meth:`state_dict` read the device
            count when asked (one sync each). Multi-tensor path only (not with ``fused=True`` or
            ``foreach=False``). Still read on the host: ``nonfinite="raise"`` (it must decide whether to
            raise), a tensor ``lr`` (``float(lr)`` every step: pass a Python float). With finite gradients
            the results are those of the ordinary ``foreach`` path, bit for bit (tested on CPU). A skipped
            step's telemetry rows are the previous step's; a skipped first step creates the zero state.

    ``step()`` never modifies ``p.grad``. Per-tensor ‖x‖, ‖u‖ and ratio of the last step:
    :meth:`telemetry`.
    """

    _moment_keys = ("exp_avg", "exp_avg_sq")
    _signature_keys = ("betas", "bias_correction", "weight_decay_mode", "trust_ratio")

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, *, bias_correction: str = "inside",
                 weight_decay_mode: str = "decoupled", trust_ratio: bool | str = True, phi: str = "identity",
                 phi_min: float | None = None, phi_max: float | None = None,
                 max_grad_norm: float | None = None, eps_inside_sqrt: bool = False,
                 grad_averaging: bool = True, nesterov: str | None = None, master_weights: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, nonfinite: str = "skip",
                 sync_free: bool | None = None):
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, low_inclusive=False)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, weight_decay_mode=weight_decay_mode,
                        trust_ratio=trust_ratio, phi=phi, phi_min=phi_min, phi_max=phi_max,
                        max_grad_norm=max_grad_norm, eps_inside_sqrt=eps_inside_sqrt,
                        grad_averaging=grad_averaging, nesterov=nesterov, master_weights=master_weights,
                        foreach=foreach, fused=fused, nonfinite=nonfinite, sync_free=sync_free)
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

    def _step_group(self, group, params, xs, grads, states, *, clip, sharded, trust, ok=None, sync_free=False):
        ms = [local_tensor(s["exp_avg"]) for s in states]
        vs = [local_tensor(s["exp_avg_sq"]) for s in states]
        h = LambHyper.from_group(group)
        coefs = lamb_coefficients(self._advance_steps(states, ok, sync_free), h)
        # sync-free: the multi-tensor path, coefficients on the device, every write masked by ``ok``
        impl = "foreach" if sync_free else self._choose_impl(
            group, [xs, grads, ms, vs], not sharded and self._kernel_eligible(group, xs, grads, ms, vs))
        if impl == "fused":
            return kernel.lamb_step(xs, grads, ms, vs, coefs, trust, h, 1.0 if clip is None else float(clip),
                                    self._scratch)
        extra = {"ok": ok, "on_device": True} if sync_free else {}
        reduce_sq = (lambda sq: self._reduce_sq_norms(sq, params)) if sharded else None
        if impl == "foreach" and not sharded:  # bounded temporaries (sharded norms are reduced all at once)
            return run_in_buckets(multi_tensor_lamb, [xs, grads, ms, vs], [coefs, trust], h, clip, reduce_sq, **extra)
        fn = multi_tensor_lamb if impl == "foreach" else single_tensor_lamb
        return fn(xs, grads, ms, vs, coefs, trust, h, clip, reduce_sq, **extra)


# ---------------------------------------------------------------------------------------- paths
def _lamb_direction(x: Tensor, g: Tensor, m: Tensor, v: Tensor, coef: list[float], h: LambHyper) -> Tensor:
    """Update m and v in place and return the new tensor u (the algorithm box, lines 3-6)."""
    a_m, b_m, a_v, b_v, _ = coef
    if h.l2:
        g = g.add(x, alpha=h.l2)
    m.mul_(h.beta1).add_(g, alpha=h.beta3)
    v.mul_(h.beta2).addcmul_(g, g, value=1.0 - h.beta2)
    m_hat = m * a_m
    if b_m:
        m_hat.add_(g, alpha=b_m)
    v_hat = v * a_v
    if b_v:
        v_hat.addcmul_(g, g, value=b_v)
    denom = v_hat.add_(h.eps).sqrt_() if h.eps_inside_sqrt else v_hat.sqrt_().add_(h.eps)
    u = m_hat.div_(denom)
    if h.wd_in:
        u.add_(x, alpha=h.wd_in)
    return u


def _lamb_apply(x: Tensor, u: Tensor, ratio: Tensor, scale: float, h: LambHyper) -> None:
    """x ← x·(1 − ηλ) [decoupled_outside] − s·r·u   (u is our temporary: scaled in place)."""
    if h.decay_out != 1.0:
        x.mul_(h.decay_out)
    u.mul_(ratio.to(u.dtype) * -scale)
    x.add_(u)


def single_tensor_lamb(xs, grads, ms, vs, coefs: Tensor, trust: Tensor, h: LambHyper, clip: Tensor | None,
                       reduce_sq=None) -> Tensor:
    """The readable path, one tensor at a time; returns [n, 3] (‖x‖, ‖u‖, ratio).

    ``reduce_sq`` (sharded parameters): sums the [n, 2] squared norms over the shards; then every
    direction is kept until all norms are known.
    """
    rows = coefs.tolist()
    out, pending = [], []
    for i, (x, g, m, v) in enumerate(zip(xs, grads, ms, vs)):
        if clip is not None:
            g = g * clip.to(g.dtype)  # never in place: p.grad is the user's
        u = _lamb_direction(x, g, m, v, rows[i], h)
        xn, un = tensor_norm(x), tensor_norm(u)
        if reduce_sq is not None:
            pending.append(u)
            out.append(torch.stack([xn.square(), un.square()]))
            continue
        ratio = h.ratios(xn, un, trust[i])
        _lamb_apply(x, u, ratio, rows[i][4], h)
        out.append(torch.stack([xn, un, ratio]))
    if reduce_sq is None:
        return torch.stack(out)
    norms = reduce_sq(torch.stack(out)).sqrt()
    ratio = h.ratios(norms[:, 0], norms[:, 1], trust)
    for i, (x, u) in enumerate(zip(xs, pending)):
        _lamb_apply(x, u, ratio[i], rows[i][4], h)
    return torch.cat([norms, ratio[:, None]], dim=1)


def multi_tensor_lamb(xs, grads, ms, vs, coefs: Tensor, trust: Tensor, h: LambHyper, clip: Tensor | None,
                      reduce_sq=None, *, ok: Tensor | None = None, on_device: bool = False) -> Tensor:
    """Multi-tensor path (torch._foreach_*): the same maths, a handful of kernel launches per group.

    ``on_device`` (sync-free): the coefficients are used as 0-dim tensors where they are, never read on the
    host; ``ok`` (a 0-dim bool there): every write of m, v and x is masked by it (:mod:`.masked_writes`).
    """
    if on_device:  # in the dtype torch computes a Python scalar in (a float64 0-dim tensor would promote a
        # 0-dim float32 tensor to float64; rounded once, as the scalar would be)
        a_m, b_m, a_v, b_v, _ = (list(c.unbind(0)) for c in coefs.to(norm_dtype(xs[0].dtype)).unbind(1))
    else:
        a_m, b_m, a_v, b_v, _ = (c.tolist() for c in coefs.unbind(1))
    gs = grads
    if clip is not None:
        gs = torch._foreach_mul(gs, clip.to(xs[0].device, xs[0].dtype))
    if h.l2:
        gs = torch._foreach_add(gs, xs, alpha=h.l2)
    masked_writes.mul_add_(ms, h.beta1, gs, h.beta3, ok)
    masked_writes.mul_addcmul_(vs, h.beta2, gs, gs, 1.0 - h.beta2, ok)
    times = masked_writes.times if on_device else torch._foreach_mul
    u = times(ms, a_m)
    if h.nesterov is not None:
        torch._foreach_add_(u, times(gs, b_m))
    denom = times(vs, a_v)
    if h.nesterov == "nn-lamb" and on_device:  # (b_v·g)·g is addcmul's value·g·g, in its order and precision
        wide = [g.to(norm_dtype(g.dtype)) for g in gs] if gs[0].dtype != norm_dtype(gs[0].dtype) else gs
        torch._foreach_addcmul_(denom, torch._foreach_mul(wide, b_v), gs)
    elif h.nesterov == "nn-lamb":
        torch._foreach_addcmul_(denom, gs, gs, b_v)  # type: ignore[arg-type]  # (floats on this branch)
    if h.eps_inside_sqrt:
        torch._foreach_add_(denom, h.eps)
        torch._foreach_sqrt_(denom)
    else:
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, h.eps)
    torch._foreach_div_(u, denom)
    del denom
    if h.wd_in:
        torch._foreach_add_(u, xs, alpha=h.wd_in)
    xn, un = stacked_norms(xs), stacked_norms(u)
    if reduce_sq is not None:
        norms = reduce_sq(torch.stack([xn, un], dim=1).square()).sqrt()
        xn, un = norms[:, 0], norms[:, 1]
    ratio = h.ratios(xn, un, trust)
    scale = coefs[:, 4].to(xs[0].dtype) if on_device else \
        torch.tensor(coefs[:, 4].tolist(), dtype=xs[0].dtype, device=ratio.device)
    step = ratio.to(xs[0].dtype) * -scale.to(ratio.device)
    torch._foreach_mul_(u, list(step.unbind(0)))
    if h.decay_out != 1.0:
        masked_writes.mul_add_(xs, h.decay_out, u, 1.0, ok)
    else:
        masked_writes.add_(xs, u, 1.0, ok)
    return torch.stack([xn, un, ratio], dim=1)
