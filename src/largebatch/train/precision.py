"""Mixed precision: bf16 autocast, bf16 parameters with fp32 master weights, non-finite gradient policy.

- ``"fp32"``: everything in float32.
- ``"bf16-autocast"``: float32 parameters and optimizer, forward passes under ``torch.autocast(bfloat16)``.
- ``"bf16"``: bfloat16 parameters and gradients; ``Lamb``/``Lars`` keep fp32 master weights and fp32
  moments (``master_weights=True``), saved in checkpoints with the rest of the optimizer state.
- ``"fp16"``: float32 parameters, forward under ``torch.autocast(float16)``, the loss scaled by a
  ``torch.amp.GradScaler``; gradients are unscaled BEFORE the optimizer step, so the trust ratio sees true
  gradients (a scaled gradient would leave LAMB's ratio unchanged but break NVLAMB pre-normalisation, L2
  decay and LARS's 2017 form).

Non-finite gradients are detected with ONE reduction over all gradients (no host sync per tensor); the
policy either skips the step (the optimizer's step counters do not advance; the count is logged) or raises.
"""
from __future__ import annotations

import torch
from torch import nn

from ..optim import local_tensor, optimizer_info

PRECISIONS = ("fp32", "bf16-autocast", "bf16", "fp16")
NONFINITE_POLICIES = ("skip", "raise")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid precision: {precision!r} (allowed: {' | '.join(PRECISIONS)})")


def prepare_model(model: nn.Module, precision: str) -> nn.Module:
    check_precision(precision)
    return model.to(torch.bfloat16) if precision == "bf16" else model


def optimizer_overrides(precision: str, optimizer_name: str) -> dict:
    """The flags precision ``"bf16"`` adds: fp32 master weights, for the optimizers the registry says keep them."""
    if precision != "bf16":
        return {}
    if not optimizer_info(optimizer_name).master_weights:
        raise ValueError(f"precision 'bf16' keeps fp32 master weights inside largebatch's Lamb/Lars; "
                         f"{optimizer_name!r} has none (use precision 'bf16-autocast')")
    return {"master_weights": True}


def autocast(precision: str, device_type: str = "cpu"):
    if precision == "bf16-autocast":
        return lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp16":
        return lambda: torch.autocast(device_type, dtype=torch.float16)
    return None


def grad_scaler(precision: str, device_type: str = "cpu"):
    return torch.amp.GradScaler(device_type) if precision == "fp16" else None


def grads_finite(model: nn.Module) -> bool:
    """One fused norm over all gradients and one host sync per step."""
    grads = [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]  # FSDP2: own shard
    if not grads:
        return True
    norms = torch._foreach_norm(grads, 2)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum()))

