"""The trust ratio φ(‖x‖)/‖u‖ as small pure functions (SPEC §1, §3).

Everything here works elementwise on *stacked* norms (one entry per parameter tensor), so one call
serves a whole parameter group and nothing needs a host sync.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: φ variants. "identity" is the paper's default and every official implementation's.
PHI_CHOICES = ("identity", "clamp_norm", "clamp_ratio", "cap_ratio")


def _clamp(t: Tensor, lo: float | None, hi: float | None) -> Tensor:
    if lo is None and hi is None:
        return t
    return t.clamp(min=lo, max=hi)


def trust_ratio(
    param_norm: Tensor,
    update_norm: Tensor,
    *,
    phi: str = "identity",
    phi_min: float | None = None,
    phi_max: float | None = None,
) -> Tensor:
    """φ(‖x‖)/‖u‖ per tensor, with the zero-norm rule.

    - ``identity``:    ‖x‖ / ‖u‖
    - ``clamp_norm``:  clamp(‖x‖, phi_min, phi_max) / ‖u‖      (the paper's clipped φ; torch-optimizer uses [0, 10])
    - ``clamp_ratio``: clamp(‖x‖ / ‖u‖, phi_min, phi_max)
    - ``cap_ratio``:   min(‖x‖ / ‖u‖, 1)                        ("LAMBC", timm's ``trust_clip``)

    Zero-norm rule (SPEC §1): the ratio is 1 when ‖x‖ = 0 or ‖u‖ = 0, checked on the raw norms.
    Without it zero-initialised biases and LayerNorm β would never move.
    """
    if phi == "clamp_norm":
        ratio = _clamp(param_norm, phi_min, phi_max) / update_norm
    else:
        ratio = param_norm / update_norm
        if phi == "clamp_ratio":
            ratio = _clamp(ratio, phi_min, phi_max)
        elif phi == "cap_ratio":
            ratio = ratio.clamp(max=1.0)
        elif phi != "identity":
            raise ValueError(f"phi must be one of {PHI_CHOICES}, got {phi!r}")
    nonzero = (param_norm > 0) & (update_norm > 0)
    return torch.where(nonzero, ratio, torch.ones_like(ratio))


def lars_2017_local_lr(
    param_norm: Tensor,
    grad_norm: Tensor,
    *,
    trust_coefficient: float,
    weight_decay: float,
    eps: float,
    lr: float,
    larc_clip: bool,
) -> Tensor:
    """Local LR multiplier of You, Gitman & Ginsburg 2017 (and NVIDIA's LARC).

    local = η_tc·‖w‖ / (‖g‖ + λ‖w‖ + ε); 1 when ‖w‖ = 0 or ‖g‖ = 0.
    With ``larc_clip`` the multiplier is min(local / lr, 1), so the effective step is min(local, lr).
    """
    local = trust_coefficient * param_norm / (grad_norm + weight_decay * param_norm + eps)
    if larc_clip:
        local = (local / lr).clamp(max=1.0)
    nonzero = (param_norm > 0) & (grad_norm > 0)
    return torch.where(nonzero, local, torch.ones_like(local))
