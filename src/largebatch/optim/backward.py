"""The optimizer step inside the backward pass: each tensor is updated once its gradient is complete.

LAMB's and LARS's trust ratios are per tensor, so without a global gradient norm a tensor's update needs
its own gradient and nothing else. ``step_in_backward(model, optimizer)`` registers
``Tensor.register_post_accumulate_grad_hook`` on every parameter of the optimizer: when autograd has
accumulated a parameter's gradient, the hook adds it to a bucket; once the bucket's gradients reach
``bucket_bytes`` (default 25 MiB, DDP's bucket) one ``optimizer.step_params(bucket)`` call steps them and
frees their ``.grad``, and the rest are stepped at the end of the backward pass (autograd's end-of-backward
callback, queued by the pass's first hook, as DDP does). ``bucket_bytes=0`` steps each tensor alone in its
hook. A backward pass that raises drops its bucket: those tensors are not stepped and their gradients are
freed, so the next pass starts clean (docs/step_in_backward.md, "Buckets").

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
import weakref
from collections.abc import Iterator
from typing import cast

import torch
from torch import nn

from ._base import TrustRatioOptimizer, check_subset_step


#: default ``bucket_bytes``: DDP's default bucket (``bucket_cap_mb=25``), the most gradient memory held back
DEFAULT_BUCKET_BYTES = 25 * 2**20


class _Bucket:
    """The ready parameters of one backward pass, not yet stepped. Queued as that pass's end-of-backward
    callback, so autograd's graph task owns it: a pass that raises drops it (the callback never runs)."""

    def __init__(self, handle: StepInBackward):
        self.handle = handle
        self.params: list[torch.Tensor] = []
        self.nbytes = 0
        self.closed = False

    def __call__(self) -> None:  # autograd's end-of-backward callback
        self.handle._flush(self)
        self.closed = True


def _drop_grads(params: list[torch.Tensor]) -> None:
    """A backward pass died with these tensors' steps pending: forget their gradients (not stepped), so that
    the next pass does not accumulate onto them."""
    for p in params:
        p.grad = None
    params.clear()


class StepInBackward:
    """Handle returned by :func:`step_in_backward`."""

    def __init__(self, optimizer: TrustRatioOptimizer, params: list[torch.Tensor], bucket_bytes: int):
        self.optimizer = optimizer
        self.bucket_bytes = bucket_bytes
        self.stepping = True
        self._bucket: weakref.ref[_Bucket] | None = None
        hook = self._step_one if bucket_bytes == 0 else self._collect
        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in params]

    def _step_one(self, param: torch.Tensor) -> None:
        if not self.stepping:
            return
        self.optimizer.step_params([param])
        param.grad = None

    def _collect(self, param: torch.Tensor) -> None:
        """Add ``param`` (its gradient complete) to this backward pass's bucket; step the bucket when full."""
        if not self.stepping:
            return
        bucket = self._bucket() if self._bucket is not None else None
        if bucket is None or bucket.closed:  # the first ready parameter of this backward pass
            bucket = _Bucket(self)
            torch.autograd.Variable._execution_engine.queue_callback(bucket)
            weakref.finalize(bucket, _drop_grads, bucket.params)  # the pass raised: no stale gradients
            self._bucket = weakref.ref(bucket)
        grad = cast(torch.Tensor, param.grad)
        bucket.params.append(param)
        bucket.nbytes += grad.numel() * grad.element_size()
        if bucket.nbytes >= self.bucket_bytes:
            self._flush(bucket)

    def _flush(self, bucket: _Bucket) -> None:
        """Step the bucket's parameters with one ``step_params`` call and free their gradients; if the step
        raises (``nonfinite="raise"``), their gradients are dropped and the bucket is closed."""
        params, bucket.nbytes = list(bucket.params), 0
        bucket.params.clear()
        try:
            if params:
                self.optimizer.step_params(params)
        except BaseException:
            bucket.closed = True
            _drop_grads(params)
            raise
        for p in params:
            p.grad = None

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


def step_in_backward(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                     bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> StepInBackward:
    """Step ``optimizer`` inside ``loss.backward()``, as soon as the gradients are complete, freeing them.

    ``model``: the module whose backward passes run (checked for DDP/FSDP2 wrappers); ``optimizer``: a
    largebatch ``Lamb`` or ``Lars`` over (some of) its parameters, with ``nonfinite="raise"`` or
    ``"propagate"``. Returns a handle whose ``remove()`` restores the ordinary behaviour and whose
    ``accumulating()`` context skips the step (gradient accumulation). ``bucket_bytes``: ready parameters
    are collected until their gradients reach this many bytes, then stepped with one ``step_params`` call
    (the rest at the end of the backward pass); 0 steps each tensor alone as soon as it is ready. See the
    module docstring for what is refused and why.
    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int):
        raise TypeError(f"Invalid bucket_bytes: {bucket_bytes!r} (allowed: an int >= 0)")
    if bucket_bytes < 0:
        raise ValueError(f"Invalid bucket_bytes: {bucket_bytes} (allowed: >= 0; 0 steps each tensor alone)")
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
    return StepInBackward(cast(TrustRatioOptimizer, optimizer), params, bucket_bytes)  # it has step_params (checked above)
