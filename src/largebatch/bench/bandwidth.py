"""Memory-bandwidth probe: the speed limit of an optimizer step, which streams every array once.

An in-place ``a += s·b`` over 50 M floats (200 MB per array, far beyond the L3 cache) reads a and b and
writes a: 12 bytes per element, the same read-modify-write pattern as an optimizer step. Fused AdamW moves
28 bytes per parameter (read x, g, m, v; write x, m, v), so ``28 · params / bandwidth`` is the floor that
no fp32 AdamW/LAMB step can beat.
"""
from __future__ import annotations

import statistics
import time

import torch

BYTES_PER_PARAM = 28  # fused AdamW: read x, g, m, v and write x, m, v, 4 bytes each


def bandwidth_gbs(n: int = 50_000_000, repeats: int = 5) -> float:
    """Median read-modify-write bandwidth in GB/s (10^9 bytes per second)."""
    a, b = torch.randn(n), torch.randn(n)
    a.add_(b, alpha=1e-3)  # fault the pages in before timing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.add_(b, alpha=1e-3)
        times.append(time.perf_counter() - t0)
    del a, b
    return 12 * n / statistics.median(times) / 1e9


def floor_seconds(n_params: int, gbs: float) -> float:
    """Time to stream 28 bytes per parameter at the measured bandwidth."""
    return BYTES_PER_PARAM * n_params / (gbs * 1e9)
