"""Timing of one optimizer step, all optimizers in one process, interleaved round-robin.

Every optimizer gets fresh parameters of the same shapes with fixed random gradients (seed 0); after the
warm-up steps, one step of each optimizer is timed in turn (``time.perf_counter``), so all share the machine's
noise; medians and inter-quartile ranges are reported. The order of each round is shuffled (seeded): in a
fixed order an optimizer always ran right after the same predecessor, e.g. our Lars after the foreach Lamb,
which frees 0.8 GB of temporaries (the kernel then returns pages while the next step runs), and that
predecessor's cost showed up as a steady bias of one optimizer, not as noise shared by all. Memory (see
``memory.py``) is measured in a separate pass after the timing, since resetting the peak-RSS counter perturbs
the step after it.
"""
from __future__ import annotations

import gc
import random
import statistics
import time
from dataclasses import dataclass, field

import torch

from .bandwidth import bandwidth_gbs, floor_seconds  # noqa: F401 - re-exported for the CLI
from .memory import measured_step, persistent_extra_bytes, pin_mmap_threshold  # noqa: F401
from .shapes import numel


@dataclass
class Result:
    name: str
    times: list[float] = field(default_factory=list)
    peak_extra: list[int] = field(default_factory=list)
    persistent: int = 0
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None


def make_problem(shapes, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def bench_set(shapes, factories: dict, *, steps: int, warmup: int, memory: bool = True, progress=None) -> dict:
    """Time every optimizer on the same parameter shapes; returns {name: Result}."""
    results: dict[str, Result] = {}
    opts = {}
    for name, (factory, reason) in factories.items():
        results[name] = Result(name, error=reason)
        if factory is None:
            continue
        try:
            opts[name] = factory(make_problem(shapes))
            for _ in range(warmup):
                opts[name].step()
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported as failing
            results[name].error = f"failed: {type(exc).__name__}: {exc}"
            opts.pop(name, None)
        gc.collect()
    order = list(opts)
    rng = random.Random(0)
    for _ in range(steps):  # round-robin: every optimizer sees the same machine noise
        rng.shuffle(order)  # ... and no optimizer always follows the same one
        for name in order:
            opt = opts[name]
            t0 = time.perf_counter()
            opt.step()
            results[name].times.append(time.perf_counter() - t0)
            if progress is not None:
                progress()
    if memory:  # a separate pass: resetting the peak-RSS counter perturbs the timing of the next step
        for name, opt in opts.items():
            for _ in range(2):
                _, peak = measured_step(opt)
                if peak is not None:
                    results[name].peak_extra.append(peak)
    for name, opt in opts.items():
        results[name].persistent = persistent_extra_bytes(opt)
    del opts
    gc.collect()
    return results


#: (checked, unchecked or other variant) pairs whose step-time ratio the report gives: the non-finite check's
#: cost (``nonfinite="skip"`` vs ``"propagate"``) and the sync-free skip's masked writes vs the foreach step
PAIRS = (("largebatch Lamb", "largebatch Lamb (propagate)"), ("largebatch Lars", "largebatch Lars (propagate)"),
         ("largebatch Lamb (sync-free)", "largebatch Lamb (foreach)"))


def pair_ratios(results: dict) -> list[dict]:
    """For each pair of :data:`PAIRS` measured in this run: median ÷ median, min ÷ min and the median of the
    per-round ratios (both steps of a round ran back to back in the same machine state)."""
    out = []
    for a, b in PAIRS:
        ra, rb = results.get(a), results.get(b)
        if ra is None or rb is None or not ra.times or len(ra.times) != len(rb.times):
            continue
        out.append({"optimizer": a, "versus": b, "ratio_median": ra.median / rb.median,
                    "ratio_min": min(ra.times) / min(rb.times),
                    "ratio_per_round_median": statistics.median(x / y for x, y in zip(ra.times, rb.times))})
    return out


def summarise(set_name: str, shapes, results: dict, bandwidth: float) -> dict:
    n_params = sum(numel(s) for s in shapes)
    largest = max(numel(s) for s in shapes) * 4
    floor_s = floor_seconds(n_params, bandwidth)
    first = next(iter(results.values()))
    base, base_min = first.median, min(first.times) if first.times else None
    rows = []
    for r in results.values():
        row = {"optimizer": r.name, "error": r.error}
        if r.median is not None:
            row.update({
                "median_ms": r.median * 1e3,
                "iqr_ms": (statistics.quantiles(r.times, n=4)[2] - statistics.quantiles(r.times, n=4)[0]) * 1e3
                if len(r.times) >= 4 else None,
                "ratio_to_fused_adamw": r.median / base if base else None,
                # the fastest step of each: the cost with the least interference from the host
                "min_ms": min(r.times) * 1e3,
                "ratio_min_to_fused_adamw": min(r.times) / base_min if base_min else None,
                "ratio_to_bandwidth_floor": r.median / floor_s,
                "peak_extra_mib": (max(r.peak_extra) + r.persistent) / 2**20 if r.peak_extra else None,
                "peak_extra_vs_largest_tensor": (max(r.peak_extra) + r.persistent) / largest if r.peak_extra else None,
            })
        rows.append(row)
    return {"set": set_name, "tensors": len(shapes), "params_millions": n_params / 1e6,
            "largest_tensor_mib": largest / 2**20, "bandwidth_floor_ms": floor_s * 1e3, "rows": rows,
            "pairs": pair_ratios(results)}
