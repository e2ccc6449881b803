"""Paper-literal float64 references of LAMB (Algorithm 2) and LARS (Algorithm 1) with every flag.

Written from the equations in docs/algorithms.md ("LAMB", "LARS", "The trust ratio") (and the flag contract in the ``Lamb``/``Lars``
docstrings), not from the implementation: plain Python loops over tensors, one line per equation, no
in-place tricks, no fused or multi-tensor code. Slow on purpose. Each reference keeps its own state
(per-tensor step counter and moments) and steps a list of float64 tensors given their gradients.

Usage::

    ref = ReferenceLamb([{"params": [x0, x1], "weight_decay": 0.01}], lr=1e-3, phi="cap_ratio")
    ref.step([[g0, None]])        # one list of gradients per group; None = no gradient (tensor skipped)
    ref.groups[0]["params"][0]    # the updated float64 tensor
    ref.norms[(0, 0)]             # (‖x‖, ‖u‖, trust ratio) of the last step, as Python floats
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def _norm(t: torch.Tensor) -> float:
    """ℓ2 norm over the flattened tensor (docs/algorithms.md: norms are ℓ2 over the flattened tensor)."""
    return math.sqrt(float((t.to(F64) ** 2).sum()))


def phi_ratio(param_norm: float, update_norm: float, phi: str, phi_min, phi_max) -> float:
    """φ(‖x‖)/‖u‖ with the zero-norm rule (docs/algorithms.md, "The trust ratio"): 1 when ‖x‖ == 0 or ‖u‖ == 0, checked on raw norms."""
    if param_norm == 0.0 or update_norm == 0.0:
        return 1.0

    def clamp(z):
        if phi_min is not None:
            z = max(z, phi_min)
        if phi_max is not None:
            z = min(z, phi_max)
        return z

    if phi == "identity":
        return param_norm / update_norm
    if phi == "clamp_norm":          # the paper's clipped φ applied to ‖x‖ (torch-optimizer: [0, 10])
        return clamp(param_norm) / update_norm
    if phi == "clamp_ratio":         # the ratio itself clipped
        return clamp(param_norm / update_norm)
    if phi == "cap_ratio":           # LAMBC / timm trust_clip
        return min(param_norm / update_norm, 1.0)
    raise ValueError(phi)


def _trust_on(trust_ratio, weight_decay: float) -> bool:
    """trust_ratio=True: every tensor; False: none; "decayed": tensors whose group λ != 0 (docs/algorithms.md, "The trust ratio")."""
    if trust_ratio == "decayed":
        return weight_decay != 0
    return bool(trust_ratio)


class _Reference:
    defaults: dict = {}

    def __init__(self, groups, **options):
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise TypeError(f"unknown options {unknown}")
        self.options = {**self.defaults, **options}
        if not isinstance(groups[0], dict):
            groups = [{"params": list(groups)}]
        self.groups = []
        for g in groups:
            group = {**self.options, **{k: v for k, v in g.items() if k != "params"}}
            group["params"] = [p.detach().to(F64).clone() for p in g["params"]]
            self.groups.append(group)
        self.state: dict[tuple[int, int], dict] = {}
        self.norms: dict[tuple[int, int], tuple[float, float, float]] = {}

    def _clip_factor(self, grads) -> float:
        """NVLAMB pre-normalisation (docs/algorithms.md, `max_grad_norm`): g ← g / max(1, G/max_grad_norm), G the global ℓ2 norm
        over ALL gradients of ALL groups, taken before any L2 decay is added."""
        max_norm = self.options["max_grad_norm"]
        if max_norm is None:
            return 1.0
        total = 0.0
        for group_grads in grads:
            for g in group_grads:
                if g is not None:
                    total += _norm(g) ** 2
        global_norm = math.sqrt(total)
        return 1.0 / max(1.0, global_norm / max_norm)

    def step(self, grads):
        """grads: one list per group (same order as the params); ``None`` entries are skipped."""
        clip = self._clip_factor(grads)
        self.norms = {}
        for gi, (group, group_grads) in enumerate(zip(self.groups, grads)):
            for pi, (x, g) in enumerate(zip(group["params"], group_grads)):
                if g is None:
                    continue  # no gradient: no update, and the step counter does not advance
                g = g.detach().to(F64) * clip
                state = self.state.setdefault((gi, pi), self._init_state(x))
                state["step"] += 1
                new_x, norms = self._update(x, g, state, group)
                group["params"][pi] = new_x
                self.norms[(gi, pi)] = norms


class ReferenceLamb(_Reference):
    """LAMB, Algorithm 2 plus the variants of docs/algorithms.md as flags."""

    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction="inside",
                    weight_decay_mode="decoupled", trust_ratio=True, phi="identity", phi_min=None,
                    phi_max=None, max_grad_norm=None, eps_inside_sqrt=False, grad_averaging=True,
                    nesterov=None)

    @staticmethod
    def _init_state(x):
        return {"step": 0, "m": torch.zeros_like(x), "v": torch.zeros_like(x)}

    def _update(self, x, g, state, o):
        b1, b2 = o["betas"]
        b3 = (1 - b1) if o["grad_averaging"] else 1.0
        lam, lr, t = o["weight_decay"], o["lr"], state["step"]
        if o["weight_decay_mode"] == "l2":
            g = g + lam * x                                   # L2: decay enters the gradient
        m = b1 * state["m"] + b3 * g                          # m_t = β1 m + (1-β1) g
        v = b2 * state["v"] + (1 - b2) * g * g                # v_t = β2 v + (1-β2) g²
        state["m"], state["v"] = m, v

        if o["bias_correction"] == "inside":
            def c1(k): return 1 - b1 ** k
            def c2(k): return 1 - b2 ** k
        else:
            def c1(k): return 1.0
            def c2(k): return 1.0
        if o["nesterov"] is None:
            m_hat = m / c1(t)                                 # m̂ = m/(1-β1^t)
        else:                                                 # N-LAMB (Dozat 2016, NAdam form)
            m_hat = b1 * m / c1(t + 1) + b3 * g / c1(t)
        if o["nesterov"] == "nn-lamb":                        # NN-LAMB: same on v
            v_hat = b2 * v / c2(t + 1) + (1 - b2) * g * g / c2(t)
        else:
            v_hat = v / c2(t)                                 # v̂ = v/(1-β2^t)

        if o["eps_inside_sqrt"]:
            r = m_hat / torch.sqrt(v_hat + o["eps"])
        else:
            r = m_hat / (torch.sqrt(v_hat) + o["eps"])        # r = m̂/(√v̂ + ε)
        u = r + lam * x if o["weight_decay_mode"] == "decoupled" else r   # u = r + λx (paper)

        x_norm, u_norm = _norm(x), _norm(u)
        if _trust_on(o["trust_ratio"], lam):
            ratio = phi_ratio(x_norm, u_norm, o["phi"], o["phi_min"], o["phi_max"])
        else:
            ratio = 1.0
        s = math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if o["bias_correction"] == "step_size" else 1.0
        new_x = x - lr * s * ratio * u                        # x ← x − η φ(‖x‖)/‖u‖ u
        if o["weight_decay_mode"] == "decoupled_outside":
            new_x = new_x - lr * lam * x                      # decay outside the ratio, from x_t
        return new_x, (x_norm, u_norm, ratio)


class ReferenceLars(_Reference):
    """LARS: Algorithm 1 of the 2020 paper (mode "paper") and the 2017 / LARC form (mode "2017").

    Paper:  d = g + λx;  m = β1 m + β3 d;  u = m  (nesterov: β1 m + β3 d);  x ← x − η ratio(x, u) u.
    2017:   d = g + λx;  local = tc‖x‖/(‖g‖ + λ‖x‖ + ε) (1 if ‖x‖ = 0 or ‖g‖ = 0; LARC: min(local/η, 1));
            buf = μ buf + local d  (buf starts at 0);  x ← x − η buf  (nesterov: x ← x − η (local d + μ buf)).
    Telemetry of the 2017 form: (‖x‖, ‖g‖, local).
    """

    defaults = dict(lr=1e-3, momentum=0.9, weight_decay=0.01, mode="paper", trust_coefficient=0.001,
                    larc_clip=False, eps=1e-8, nesterov=False, grad_averaging=True, trust_ratio=True,
                    phi="identity", phi_min=None, phi_max=None, max_grad_norm=None)

    @staticmethod
    def _init_state(x):
        return {"step": 0, "buf": torch.zeros_like(x)}

    def _update(self, x, g, state, o):
        lam, lr, mu = o["weight_decay"], o["lr"], o["momentum"]
        d = g + lam * x
        trust = _trust_on(o["trust_ratio"], lam)
        if o["mode"] == "paper":
            b3 = (1 - mu) if o["grad_averaging"] else 1.0
            m = mu * state["buf"] + b3 * d                    # m_t = β1 m + (1-β1)(g + λx)
            state["buf"] = m
            u = mu * m + b3 * d if o["nesterov"] else m
            x_norm, u_norm = _norm(x), _norm(u)
            ratio = phi_ratio(x_norm, u_norm, o["phi"], o["phi_min"], o["phi_max"]) if trust else 1.0
            return x - lr * ratio * u, (x_norm, u_norm, ratio)
        x_norm, g_norm = _norm(x), _norm(g)
        if not trust or x_norm == 0.0 or g_norm == 0.0:
            local = 1.0
        else:
            local = o["trust_coefficient"] * x_norm / (g_norm + lam * x_norm + o["eps"])
            if o["larc_clip"]:
                local = min(local / lr, 1.0)
        buf = mu * state["buf"] + local * d
        state["buf"] = buf
        step = local * d + mu * buf if o["nesterov"] else buf
        return x - lr * step, (x_norm, g_norm, local)
