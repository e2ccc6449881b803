"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", App. A.1).

For a batch of B independent samples, E|G_B|² = |G|² + tr(Σ)/B, where G is the true gradient and Σ the
per-sample gradient covariance. Squared norms of the same gradient at two batch sizes B_small < B_big
therefore give unbiased estimates of both terms::

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

and the simple noise scale B_simple = tr(Σ)/|G|² is the ratio of their exponential moving averages,
each averaged separately (the ratio of two noisy estimates is biased; the ratio of averages much less).

Gradient accumulation gives both batch sizes for free: the small gradients are the micro-batch gradients
(on every rank under data parallelism), the big one is the accumulated (all-reduced) gradient of the
step. ``NoiseScaleTracker`` captures each micro-batch's per-tensor gradient norm with a tensor hook
(before the gradient is added into ``.grad``, so no copy of the gradients is kept), writes it into a
device buffer and reads nothing back until ``summary()``: no host synchronisation per micro-batch.
The maths, the units and the cost are in docs/noise-scale.md.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

NEEDS_TWO_BATCH_SIZES = ("the gradient noise scale needs gradients at two batch sizes: use gradient accumulation "
                         "(micro_batch_size < batch_size) or several data-parallel processes")


def two_batch_estimates(small_sq, big_sq, inv_small, inv_big):
    """Unbiased (|G|², tr(Σ)) from mean squared gradient norms at two batch sizes.

    ``small_sq``/``big_sq``: E|G_B|² measured at the small and the big batch; ``inv_small``/``inv_big``:
    1/B of each (for micro-batches of unequal sizes b_i, ``inv_small`` is the mean of 1/b_i, which keeps
    the estimate unbiased because E|g_i|² is linear in 1/b_i). Works on floats and on tensors alike.
    """
    gap = inv_small - inv_big
    grad_sq = (big_sq * inv_small - small_sq * inv_big) / gap
    trace = (small_sq - big_sq) / gap
    return grad_sq, trace


def simple_noise_scale(trace: float, grad_sq: float) -> float | None:
    """B_simple = tr(Σ)/|G|²; None when |G|² is not positive (the gradient is lost in the noise)."""
    return trace / grad_sq if grad_sq > 0 else None


def steps_model(batch_size: float, min_steps: float, noise_scale: float) -> float:
    """The paper's trade-off S = S_min·(1 + B_noise/B): steps to a target at batch ``batch_size``."""
    return min_steps * (1.0 + noise_scale / batch_size)


def layer_type_groups(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the class name of the module that owns it (``Linear``, ``Embedding``, ...).

    A parameter shared by several modules (tied weights) counts once, under its first owner."""
    groups: dict[str, str] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                groups[f"{module_name}.{name}" if module_name else name] = type(module).__name__
    return groups


def require_two_batch_sizes(phases: list[tuple[int, int]], world_size: int) -> None:
    """ValueError unless some phase, given as (batch_size, micro_batch_size), yields two batch sizes."""
    if world_size == 1 and all(micro >= batch for batch, micro in phases):
        sizes = ", ".join(f"batch_size {b} = micro_batch_size" for b, _ in phases)
        raise ValueError(f"{NEEDS_TWO_BATCH_SIZES} (here: {sizes}, 1 process)")


def batch_samples(batch: Mapping[str, Tensor]) -> int:
    """Samples in a micro-batch: the first dimension of its tensors (sequences for MLM)."""
    return int(next(iter(batch.values())).shape[0])


def announcer(tracker: NoiseScaleTracker, counts: list[int], samples: list[int], total: float,
              grad_factor: float) -> Callable[[int, Any], None]:
    """An ``on_micro_batch(i, batch)`` callback for ``accumulate_gradients`` telling ``tracker`` of each
    micro-batch: its samples, and that its backward carries count_i / total × ``grad_factor`` (the world
    size under DDP, times the loss scale under fp16) times its mean gradient."""
    def announce(i: int, _batch: Any) -> None:
        tracker.micro_batch(samples=samples[i], grad_scale=grad_factor * counts[i] / total)
    return announce


class NoiseScaleTracker:
    """Estimates B_simple during training from the micro-batch and full-batch gradients, in any loop.

    Per optimizer step::

        for batch in micro_batches:
            tracker.micro_batch(samples=len(batch), grad_scale=c)  # before this micro-batch's backward
            loss(batch).backward()                                 # the backward carries c × its mean gradient
        # .grad now holds the full-batch mean gradient (all-reduced under DDP, unscaled under fp16)
        tracker.update(batch_size)        # or tracker.discard() for a step that is not taken
        ...
        tracker.summary()                 # host sync: the smoothed estimates as plain numbers

    ``grad_scale`` is what the micro-batch's backward carries relative to its own mean gradient: with
    the loss summed over the micro-batch and divided by the step's total count, ``count_i / total``
    (times the world size under DDP, times the loss scale under fp16). ``samples`` is the micro-batch's
    size in the unit of the batch size (sequences for MLM, whose loss is averaged over masked tokens).

    ``groups`` maps parameter names to group names (default: ``layer_type_groups``); B_simple is
    reported overall and per group. ``ema`` is the smoothing factor of the two moving averages.
    ``distributed``: sum the micro-batch statistics over the default process group (each rank's
    micro-batches are small batches of the same step).
    """

    def __init__(self, model: nn.Module, *, groups: Mapping[str, str] | None = None, ema: float = 0.99,
                 distributed: bool = False):
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"Invalid ema: {ema!r} (allowed: 0 <= ema < 1)")
        groups = layer_type_groups(model) if groups is None else dict(groups)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters: no gradient noise to measure")
        if any(hasattr(p, "full_tensor") for _, p in named):
            raise ValueError("the gradient noise scale does not support sharded (FSDP2/DTensor) parameters; "
                             "use strategy 'ddp'")
        missing = [n for n, _ in named if n not in groups]
        if missing:
            raise ValueError(f"Invalid groups: no group for parameter(s) {', '.join(missing[:5])}")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.group_names = sorted({groups[n] for n in self.names})
        self.ema, self.distributed = ema, distributed
        device = self.params[0].device
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        index = torch.tensor([self.group_names.index(groups[n]) for n in self.names])
        # (params, groups + 1): sums per-tensor squares into each group and, in the last column, overall
        self._membership = torch.cat([nn.functional.one_hot(index, len(self.group_names)),
                                      torch.ones(len(self.names), 1, dtype=torch.long)], 1).to(device, self.dtype)
        self._norms = torch.zeros(0, len(self.params), device=device, dtype=self.dtype)
        self._slots: list[list[Tensor]] = []
        self._row = -1
        self._coefs: list[float] = []
        self._inv_sizes: list[float] = []
        self._ema_grad_sq = torch.zeros(len(self.group_names) + 1, device=device, dtype=self.dtype)
        self._ema_trace = torch.zeros_like(self._ema_grad_sq)
        self._window = torch.zeros(2, len(self.group_names) + 1, device=device, dtype=self.dtype)  # Σ |G|², Σ tr Σ
        self.window_steps = 0
        self.steps = 0
        self.last: tuple[Tensor, Tensor] | None = None  # the last step's raw (|G|², tr Σ), groups + overall
        self._handles = [p.register_hook(functools.partial(self._record, j)) for j, p in enumerate(self.params)]

    # -- per micro-batch ---------------------------------------------------------------------------
    def micro_batch(self, samples: int, grad_scale: float) -> None:
        """Announce the next micro-batch's backward: ``samples`` in it, its gradient × ``grad_scale``."""
        if samples < 1 or not (grad_scale > 0 and math.isfinite(grad_scale)):
            raise ValueError(f"Invalid micro-batch: samples={samples!r} (allowed: >= 1), "
                             f"grad_scale={grad_scale!r} (allowed: a finite number > 0)")
        self._row += 1
        if self._row == len(self._slots):
            self._grow()
        self._norms[self._row].zero_()  # a tensor without a gradient in this micro-batch contributes 0
        self._coefs.append(1.0 / grad_scale ** 2)
        self._inv_sizes.append(1.0 / samples)

    def _grow(self) -> None:
        rows = max(2 * len(self._slots), 1)
        norms = torch.zeros(rows, len(self.params), device=self._norms.device, dtype=self.dtype)
        norms[:len(self._slots)] = self._norms
        self._norms = norms
        self._slots = [list(row.unbind()) for row in norms]  # 0-d views: the hooks write norms into them

    def _record(self, j: int, grad: Tensor) -> None:
        if self._row >= 0:  # a backward outside micro_batch() (e.g. a user's own) is not measured
            torch.linalg.vector_norm(grad, dtype=self.dtype, out=self._slots[self._row][j])

    # -- per step ----------------------------------------------------------------------------------
    def update(self, batch_size: int) -> None:
        """Fold this step into the moving averages. ``.grad`` must hold the full-batch mean gradient of
        ``batch_size`` samples (over all ranks). Raises ValueError when there was only one batch size."""
        rows = self._row + 1
        if rows == 0 and not self.distributed:  # (a rank without samples still joins the all-reduce)
            raise RuntimeError("update() without micro_batch(): no micro-batch gradient was recorded")
        world = dist.get_world_size() if self.distributed else 1
        if rows == 1 and world == 1:
            self.discard()
            raise ValueError(NEEDS_TWO_BATCH_SIZES)
        squares = self._norms[:rows].square()
        small = self._norms.new_zeros(len(self.params))
        for i, coef in enumerate(self._coefs):  # python scalars: no host-to-device copy
            small.add_(squares[i], alpha=coef)
        stats = torch.cat([small @ self._membership, small.new_zeros(2)])
        stats[-2].fill_(rows)
        stats[-1].fill_(sum(self._inv_sizes))
        if self.distributed:
            dist.all_reduce(stats)
        small_sq, inv_small = stats[:-2] / stats[-2], stats[-1] / stats[-2]
        big_sq = self._full_batch_norms().square() @ self._membership
        grad_sq, trace = two_batch_estimates(small_sq, big_sq, inv_small, 1.0 / batch_size)
        self._ema_grad_sq.mul_(self.ema).add_(grad_sq, alpha=1.0 - self.ema)
        self._ema_trace.mul_(self.ema).add_(trace, alpha=1.0 - self.ema)
        self._window[0].add_(grad_sq)
        self._window[1].add_(trace)
        self.last = (grad_sq, trace)
        self.steps += 1
        self.window_steps += 1
        self.discard()

    def _full_batch_norms(self) -> Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        norms = iter(torch._foreach_norm(grads, 2, dtype=self.dtype))
        zero = self._norms.new_zeros(())
        return torch.stack([next(norms) if p.grad is not None else zero for p in self.params])

    def discard(self) -> None:
        """Forget this step's micro-batch norms (a skipped step, or after ``update``)."""
        self._row = -1
        self._coefs.clear()
        self._inv_sizes.clear()

    # -- reading -----------------------------------------------------------------------------------
    def summary(self) -> dict[str, float | None]:
        """The estimates as plain numbers (one host sync); empty before the first ``update``.

        ``b_simple`` and ``b_simple/<group>``: the ratio of the moving averages; ``grad_sq_norm`` (|G|²)
        and ``grad_trace_cov`` (tr Σ): the bias-corrected moving averages. ``window_*``: the plain means
        of the per-step estimates since the previous ``summary()`` (``window_steps`` of them), which a
        later analysis can combine over any span; each call starts a new window."""
        if self.steps == 0:
            return {}
        correction = 1.0 - self.ema ** self.steps
        grad_sq = (self._ema_grad_sq / correction).tolist()
        trace = (self._ema_trace / correction).tolist()
        out: dict[str, float | None] = {"b_simple": simple_noise_scale(trace[-1], grad_sq[-1]),
                                        "grad_sq_norm": grad_sq[-1], "grad_trace_cov": trace[-1]}
        for name, g, t in zip(self.group_names, grad_sq, trace):
            out[f"b_simple/{name}"] = simple_noise_scale(t, g)
        if self.window_steps:
            window_grad_sq, window_trace = (self._window[:, -1] / self.window_steps).tolist()
            out.update(window_steps=self.window_steps, window_grad_sq_norm=window_grad_sq,
                       window_grad_trace_cov=window_trace,
                       window_b_simple=simple_noise_scale(window_trace, window_grad_sq))
            self._window.zero_()
            self.window_steps = 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "ema_grad_sq": self._ema_grad_sq.cpu(), "ema_trace": self._ema_trace.cpu(),
                "window": self._window.cpu(), "window_steps": self.window_steps, "groups": list(self.group_names),
                "ema": self.ema}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["groups"]) != self.group_names:
            raise ValueError(f"noise-scale state has groups {state['groups']}, this model {self.group_names}")
        self.steps = int(state["steps"])
        self._ema_grad_sq.copy_(state["ema_grad_sq"])
        self._ema_trace.copy_(state["ema_trace"])
        self._window.copy_(state["window"])
        self.window_steps = int(state["window_steps"])

    def close(self) -> None:
        """Remove the gradient hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
