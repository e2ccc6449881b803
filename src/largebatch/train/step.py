"""One optimizer step: accumulate the micro-batches' gradients, check them, step (or skip), zero.

:class:`Stepper` holds what a step needs across steps: the (wrapped) model, the optimizer, the precision's
autocast and GradScaler, and the count of skipped steps (non-finite gradients under ``nonfinite='skip'``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..optim import step_in_backward as optim_step_in_backward
from . import distributed as D
from .accumulation import accumulate_gradients
from .noise_scale import NoiseScaleTracker, announcer, batch_samples
from .precision import autocast, grad_scaler, grads_finite

#: a run whose steps are all skipped for this many steps in a row is reported as diverged
MAX_CONSECUTIVE_SKIPS = 10


@dataclass(frozen=True)
class StepResult:
    loss: float      # mean loss over the effective batch, all processes
    count: int       # what the loss is normalised by (samples; masked tokens for MLM)
    finite: bool     # the gradients were finite and the optimizer stepped


class Stepper:
    def __init__(self, model: nn.Module, train_model: nn.Module, optimizer, ctx: D.DistContext, *,
                 precision: str, nonfinite: str, skipped: int = 0, step_in_backward: bool = False,
                 noise: NoiseScaleTracker | None = None):
        self.model, self.train_model, self.optimizer, self.ctx = model, train_model, optimizer, ctx
        self.noise = noise                 # the gradient noise scale, when measured
        self.no_sync = D.no_sync(train_model, ctx)
        # the optimizer steps inside the last micro-batch's backward pass; the others only accumulate
        self.in_backward = optim_step_in_backward(train_model, optimizer) if step_in_backward else None
        if self.in_backward is not None:
            self.no_sync = self.in_backward.accumulating
        self.autocast = autocast(precision)
        self.scaler = grad_scaler(precision)
        self.nonfinite = nonfinite
        self.skipped = skipped             # in the whole run (restored on resume)
        self.consecutive_skips = 0

    @property
    def stuck(self) -> bool:
        """Nothing but skipped steps for MAX_CONSECUTIVE_SKIPS steps: counted as a divergence."""
        return self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS

    def step(self, task, micro_batches: list[dict], step: int, batch_size: int | None = None) -> StepResult:
        """Train on one effective batch (this process's ``micro_batches`` of the global ``batch_size``
        samples, which the noise scale needs); ``step`` is 0-based."""
        ctx, scaler = self.ctx, self.scaler
        counts = [task.count(b) for b in micro_batches]
        (total,) = D.all_reduce_sum([float(sum(counts))], ctx)
        announce = self.noise_announcer(micro_batches, counts, total)
        if announce is not None and batch_size is None:
            raise ValueError("Invalid batch_size: None (allowed: the step's global batch, which the noise scale needs)")
        local_loss, _ = accumulate_gradients(
            self.train_model, micro_batches, task.loss, count_fn=task.count, no_sync=self.no_sync,
            autocast=self.autocast, total=int(total), scale=float(ctx.world_size),
            backward=(lambda l: scaler.scale(l).backward()) if scaler else None, on_micro_batch=announce)
        (loss,) = D.all_reduce_sum([local_loss], ctx)
        if self.in_backward is not None:  # stepped already (a non-finite gradient raised)
            return StepResult(loss, int(total), True)
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # true gradients before the trust ratio
        finite = self.update(step)
        if announce is not None:  # .grad still holds the full-batch gradient (zeroed below)
            self.noise.update(batch_size) if finite else self.noise.discard()
        if finite:
            self.consecutive_skips = 0
        else:
            self.skipped += 1  # the optimizer's step counters do not advance
            self.consecutive_skips += 1
        if scaler is not None:
            scaler.update()  # lowers the scale after an overflow, raises it after a quiet stretch
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, int(total), finite)

    def update(self, step: int) -> bool:
        """Step the optimizer unless a gradient is non-finite (``nonfinite='skip'``; ``'raise'`` raises);
        True when it stepped.

        Lamb and Lars apply the run's policy themselves (the loop builds them with it): their check is one
        reduction over the gradients before anything is written (free with ``max_grad_norm``), agrees across
        processes (DDP's gradients are reduced, FSDP2's flag is summed in the optimizer) and needs no second
        pass here. torch's optimizers and fp16's GradScaler get the loop's check.
        """
        optimizer, scaler = self.optimizer, self.scaler
        if scaler is None and hasattr(optimizer, "last_step_skipped"):
            try:
                optimizer.step()
            except FloatingPointError as exc:
                raise FloatingPointError(f"non-finite gradients at step {step + 1}: {exc}") from None
            return not optimizer.last_step_skipped
        finite = not D.any_true(not grads_finite(self.model), self.ctx)
        if finite:
            (scaler.step(optimizer) if scaler is not None else optimizer.step())
        elif self.nonfinite == "raise":
            raise FloatingPointError(f"non-finite gradients at step {step + 1} (policy nonfinite='raise')")
        return finite

    def noise_announcer(self, micro_batches: list[dict], counts: list[int], total: float):
        """The micro-batch callback of the noise scale; None when it is off or this step has one batch size
        (one micro-batch in one process)."""
        if self.noise is None or (len(micro_batches) < 2 and not self.ctx.enabled):
            return None
        # the backward carries the loss scale (fp16): read once per step, a host sync fp16 steps already have
        loss_scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        return announcer(self.noise, counts, [batch_samples(b) for b in micro_batches], total,
                         self.ctx.world_size * loss_scale)
