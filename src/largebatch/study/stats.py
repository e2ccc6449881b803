"""Small statistics shared by the runner's rules and the report: finiteness, mean ± half-range, "beyond"."""
from __future__ import annotations

import math
import statistics

TOL = 1e-9  # a difference equal to the spread (up to rounding) counts as within it


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_spread(values: list) -> tuple[float, float]:
    """Mean and half-range of the finite values (NaN, NaN when there are none; spread 0 for one value)."""
    values = [v for v in values if finite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def beyond(x: float, noise: float) -> bool:
    """``x`` exceeds the noise (the sum of two seed half-ranges), up to rounding."""
    return x > noise + TOL


def same_lr(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))
