"""Norms, the trust ratio φ(‖x‖)/‖u‖, the zero-norm rule and the trust mask, as small pure functions.

The maths is in docs/algorithms.md ("LAMB", "LARS", "The trust ratio"). Everything here works
elementwise on *stacked* norms (one entry per parameter tensor), so one call serves a whole parameter
group and nothing needs a host sync. The C kernel (``csrc/largebatch_kernels.c``) implements the same
rules per tensor; the tests pin the two together.
"""
from __future__ import annotations


import torch
from torch import Tensor

#: φ variants. "identity" is the paper's default and every official implementation's.
PHI_CHOICES = ("identity", "clamp_norm", "clamp_ratio", "cap_ratio")
#: per group: every tensor gets a ratio (paper) / none / only when the group's weight decay is not 0
TRUST_RATIO_CHOICES = (True, False, "decayed")


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms accumulate in at least float32: bf16 norms would be too coarse for the ratio."""
    return torch.promote_types(dtype, torch.float32)


def tensor_norm(t: Tensor) -> Tensor:
    """‖t‖₂ of one tensor, as a 0-dim tensor of :func:`norm_dtype`."""
    return torch.linalg.vector_norm(t, dtype=norm_dtype(t.dtype))


def stacked_norms(ts: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """‖t‖₂ of every tensor of a list (one dtype and device), stacked: one multi-tensor launch."""
    return torch.stack(torch._foreach_norm(ts, 2, dtype=norm_dtype(ts[0].dtype)))


def nonzero_norms(param_norm: Tensor, other_norm: Tensor) -> Tensor:
    """The zero-norm rule's condition: a ratio is taken only where both norms are > 0 (on the raw norms).

    Without it zero-initialised biases and LayerNorm β would never move.
    """
    return (param_norm > 0) & (other_norm > 0)


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
    """φ(‖x‖)/‖u‖ per tensor, with the zero-norm rule (1 when ‖x‖ = 0 or ‖u‖ = 0).

    - ``identity``:    ‖x‖ / ‖u‖
    - ``clamp_norm``:  clamp(‖x‖, phi_min, phi_max) / ‖u‖      (the paper's clipped φ; torch-optimizer uses [0, 10])
    - ``clamp_ratio``: clamp(‖x‖ / ‖u‖, phi_min, phi_max)
    - ``cap_ratio``:   min(‖x‖ / ‖u‖, 1)                        ("LAMBC", timm's ``trust_clip``)
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
    return torch.where(nonzero_norms(param_norm, update_norm), ratio, torch.ones_like(ratio))


def masked(ratio: Tensor, trust: Tensor) -> Tensor:
    """The ratio where the trust mask is set, 1 elsewhere (tensors excluded from the trust ratio)."""
    return torch.where(trust, ratio, torch.ones_like(ratio))


def trust_mask(mode: bool | str, weight_decay: float, n: int, device: torch.device) -> Tensor:
    """Which of a group's ``n`` tensors get a trust ratio: ``mode`` True / False / ``"decayed"`` (only
    when the group's weight decay is not 0, as apex FusedLAMB and timm do)."""
    on = mode is True or (mode == "decayed" and weight_decay != 0)
    return torch.full((n,), on, dtype=torch.bool, device=device)


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
    return torch.where(nonzero_norms(param_norm, grad_norm), local, torch.ones_like(local))
