"""The optimizer step inside the backward pass: each tensor is updated as soon as its gradient is complete.

LAMB's and LARS's trust ratios are per tensor, so without a global gradient norm a tensor's update needs
its own gradient and nothing else. ``step_in_backward(model, optimizer)`` registers
``Tensor.register_post_accumulate_grad_hook`` on every parameter of the optimizer: when autograd has
accumulated a parameter's gradient, the hook calls ``optimizer.step_params([p])`` and frees ``p.grad``.
So a run never holds a full set of gradients (peak memory falls by up to their size), and the update reads
the gradient while it is still in cache. The result is the ordinary step's, bit for bit (tested): every
operation that reads a parameter's value in the backward pass is a predecessor of that parameter's
gradient accumulation, so the parameter is updated only after its last use (and autograd's version
counters would raise, not silently differ, if it were not).

With gradient accumulation, run the backward passes of all micro-batches but the last under
``handle.accumulating()``: their gradients accumulate as usual, and the last backward steps.

Refused, with the option named:

- ``max_grad_norm`` (NVLAMB's global pre-normalisation) and the optimizer's ``nonfinite="skip"`` (the
  default: pass ``nonfinite="raise"``, which checks each gradient before its tensor is stepped and raises
  naming it, or ``"propagate"``); in a training loop also global-norm gradient clipping and fp16's
  GradScaler. Each needs every gradient before the first tensor may change.
- DDP and FSDP2 (a process group of more than one process): a parameter's gradient is complete locally
  before it is all-reduced (DDP) or reduce-scattered (FSDP2) in buckets by the wrapper's own hooks, so a
  hook would step on the local gradient; exactness would need the step to wait for each bucket's
  communication, which this does not implement.
- optimizers other than largebatch's ``Lamb`` and ``Lars`` (they have no ``step_params``).

Other torch machinery that wraps ``optimizer.step()`` (``torch.optim.lr_scheduler``'s step-order warning,
step hooks) does not see these steps; largebatch's ``ScheduledLR`` sets the LR of the groups, which the
hooks read, so call it before the backward pass that steps.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch
from torch import nn

from ._base import TrustRatioOptimizer, check_subset_step


class StepInBackward:
    """Handle returned by :func:`step_in_backward`."""

    def __init__(self, optimizer: TrustRatioOptimizer, params: list[torch.Tensor]):
        self.optimizer = optimizer
        self.stepping = True
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_one) for p in params]

    def _step_one(self, param: torch.Tensor) -> None:
        if not self.stepping:
            return
        self.optimizer.step_params([param])
        param.grad = None

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients (the micro-batches before the last)."""
        previous, self.stepping = self.stepping, False
        try:
            yield
        finally:
            self.stepping = previous

    def remove(self) -> None:
        """Back to the ordinary behaviour: ``loss.backward()`` keeps the gradients, ``optimizer.step()`` steps."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def active(self) -> bool:
        return bool(self._hooks)


def _distributed_reason(model: nn.Module, params: list[torch.Tensor]) -> str | None:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "the model is wrapped in DistributedDataParallel"
    if any(getattr(p, "placements", None) is not None for p in params):
        return "the parameters are DTensors (FSDP2 / tensor parallel)"
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"a process group of {dist.get_world_size()} processes is initialised"
    return None


def step_in_backward(model: nn.Module, optimizer: torch.optim.Optimizer) -> StepInBackward:
    """Step ``optimizer`` inside ``loss.backward()``, tensor by tensor, freeing each gradient at once.

    ``model``: the module whose backward passes run (checked for DDP/FSDP2 wrappers); ``optimizer``: a
    largebatch ``Lamb`` or ``Lars`` over (some of) its parameters, with ``nonfinite="raise"`` or
    ``"propagate"``. Returns a handle whose ``remove()`` restores the ordinary behaviour and whose
    ``accumulating()`` context skips the step (gradient accumulation). See the module docstring for what
    is refused and why.
    """
    if not callable(getattr(optimizer, "step_params", None)):
        raise TypeError(f"step_in_backward needs an optimizer with step_params() (largebatch Lamb or Lars); "
                        f"got {type(optimizer).__name__}")
    try:
        check_subset_step(optimizer.defaults)
    except ValueError as exc:
        raise ValueError(f"step_in_backward: {exc}") from None
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    reason = _distributed_reason(model, params)
    if reason is not None:
        raise ValueError(f"step_in_backward does not support distributed training ({reason}): a gradient is "
                         "complete locally before DDP/FSDP2 reduce it across processes, so a step there would "
                         "use the local gradient; train without step_in_backward")
    return StepInBackward(cast(TrustRatioOptimizer, optimizer), params)  # it has step_params (checked above)
