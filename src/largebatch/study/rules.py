"""The study's decision rules, as pure functions (the runner applies them; the tests pin them).

- LR choice: the lowest validation loss among the finite, non-diverged runs of a sweep.
- Grid extension: while the best LR is at an edge of the grid, one more LR beyond it (same ratio).
- Near-tie refinement: when the two best LRs are within ``near_tie`` (relative validation loss), one more
  LR on each side of the best, a factor ``refine_factor`` away (×√3 by default: half a ×3 grid step).
- Seeds: a cell of two seeds gets a third when the seed spread overlaps the difference judged with it.
"""
from __future__ import annotations

import math

from .stats import beyond, finite, mean_spread


def sweep_score(summary: dict) -> float:
    """What an LR sweep minimises: the validation loss (inf for a diverged or non-finite run)."""
    v = summary.get("validation_loss")
    return v if finite(v) and not summary.get("diverged") else math.inf


def best_lr(scores: dict[float, float]) -> float:
    return min(scores, key=lambda lr: scores[lr])


def extension(scores: dict[float, float]) -> float | None:
    """The next LR beyond the grid edge holding the best score, or None when the best is inside the grid."""
    ordered = sorted(scores)
    if len(ordered) < 2:
        return None
    best = best_lr(scores)
    step = ordered[1] / ordered[0]
    if best == ordered[0]:
        return best / step
    if best == ordered[-1]:
        return best * step
    return None


def near_tie(scores: dict[float, float], tie: float) -> bool:
    """The two best finite scores are within ``tie`` of each other (relative to the best)."""
    ok = sorted(v for v in scores.values() if finite(v))
    if len(ok) < 2:
        return False
    best, second = ok[0], ok[1]
    return best != 0 and (second - best) / abs(best) <= tie


def refinement(scores: dict[float, float], tie: float, factor: float) -> list[float]:
    """LRs to add once around the best when the choice is a near-tie (none otherwise)."""
    if not near_tie(scores, tie):
        return []
    best = best_lr(scores)
    return [lr for lr in (best / factor, best * factor) if not any(math.isclose(lr, x) for x in scores)]


def overlaps(a: list, b: list) -> bool:
    """Two cells of ≥ 2 finite values whose half-range spreads together reach the difference of their means."""
    fa, fb = [v for v in a if finite(v)], [v for v in b if finite(v)]
    if len(fa) < 2 or len(fb) < 2:
        return False
    (ma, sa), (mb, sb) = mean_spread(fa), mean_spread(fb)
    return not beyond(abs(ma - mb), sa + sb)


def cells_needing_seeds(cells: dict[tuple[str, int], list], pairs: list[tuple[tuple[str, int], tuple[str, int]]],
                        seeds: int) -> set[tuple[str, int]]:
    """The cells (optimizer, batch) with fewer than ``seeds`` values that take part in an overlapping pair."""
    out = set()
    for a, b in pairs:
        if a in cells and b in cells and overlaps(cells[a], cells[b]):
            out |= {c for c in (a, b) if len(cells[c]) < seeds}
    return out


def judged_pairs(optimizers: list[str], batches: tuple[int, ...], ref: str = "lamb") -> list[tuple]:
    """The differences the report judges: each batch against the smallest, per optimizer, and every optimizer
    against ``ref`` at the largest batch."""
    b0, b1 = batches[0], batches[-1]
    pairs = [((o, b0), (o, b)) for o in optimizers for b in batches[1:]]
    if ref in optimizers:
        pairs += [((ref, b1), (o, b1)) for o in optimizers if o != ref]
    return pairs
