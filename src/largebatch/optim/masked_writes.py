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

#: what torch's multi-tensor ops accept (a tuple is what they return)
Tensors = list[Tensor] | tuple[Tensor, ...]


def masked_copy_(dst: Tensors, new: Tensors, ok: Tensor) -> None:
    """dst[i] ← new[i] where the 0-dim bool ``ok`` is set; dst unchanged, bit for bit, where it is not.
    ``new`` is cast to dst's dtype first, as an in-place op casts its result (a 0-dim bf16 tensor plus a 0-dim
    float32 one is float32)."""
    for d, n in zip(dst, new):
        torch.where(ok, n if n.dtype == d.dtype else n.to(d.dtype), d, out=d)


def scaled_copy(dst: Tensors, a: float) -> list[Tensor]:
    """a·dst as new tensors, rounded exactly as the in-place ``torch._foreach_mul_(dst, a)``: on CPU that op
    rounds a Python scalar to a bf16/fp16 list's dtype first and the out-of-place one does not, so
    low-precision lists are copied and scaled in place (one more pass over them)."""
    if dst[0].dtype not in (torch.bfloat16, torch.float16):
        return list(torch._foreach_mul(dst, a))
    new = [torch.empty_like(d) for d in dst]
    torch._foreach_copy_(new, dst)
    torch._foreach_mul_(new, a)
    return new


def mul_add_(dst: Tensors, a: float, src: Tensors, b: float, ok: Tensor | None) -> None:
    """dst ← a·dst + b·src (a moment update: m ← β1·m + β3·g)."""
    new = dst if ok is None else scaled_copy(dst, a)
    if ok is None:
        torch._foreach_mul_(dst, a)
    torch._foreach_add_(new, src, alpha=b)
    if ok is not None:
        masked_copy_(dst, new, ok)


def mul_addcmul_(dst: Tensors, a: float, t1: Tensors, t2: Tensors, value: float,
                 ok: Tensor | None) -> None:
    """dst ← a·dst + value·t1·t2 (LAMB's v ← β2·v + (1−β2)·g²)."""
    new = dst if ok is None else scaled_copy(dst, a)
    if ok is None:
        torch._foreach_mul_(dst, a)
    torch._foreach_addcmul_(new, t1, t2, value=value)
    if ok is not None:
        masked_copy_(dst, new, ok)


def add_(dst: Tensors, src: Tensors, alpha: float, ok: Tensor | None) -> None:
    """dst ← dst + alpha·src (the parameter update)."""
    if ok is None:
        torch._foreach_add_(dst, src, alpha=alpha)
    else:
        masked_copy_(dst, torch._foreach_add(dst, src, alpha=alpha), ok)


def times(ts: Tensors, coefs: Tensors) -> list[Tensor]:
    """ts[i]·coefs[i] (0-dim tensors) as new tensors of ts' dtype, as with Python scalars: a 0-dim coefficient
    would otherwise promote a 0-dim bf16 tensor to its own dtype."""
    out = torch._foreach_mul(ts, coefs)
    return [o if o.dtype == t.dtype else o.to(t.dtype) for o, t in zip(out, ts)]
