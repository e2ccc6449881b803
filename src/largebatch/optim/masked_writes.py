"""Multi-tensor updates written only where a 0-dim flag on the device is set: the sync-free skip.

With ``sync_free`` (docs/algorithms.md, "Non-finite gradients") the optimizer does not read on the host
whether the gradients are finite. It runs the whole step and writes each state tensor with
``torch.where(ok, new, old, out=old)``, so a step whose flag ``ok`` is False leaves every tensor bit for bit
as it was (a NaN in ``new`` is never multiplied by 0: NaN·0 is NaN), and nothing waits for the device.
This is what torch's ``_fused_adamw_`` does with its ``found_inf`` argument inside its kernel.

Each function here is ``dst ← f(dst, ...)`` done in place when ``ok`` is None (the ordinary path) and aside
then written where ``ok`` otherwise; both compute the same operations in the same order, so the values
written are bit-identical (tests/test_optim_sync_free.py).
"""
from __future__ import annotations

import torch
from torch import Tensor


def masked_copy_(dst: list[Tensor], new: list[Tensor], ok: Tensor) -> None:
    """dst[i] ← new[i] where the 0-dim bool ``ok`` is set; dst unchanged, bit for bit, where it is not."""
    for d, n in zip(dst, new):
        torch.where(ok, n, d, out=d)


def mul_add_(dst: list[Tensor], a: float, src: list[Tensor], b: float, ok: Tensor | None) -> None:
    """dst ← a·dst + b·src (a moment update: m ← β1·m + β3·g)."""
    if ok is None:
        torch._foreach_mul_(dst, a)
        torch._foreach_add_(dst, src, alpha=b)
        return
    new = torch._foreach_mul(dst, a)
    torch._foreach_add_(new, src, alpha=b)
    masked_copy_(dst, new, ok)


def mul_addcmul_(dst: list[Tensor], a: float, t1: list[Tensor], t2: list[Tensor], value: float,
                 ok: Tensor | None) -> None:
    """dst ← a·dst + value·t1·t2 (LAMB's v ← β2·v + (1−β2)·g²)."""
    if ok is None:
        torch._foreach_mul_(dst, a)
        torch._foreach_addcmul_(dst, t1, t2, value=value)
        return
    new = torch._foreach_mul(dst, a)
    torch._foreach_addcmul_(new, t1, t2, value=value)
    masked_copy_(dst, new, ok)


def add_(dst: list[Tensor], src: list[Tensor], alpha: float, ok: Tensor | None) -> None:
    """dst ← dst + alpha·src (the parameter update)."""
    if ok is None:
        torch._foreach_add_(dst, src, alpha=alpha)
    else:
        masked_copy_(dst, torch._foreach_add(dst, src, alpha=alpha), ok)
