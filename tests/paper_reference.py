"""Paper-literal float64 reference of LAMB (Algorithm 2) and LARS (Algorithm 1), with every flag.

Written from the equations in SPEC §1–3 / docs/algorithms.md, one tensor at a time, in plain float64
torch ops, with no code shared with the package. Slow on purpose; the tests pin every fast path to it.
"""
from __future__ import annotations

import math

import torch


def _phi_ratio(xn: float, un: float, phi: str, lo, hi) -> float:
    """φ(‖x‖)/‖u‖ with the zero-norm rule (ratio 1 if either norm is 0)."""
    if xn == 0.0 or un == 0.0:
        return 1.0
    if phi == "identity":
        return xn / un
    if phi == "clamp_norm":
        z = xn
        if lo is not None:
            z = max(z, lo)
        if hi is not None:
            z = min(z, hi)
        return z / un
    r = xn / un
    if phi == "clamp_ratio":
        if lo is not None:
            r = max(r, lo)
        if hi is not None:
            r = min(r, hi)
        return r
    if phi == "cap_ratio":
        return min(r, 1.0)
    raise ValueError(phi)


class ReferenceLamb:
    """State: per tensor m, v (float64) and its own step t (only advanced when it has a gradient)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 bias_correction="inside", weight_decay_mode="decoupled", trust_ratio=True, phi="identity",
                 phi_min=None, phi_max=None, max_grad_norm=None, eps_inside_sqrt=False, grad_averaging=True,
                 nesterov=None):
        self.x = [p.detach().to(torch.float64).clone() for p in params]
        self.h = dict(lr=lr, b1=betas[0], b2=betas[1], eps=eps, wd=weight_decay, bc=bias_correction,
                      wdm=weight_decay_mode, trust=trust_ratio, phi=phi, lo=phi_min, hi=phi_max,
                      mgn=max_grad_norm, eps_in=eps_inside_sqrt, avg=grad_averaging, nest=nesterov)
        self.m = [torch.zeros_like(x) for x in self.x]
        self.v = [torch.zeros_like(x) for x in self.x]
        self.t = [0] * len(self.x)
        self.norms = [None] * len(self.x)
        self.wd_of = [weight_decay] * len(self.x)       # per-tensor λ (groups)
        self.trust_of = [trust_ratio] * len(self.x)     # per-tensor trust-ratio mode (groups)

    def step(self, grads, lr=None):
        h = self.h
        lr = h["lr"] if lr is None else lr
        b1, b2 = h["b1"], h["b2"]
        b3 = (1 - b1) if h["avg"] else 1.0
        gs = [None if g is None else g.to(torch.float64) for g in grads]
        if h["mgn"] is not None:
            # NVLAMB: divide every gradient by max(1, ‖g‖_global / max_grad_norm)
            total = math.sqrt(sum(float((g * g).sum()) for g in gs if g is not None))
            gs = [None if g is None else g / max(1.0, total / h["mgn"]) for g in gs]
        for i, g in enumerate(gs):
            if g is None:
                continue
            x, wd = self.x[i], self.wd_of[i]
            self.t[i] += 1
            t = self.t[i]
            if h["wdm"] == "l2":
                g = g + wd * x
            self.m[i] = b1 * self.m[i] + b3 * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            m, v = self.m[i], self.v[i]
            if h["bc"] == "inside":
                c1, c2, c1n, c2n = 1 - b1 ** t, 1 - b2 ** t, 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
            else:
                c1 = c2 = c1n = c2n = 1.0
            if h["nest"] is None:
                m_hat = m / c1
            else:  # NAdam look-ahead (Dozat 2016)
                m_hat = b1 * m / c1n + b3 * g / c1
            if h["nest"] == "nn-lamb":
                v_hat = b2 * v / c2n + (1 - b2) * g * g / c2
            else:
                v_hat = v / c2
            denom = torch.sqrt(v_hat + h["eps"]) if h["eps_in"] else torch.sqrt(v_hat) + h["eps"]
            r = m_hat / denom
            u = r + wd * x if h["wdm"] == "decoupled" else r
            xn, un = float(torch.sqrt((x * x).sum())), float(torch.sqrt((u * u).sum()))
            mode = self.trust_of[i]
            use = mode is True or (mode == "decayed" and wd != 0)
            ratio = _phi_ratio(xn, un, h["phi"], h["lo"], h["hi"]) if use else 1.0
            scale = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if h["bc"] == "step_size" else lr
            new = x - scale * ratio * u
            if h["wdm"] == "decoupled_outside":
                new = new - lr * wd * x
            self.x[i] = new
            self.norms[i] = (xn, un, ratio)


class ReferenceLars:
    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.01, mode="paper", trust_coefficient=0.001,
                 larc_clip=False, eps=1e-8, nesterov=False, grad_averaging=True, trust_ratio=True,
                 phi="identity", phi_min=None, phi_max=None, max_grad_norm=None):
        self.x = [p.detach().to(torch.float64).clone() for p in params]
        self.h = dict(lr=lr, mom=momentum, wd=weight_decay, mode=mode, tc=trust_coefficient, clip=larc_clip,
                      eps=eps, nest=nesterov, avg=grad_averaging, trust=trust_ratio, phi=phi, lo=phi_min,
                      hi=phi_max, mgn=max_grad_norm)
        self.buf = [torch.zeros_like(x) for x in self.x]
        self.norms = [None] * len(self.x)
        self.wd_of = [weight_decay] * len(self.x)
        self.trust_of = [trust_ratio] * len(self.x)

    def step(self, grads, lr=None):
        h = self.h
        lr = h["lr"] if lr is None else lr
        mom = h["mom"]
        b3 = (1 - mom) if h["avg"] else 1.0
        gs = [None if g is None else g.to(torch.float64) for g in grads]
        if h["mgn"] is not None:
            total = math.sqrt(sum(float((g * g).sum()) for g in gs if g is not None))
            gs = [None if g is None else g / max(1.0, total / h["mgn"]) for g in gs]
        for i, g in enumerate(gs):
            if g is None:
                continue
            x, wd = self.x[i], self.wd_of[i]
            mode = self.trust_of[i]
            use = mode is True or (mode == "decayed" and wd != 0)
            xn = float(torch.sqrt((x * x).sum()))
            if h["mode"] == "paper":
                d = g + wd * x
                self.buf[i] = mom * self.buf[i] + b3 * d          # Algorithm 1: decay inside the momentum
                u = mom * self.buf[i] + b3 * d if h["nest"] else self.buf[i]
                un = float(torch.sqrt((u * u).sum()))
                ratio = _phi_ratio(xn, un, h["phi"], h["lo"], h["hi"]) if use else 1.0
                self.x[i] = x - lr * ratio * u
                self.norms[i] = (xn, un, ratio)
            else:
                gn = float(torch.sqrt((g * g).sum()))
                if not use or xn == 0.0 or gn == 0.0:
                    local = 1.0
                else:
                    local = h["tc"] * xn / (gn + wd * xn + h["eps"])   # You, Gitman & Ginsburg 2017
                    if h["clip"]:
                        local = min(local / lr, 1.0)                   # LARC
                d = local * (g + wd * x)
                self.buf[i] = mom * self.buf[i] + d
                step = d + mom * self.buf[i] if h["nest"] else self.buf[i]
                self.x[i] = x - lr * step
                self.norms[i] = (xn, gn, local)
