"""Timing and memory of one optimizer step, all optimizers in one process, interleaved round-robin.

Timing and memory are measured in separate passes (the memory probe disturbs the step after it).

Memory: before a step, Linux's peak-RSS counter (VmHWM) is reset to the current RSS (``clear_refs``);
after it, VmHWM − RSS-before is the peak extra memory the step touched. glibc's dynamic mmap threshold
is pinned first (``mallopt``) so that every large temporary is a fresh mapping and is counted each step.
Buffers an optimizer keeps outside its state (our kernel's scratch) are added, since they are allocated
once and would not show up after the first step. Off Linux, memory is reported as unavailable.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import dataclass, field

import torch

from .shapes import numel

M_MMAP_THRESHOLD = -3


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    except OSError:
        return False


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measured_step(opt) -> tuple[float, int | None]:
    """(seconds, peak extra bytes) of one ``opt.step()``."""
    rss0 = _status_kib("VmRSS")
    ok = rss0 is not None and _reset_peak()
    t0 = time.perf_counter()
    opt.step()
    dt = time.perf_counter() - t0
    if not ok:
        return dt, None
    peak = _status_kib("VmHWM")
    return dt, max(0, (peak - rss0) * 1024) if peak is not None else None


def persistent_extra_bytes(opt) -> int:
    bufs = getattr(opt, "_scratch_buffers", {}) or {}
    return sum(b.numel() * b.element_size() for b in bufs.values())


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
    for _ in range(steps):  # round-robin: every optimizer sees the same machine noise
        for name, opt in opts.items():
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


def bandwidth_gbs(n: int = 50_000_000, repeats: int = 5) -> float:
    """Read-modify-write bandwidth (a += s·b: 12 bytes per element), as an optimizer step streams memory."""
    a, b = torch.randn(n), torch.randn(n)
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.add_(b, alpha=1e-3)
        best.append(time.perf_counter() - t0)
    del a, b
    return 12 * n / statistics.median(best) / 1e9


def summarise(set_name: str, shapes, results: dict, bandwidth: float) -> dict:
    n_params = sum(numel(s) for s in shapes)
    largest = max(numel(s) for s in shapes) * 4
    floor_s = 28 * n_params / (bandwidth * 1e9)
    base = next(iter(results.values())).median
    rows = []
    for r in results.values():
        row = {"optimizer": r.name, "error": r.error}
        if r.median is not None:
            row.update({
                "median_ms": r.median * 1e3,
                "iqr_ms": (statistics.quantiles(r.times, n=4)[2] - statistics.quantiles(r.times, n=4)[0]) * 1e3
                if len(r.times) >= 4 else None,
                "ratio_to_fused_adamw": r.median / base if base else None,
                "ratio_to_bandwidth_floor": r.median / floor_s,
                "peak_extra_mib": (max(r.peak_extra) + r.persistent) / 2**20 if r.peak_extra else None,
                "peak_extra_vs_largest_tensor": (max(r.peak_extra) + r.persistent) / largest if r.peak_extra else None,
            })
        rows.append(row)
    return {"set": set_name, "tensors": len(shapes), "params_millions": n_params / 1e6,
            "largest_tensor_mib": largest / 2**20, "bandwidth_floor_ms": floor_s * 1e3, "rows": rows}
